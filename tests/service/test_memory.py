"""service.memory: the heap handed back after a burst, and never on the steady path; the garbage collector's young
collections wait for YOUNG_COLLECTION_THRESHOLD while the server serves."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from service_helpers import serve

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


# Buffers allocated, touched and freed again and again, as each request's are: one of 1 MiB on the main thread (a
# request's body or input copy) and a forward pass's activations on a thread of its own (six of 2 MiB, 12 MiB at
# once). Prints the page faults each round took once warm.
REFAULTS = """
import resource, threading
import numpy as np
from service import memory
assert memory.tune_malloc()

def forward():
    buffers = [np.ones(2 << 20, np.uint8) for _ in range(6)]
    del buffers

def faults_per_round(work):
    for _ in range(5):
        work()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        work()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20

found = {}
thread = threading.Thread(target=lambda: found.update(forward=faults_per_round(forward)))
thread.start()
thread.join()
print(faults_per_round(lambda: np.ones(1 << 20, np.uint8)), found["forward"])
"""


def test_freed_buffers_stay_in_the_heap_for_the_next_request() -> None:
    """With the mmap threshold fixed, glibc's trim threshold stayed at 128 KiB: a heap handed its free top back as
    soon as a request's buffers were freed, and the next request faulted the pages in again (224 faults a round for
    the 1 MiB buffer, 480 for the "forward"). tune_malloc keeps up to TRIM_THRESHOLD of free top in each heap."""
    try:
        ctypes.CDLL("libc.so.6").mallopt  # noqa: B018
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    run = subprocess.run(
        [sys.executable, "-c", REFAULTS], capture_output=True, text=True, timeout=60, check=True, cwd=REPO
    )
    request, forward = (float(n) for n in run.stdout.split())
    assert request < 8, f"{request} page faults per 1 MiB request buffer (256 pages)"
    assert forward < 64, f"{forward} page faults per 12 MiB forward pass (3,072 pages)"


def young_collections(work: Callable[[], object]) -> tuple[object, list[int]]:
    """What `work` returns, and the generation of each collection the collector started while it ran."""
    started: list[int] = []

    def seen(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started.append(info["generation"])

    gc.callbacks.append(seen)
    try:
        return work(), started
    finally:
        gc.callbacks.remove(seen)


def in_flight(n: int = 20_000) -> list[list[int]]:
    """n live containers, as requests in flight hold them: nothing a collection could free."""
    return [[] for _ in range(n)]


def test_while_serving_young_collections_wait_for_the_threshold_and_the_defaults_come_back() -> None:
    defaults = gc.get_threshold()
    assert defaults[0] < 20_000, "CPython's default young threshold (700)"
    frozen = gc.get_freeze_count()
    with memory.collector_for_serving():
        assert gc.get_threshold() == (memory.YOUNG_COLLECTION_THRESHOLD, *defaults[1:])
        assert gc.get_freeze_count() > frozen  # what was alive at the start: never walked again
        gc.collect(0)  # the count starts from zero
        held, started = young_collections(in_flight)
        assert started == []
        del held
    assert gc.get_threshold() == defaults
    assert gc.get_freeze_count() == 0
    held, started = young_collections(in_flight)
    assert started, "with the default threshold the same live objects start young collections"


def test_the_thresholds_come_back_after_an_error() -> None:
    defaults = gc.get_threshold()
    with pytest.raises(RuntimeError), memory.collector_for_serving():
        raise RuntimeError
    assert gc.get_threshold() == defaults


@pytest.mark.anyio
async def test_the_server_tunes_the_collector_while_it_serves(settings_for) -> None:
    defaults = gc.get_threshold()
    async with serve(settings_for()) as (_, client):
        assert gc.get_threshold()[0] == memory.YOUNG_COLLECTION_THRESHOLD
        assert (await client.get("/healthz")).status_code == 200
    assert gc.get_threshold() == defaults
