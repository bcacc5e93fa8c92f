"""How the process's heap is handed back to the system: glibc's malloc tuned for a long-lived server, and a watch
that trims the heap after a burst of large requests. Without glibc (or /proc) every function here does nothing.

Two costs pull against each other (docs/reliability.md, docs/benchmarks.md):

- A forward pass allocates its activations afresh each time: megabytes for a batch (a 256-image batch of the default
  conv VAE: ~10 MB in buffers of 1-4 MB). Served from mappings of their own (mmap), each is page-faulted in and
  unmapped again on every forward; on these virtual machines that doubled a 256-image forward (8.5 -> 16.4 ms).
- Freed buffers at the top of a heap: glibc hands a heap's free top back as soon as it exceeds the trim threshold
  (128 KiB by default, doubled by each freed mapping while the mmap threshold moves, fixed once it is set), and the
  next request faults the pages in again. A 256-image uint8 tensor request took 82 page faults on the event loop
  (~15 % of its CPU there). Worse, in 4 of 10 server starts the forward thread's heap came to hold a
  256-image forward's 9.5 MB of activations at its top: from then on every forward ended with them handed back
  (madvise) and began by faulting in up to 2,320 pages, and the server ran them at two thirds of its speed.
- Heap memory is not given back: after a burst of large uploads (4096x4096 images) the per-thread heaps kept the
  freed buffers, ~1 GB the process no longer used.

So buffers up to MMAP_THRESHOLD come from the heaps, reused forward after forward; up to TRIM_THRESHOLD of free top
stays in each heap, reused request after request; and the process trims its heaps (malloc_trim, which also returns
free pages in the middle of them) when its resident size has grown by TRIM_AFTER_GROWTH since the last look: after a
burst, not on every request.

While serving, the cyclic garbage collector runs rarely (`collector_for_serving`). A request's objects are freed by
reference counting as soon as it is answered; almost none become cyclic garbage. But CPython starts a young
collection whenever 700 more objects are alive than at its last one, and a few dozen requests in flight hold more
than that: each collection walked the live requests' objects, freed nothing, and moved them on to the older
generations, whose collections walked them again: 22 µs of the event loop per encode at 64 clients, 71 at 256
(docs/benchmarks.md, section 00000000).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
import gc
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

logger = logging.getLogger("vae_serve")

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 8 << 20
# Free top a heap keeps: more than a forward pass's activations (9.5 MB for 256 images of the default model). Not
# more: at 32 MiB the server held ~80 MiB more after a burst of large uploads, which the trim watch did not return
# (malloc_trim returns free pages inside a thread's heap, not its top; docs/reliability.md).
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD
TRIM_EVERY_S = 1.0
TRIM_AFTER_GROWTH = 64 << 20
# Objects allocated (net of those freed) that start a young collection while serving; CPython's default is 700. 256
# encode requests in flight held ~12,000; above this, a young collection runs as before.
YOUNG_COLLECTION_THRESHOLD = 50_000


@functools.cache
def _libc() -> Any | None:
    """glibc, looked up once: find_library runs ldconfig in a subprocess."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (glibc has both; other C libraries may not)
        return libc
    except (OSError, AttributeError):
        return None


def tune_malloc() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD (buffers below it come from the heaps, larger ones are mappings
    of their own, returned when freed) and its trim threshold at TRIM_THRESHOLD (a heap hands back its free top only
    beyond that). False (and nothing done) without glibc."""
    libc = _libc()
    return (
        libc is not None
        and bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
        and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    )


def trim() -> None:
    """Hand every free page of every heap back to the system (glibc's malloc_trim(0)); nothing without glibc."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@contextlib.contextmanager
def collector_for_serving() -> Iterator[None]:
    """While serving: what is alive now (torch, the app, the models: ~200k objects) frozen, so that full collections
    stop walking it (they took 50-100 ms each under load), and young collections started only past
    YOUNG_COLLECTION_THRESHOLD. Both are given back on exit."""
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def resident_bytes() -> int | None:
    """This process's resident set size, from /proc/self/statm; None where there is no /proc."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


async def trim_after_growth(
    every_s: float = TRIM_EVERY_S,
    growth: int = TRIM_AFTER_GROWTH,
    resident: Callable[[], int | None] = resident_bytes,
    trim: Callable[[], None] = trim,
) -> None:
    """Run until cancelled: every `every_s`, trim the heaps (in a thread: it takes milliseconds) when the resident
    size has grown by `growth` bytes since the last trim or start. Under steady load the size holds and nothing
    runs; after a burst of large requests the freed memory goes back within a second or so."""
    floor = resident()
    if floor is None:
        return
    while True:
        await asyncio.sleep(every_s)
        now = resident()
        if now is None:
            return
        if now - floor >= growth:
            await asyncio.to_thread(trim)
            after = resident()
            logger.debug("heap trimmed: resident %.0f -> %.0f MiB", now / 2**20, (after or now) / 2**20)
            floor = after if after is not None else now
        else:
            floor = min(floor, now)
