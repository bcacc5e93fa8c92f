"""One OpenMP team in the process: the forward thread's. Every other thread that runs torch ops runs them alone.

PyTorch's CPU ops run on an OpenMP team that belongs to the thread calling them, made the first time that thread runs
an op large enough to split (tens of thousands of elements). Once the process holds more OpenMP threads than CPUs,
libgomp stops spinning between parallel regions and puts every thread to sleep at each barrier, for every team: the
forward thread's many short regions then wait on the kernel. Measured on 2 cores (docs/benchmarks.md): after one
`sample?n=256` answer (its PNGs are made on the event loop, a 200,000-element op) every later forward of the server
ran ~30 % slower, and a model built on a separate loader thread served 15-20 % slower.

So the event loop's thread, and the worker threads that convert large uploads, run their torch ops on one thread:
`run_alone()` sets the calling thread's OpenMP and MKL thread counts to 1 (omp_set_num_threads and
MKL_Set_Num_Threads_Local, per-thread settings; torch's own set_num_threads would also change the count every
thread after it starts with). The forward thread keeps the
count the server was started with (--cpu-threads, else torch's default).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")


@functools.cache
def _per_thread_setters() -> tuple[Callable[[int], Any], ...]:
    """omp_set_num_threads and MKL's MKL_Set_Num_Threads_Local (its C call; the lower-case name takes a pointer),
    looked up through torch's own CPU library, so from the runtimes it was built with, not another package's copy;
    () where that library is not in this process's mappings (no /proc) or lacks them."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "/libtorch_cpu." in line})
    except OSError:
        return ()
    for path in paths:
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        setters = [getattr(library, name, None) for name in ("omp_set_num_threads", "MKL_Set_Num_Threads_Local")]
        return tuple(setter for setter in setters if setter is not None)
    return ()


def run_alone() -> None:
    """From now on the calling thread runs its torch ops by itself, with no OpenMP team of its own (until torch's
    set_num_threads is called on it). Microseconds: cheap enough to call before each piece of work."""
    setters = _per_thread_setters()
    if setters:
        torch.get_num_threads()  # torch sets a thread's counts on its first op: that first, then ours over them
        for set_threads in setters:
            set_threads(1)


def alone(fn: Callable[P, R]) -> Callable[P, R]:
    """`fn`, run with run_alone() first: for functions handed to a worker thread."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        run_alone()
        return fn(*args, **kwargs)

    return run
