"""service.memory: the heap handed back after a burst, and never on the steady path."""

from __future__ import annotations

import asyncio
import ctypes
import subprocess
import sys
from pathlib import Path

import pytest

from service import memory

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]


def run_watch(sizes: list[int | None], growth: int = 64 * MiB) -> list[int]:
    """Drive trim_after_growth over `sizes` (the resident sizes read, in order; the first is the start) and return
    the indices of the readings after which it trimmed. The watch stops when the readings run out."""
    readings = iter(sizes)
    seen: list[int] = []
    trims: list[int] = []

    def resident() -> int | None:
        value = next(readings, None)
        seen.append(0)
        return value

    def trim() -> None:
        trims.append(len(seen) - 1)

    asyncio.run(asyncio.wait_for(memory.trim_after_growth(0, growth, resident, trim), 5))
    return trims


def test_a_steady_size_is_never_trimmed() -> None:
    assert run_watch([300 * MiB] * 6) == []


def test_growth_past_the_step_is_trimmed_once_and_the_floor_moves_to_what_is_left() -> None:
    # start 300; 320 (+20: no); 400 (+100: trim, then 310 read as the new floor); 360 (+50: no); 380 (+70: trim)
    sizes = [300, 320, 400, 310, 360, 380, 300]
    assert run_watch([s * MiB for s in sizes]) == [2, 5]


def test_the_floor_follows_the_size_down() -> None:
    # start 500; 300 (an unload: the floor drops to 300); 370 (+70 over 300: trim)
    assert run_watch([s * MiB for s in (500, 300, 370, 370)]) == [2]


def test_without_proc_the_watch_ends_at_once() -> None:
    assert run_watch([None]) == []


def test_resident_size_is_read_from_proc() -> None:
    size = memory.resident_bytes()
    if size is None:
        pytest.skip("no /proc/self/statm on this system")
    assert 10 * MiB < size < 64 * 1024 * MiB


def test_tune_malloc_sets_glibcs_threshold() -> None:
    try:
        ctypes.CDLL("libc.so.6").mallopt  # noqa: B018
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    assert memory.tune_malloc() is True
    memory.trim()  # and trimming runs without error


# A buffer of 1 MiB, allocated, touched and freed again and again on the main thread, as each request's body and
# input copies are: the page faults that took, per round.
REFAULTS = """
import resource
import numpy as np
from service import memory
assert memory.tune_malloc()
for _ in range(5):
    np.ones(1 << 20, np.uint8)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    np.ones(1 << 20, np.uint8)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 50)
"""


def test_a_freed_request_buffer_is_reused_not_faulted_in_again() -> None:
    """With the mmap threshold fixed, glibc's trim threshold stayed at 128 KiB: each freed 1 MiB buffer at the top of
    the heap went back to the system and its 256 pages were faulted in again by the next request. tune_malloc keeps
    up to TRIM_THRESHOLD of free top in the heap."""
    try:
        ctypes.CDLL("libc.so.6").mallopt  # noqa: B018
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    run = subprocess.run(
        [sys.executable, "-c", REFAULTS], capture_output=True, text=True, timeout=60, check=True, cwd=REPO
    )
    assert float(run.stdout) < 8, f"{run.stdout.strip()} page faults per 1 MiB buffer (256 when it is given back)"
