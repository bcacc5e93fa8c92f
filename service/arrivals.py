"""Whether the running task is the newest one the event loop has made: how a lone request knows, without giving up
a turn of the loop, that no request arrived after it and is still waiting to start.

A small request that finds its model idle and no other request in the server runs its forward on the event loop
(service.batching). Requests read from the sockets in the same turn of the loop already have tasks, but those have
not run yet, so they are not counted in flight. To let them in, such a request used to yield one turn of the loop
first (`await asyncio.sleep(0)`), which cost a one-client encode 8 % of its throughput on 2 cores
(docs/benchmarks.md). With NewestTask installed as the loop's task factory (asyncio's public hook), a request whose
own task is the newest knows no task was made after it, so none waits to start, and it skips that turn; any other
request still yields it.

Linger keeps the event loop awake for a moment after such a request. On the virtual machines measured, a request that
arrives while the loop sleeps pays for waking an idle CPU (~0.2 ms of a one-client `sample?n=1`, docs/benchmarks.md,
section 00000000). For `inline_linger_us` after a lone request's answer, the loop polls its sockets (with a zero
timeout, once per turn) instead of sleeping, so the next request finds it running. The cost is CPU: at most that long
per lone request, never while idle, and never under load, when requests batch instead.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable, Coroutine, Generator
from typing import Any


class NewestTask:
    """A task factory that remembers the last task the loop made (weakly: it never keeps a task alive)."""

    def __init__(self) -> None:
        self._newest: weakref.ref[asyncio.Future[Any]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: Any = None  # the factory that was there before: tasks are still made by it

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is loop:
            return
        self._previous = loop.get_task_factory()
        loop.set_task_factory(self._make)
        self._loop = loop

    def uninstall(self) -> None:
        """The loop's previous factory back (unless another has replaced this one since)."""
        if self._loop is not None and self._loop.get_task_factory() == self._make:
            self._loop.set_task_factory(self._previous)
        self._loop, self._previous, self._newest = None, None, None

    def _make(
        self,
        loop: asyncio.AbstractEventLoop,
        coro: Coroutine[Any, Any, Any] | Generator[Any, None, Any],
        **kwargs: Any,
    ) -> asyncio.Future[Any]:
        if self._previous is not None:
            task: asyncio.Future[Any] = self._previous(loop, coro, **kwargs)
        else:
            task = asyncio.Task(coro, loop=loop, **kwargs)
        self._newest = weakref.ref(task)
        return task

    def is_current(self) -> bool:
        """True when the calling task is the last one the loop made: no task made after it waits to start. False
        when not installed, or when called outside a task."""
        task = asyncio.current_task()
        return task is not None and self._newest is not None and self._newest() is task


class Linger:
    """After a lone request, the loop keeps polling for `seconds` (from its next turn, once the answer is written)
    instead of sleeping, while `idle()`. One chain of callbacks at most: a request while it runs moves its end."""

    def __init__(
        self, seconds: float, idle: Callable[[], bool] = lambda: True, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.seconds = seconds
        self._idle = idle  # nothing in flight: with requests in flight the loop has work, and polling takes CPU from it
        self._clock = clock
        self._until = 0.0
        self._pending = False  # a request asked since the chain last looked
        self._running = False

    def request(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.seconds <= 0:
            return
        self._pending = True
        if not self._running:
            self._running = True
            loop.call_soon(self._poll, loop)

    def _poll(self, loop: asyncio.AbstractEventLoop) -> None:
        # A callback always ready to run makes the loop poll its sockets with a zero timeout instead of sleeping.
        now = self._clock()
        if self._pending:
            self._pending = False
            self._until = now + self.seconds
        if now < self._until and self._idle():
            loop.call_soon(self._poll, loop)
        else:
            self._running = False
