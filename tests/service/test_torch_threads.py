"""service.torch_threads: threads other than the forward thread make no OpenMP team of their own."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from service import torch_threads

BIG = 1_000_000  # elements: far over torch's grain for splitting an op across threads


def threads() -> set[str]:
    return set(os.listdir("/proc/self/task"))


def in_fresh_thread(work: Callable[[], Any]) -> Any:
    """Run `work` on a new thread, which has never run a torch op, and return what it returned."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(work()))
    thread.start()
    thread.join()
    return out[0]


@pytest.fixture(autouse=True)
def _two_torch_threads() -> Iterator[None]:
    """New threads start with torch's process-wide count: 2 here (the suite may run with 1), put back after."""
    if not os.path.isdir("/proc/self/task") or not torch_threads._per_thread_setters():
        pytest.skip("no /proc, or torch's CPU library has no per-thread settings here")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_a_thread_left_alone_makes_a_team_for_a_large_op() -> None:
    """The hazard itself: the check below could not fail if a large op made no team anyway."""

    def work() -> int:
        before = threads()
        torch.exp(torch.zeros(BIG))
        return len(threads() - before)  # new threads (a thread ending meanwhile does not count)

    assert in_fresh_thread(work) >= 1


def test_run_alone_keeps_the_thread_on_its_own_and_others_as_they_were() -> None:
    def work() -> tuple[int, int]:
        torch_threads.run_alone()
        before = threads()
        torch.exp(torch.zeros(BIG))
        torch.stack([torch.zeros(BIG)] * 3).sum()
        return torch.get_num_threads(), len(threads() - before)

    assert in_fresh_thread(work) == (1, 0)
    assert in_fresh_thread(torch.get_num_threads) == 2  # another thread: as it was


def test_alone_wraps_a_function_for_a_worker_thread() -> None:
    assert in_fresh_thread(torch_threads.alone(torch.get_num_threads)) == 1
