"""MicroBatcher: concurrent requests for one model grouped into batched forward passes on one worker thread.

The worker takes whatever is queued the moment the previous forward finishes (up to max_batch_size images), so an
idle model answers a lone request at once and batches form from what arrives while a forward runs. With
max_wait_ms > 0 it also waits that long for a batch to fill. Forward passes run in a ThreadPoolExecutor(1) shared
by the models on one device.

One exception, for latency: with `inline_max_images` > 0, a request of that many images or fewer that finds the
batcher idle (nothing queued, no forward running) and is alone in the server (`alone()`) runs its forward on the
event loop itself. A lone request has nothing to batch with; the two hand-offs to and from the worker thread cost
time and keep torch's OpenMP helper thread spinning (one-client encode p50 1.16 -> 0.98 ms on 2 cores; section 00000
of docs/benchmarks.md). A request arriving meanwhile waits at most that one small forward, as it would behind a batch.
Requests that arrived with it start first, so that `alone()` counts them: it yields one turn of the loop, unless it
is alone and `latest()` says that no task was made after its own (service.arrivals), so that none can be waiting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch

from service.errors import ClientDisconnected, InferenceTimeout, ModelNotReady, Overloaded

logger = logging.getLogger("vae_serve")

Tensors = dict[str, torch.Tensor]
WATCH_AFTER_S = 0.05  # a request waiting longer than this starts watching for its client's disconnect
Forward = Callable[[str, Tensors, Any], Tensors]


@dataclass(eq=False)
class Item:
    """One unit of queued work: `size` images of one op, and the future its caller awaits."""

    op: str
    inputs: Tensors
    arg: Any
    size: int
    group: Hashable
    future: asyncio.Future[Tensors] = field(repr=False)


class BatchObserver:
    """Hooks for metrics; the default does nothing."""

    def batch(self, model: str, op: str, size: int, seconds: float) -> None: ...

    def queue_depth(self, model: str, images: int) -> None: ...


class MicroBatcher:
    """Queues work for one model and runs it in batches.

    `submit(op, inputs, arg)` splits `inputs` (tensors sharing a leading dimension n) into items of at most
    max_batch_size images, queues them, and returns the outputs of `forward` re-assembled in input order.
    Items of a mergeable op (and the same input keys) share one `forward(op, inputs, arg)` call across requests;
    other items run one call each, in the same batch hop.

    Raises Overloaded (queue full), InferenceTimeout (no result within `timeout`), ModelNotReady (not started or
    stopping); an exception from `forward` reaches only the requests whose items were in the failing call.
    """

    def __init__(
        self,
        name: str,
        forward: Forward,
        executor: Executor,
        *,
        mergeable: frozenset[str],
        max_batch_size: int,
        max_wait_ms: float,
        queue_size: int,
        batching: bool = True,
        observer: BatchObserver | None = None,
        inline_max_images: int = 0,
        alone: Callable[[], bool] = lambda: False,
        latest: Callable[[], bool] = lambda: False,
        after_inline: Callable[[asyncio.AbstractEventLoop], None] = lambda loop: None,
    ) -> None:
        self.name = name
        self._forward = forward
        self._executor = executor
        self._mergeable = mergeable
        self._max_batch = max_batch_size
        self._max_wait = max_wait_ms / 1000.0
        self._queue_size = queue_size
        self._batching = batching
        self._observer = observer or BatchObserver()
        self._inline_max = inline_max_images
        self._alone = alone
        self._latest = latest
        self._after_inline = after_inline
        self._forwarding = False  # a batch is in the worker thread
        self._queue: deque[Item] = deque()
        self._queued = 0  # images waiting
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._stopping = False
        self._observer.queue_depth(self.name, self._queued)  # the gauge exists before anything queues (or ever does)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Fail what is queued with ModelNotReady and stop the worker (a forward in flight finishes first)."""
        self._stopping = True
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(ModelNotReady("the server is shutting down"))
        self._queued = 0
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    @property
    def queued_images(self) -> int:
        return self._queued

    # -- the caller's side -------------------------------------------------------------------------------------------
    async def submit(
        self,
        op: str,
        inputs: Tensors,
        arg: Any = None,
        *,
        timeout: float,
        cancel_on: Callable[[], Awaitable[Any]] | None = None,
    ) -> Tensors:
        """Queue `inputs` and wait for the outputs. `cancel_on()` (e.g. "the client disconnected"): when it completes
        first, the request's items are withdrawn (a queued item is then skipped) and ClientDisconnected is raised."""
        if self._task is None or self._stopping:
            raise ModelNotReady(f"model {self.name!r} is not ready")
        n = next(iter(inputs.values())).shape[0]
        mergeable = op in self._mergeable
        if mergeable and n <= self._inline_max and self._idle():
            if not (self._latest() and self._alone()):
                # Requests that arrived with this one start first, and are seen by alone(). A request that will queue
                # anyway waits the turn too: those that found the model idle with it then join its batch.
                await asyncio.sleep(0)
            if self._idle() and self._alone():
                return self._forward_inline(op, inputs, arg, n)
        if mergeable and n > self._max_batch:
            chunks = [{k: v[i : i + self._max_batch] for k, v in inputs.items()} for i in range(0, n, self._max_batch)]
        else:
            chunks = [inputs]
        if self._queued + n > self._queue_size:
            raise Overloaded(f"model {self.name!r} is overloaded ({self._queued} images queued); retry later")
        loop = asyncio.get_running_loop()
        group: Hashable = (op, tuple(sorted(inputs))) if mergeable and self._batching else object()
        items = []
        for chunk in chunks:
            size = next(iter(chunk.values())).shape[0]
            item = Item(op, chunk, arg, size, group if mergeable else object(), loop.create_future())
            items.append(item)
            self._queue.append(item)
        self._queued += n
        self._observer.queue_depth(self.name, self._queued)
        self._wakeup.set()
        return await self._wait(items, timeout, cancel_on)

    async def _wait(self, items: list[Item], timeout: float, cancel_on: Callable[[], Awaitable[Any]] | None) -> Tensors:
        futures = [item.future for item in items]
        joined: asyncio.Future[Any] = futures[0] if len(futures) == 1 else asyncio.gather(*futures)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        watcher: asyncio.Future[Any] | None = None
        timer: asyncio.TimerHandle

        def fail(error: Exception) -> None:
            if not joined.done():
                joined.set_exception(error)  # the worker skips items whose future is done: withdrawn

        def time_out() -> None:
            fail(InferenceTimeout(f"no result from model {self.name!r} within {timeout:g} s"))

        def on_disconnect(watch: asyncio.Future[Any]) -> None:
            if not watch.cancelled():
                watch.exception()  # retrieved: a watch that failed counts as a disconnect too
                fail(ClientDisconnected("the client disconnected before the result was ready"))

        def watch_client() -> None:
            # Most requests are answered within a forward pass or two: only those still waiting after WATCH_AFTER_S
            # get a task watching for the client going away, and a timer for the rest of the timeout.
            nonlocal timer, watcher
            assert cancel_on is not None
            watcher = asyncio.ensure_future(cancel_on())
            watcher.add_done_callback(on_disconnect)
            timer = loop.call_at(deadline, time_out)

        # One timer per request: a plain await on the result otherwise (asyncio.wait costs several times more).
        if cancel_on is not None and timeout > WATCH_AFTER_S:
            timer = loop.call_later(WATCH_AFTER_S, watch_client)
        else:
            timer = loop.call_later(timeout, time_out)
        try:
            result = await joined
        except BaseException:
            self._withdraw(futures)
            raise
        finally:
            timer.cancel()
            if watcher is not None and not watcher.done():
                watcher.cancel()
        if len(futures) == 1:
            return result  # type: ignore[no-any-return]
        parts: list[Tensors] = result
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def _idle(self) -> bool:
        return not self._queue and not self._forwarding and self._task is not None and not self._stopping

    def _forward_inline(self, op: str, inputs: Tensors, arg: Any, n: int) -> Tensors:
        """A lone small request's forward, on the event loop (see the module's docstring): the worker's own
        _execute, for one item, so that it is timed, counted and logged as every batch is."""
        loop = asyncio.get_running_loop()
        item = Item(op, inputs, arg, n, None, loop.create_future())
        (result,) = self._execute([[item]])
        self._after_inline(loop)  # service.arrivals.Linger: the loop stays awake for the next request a moment
        if isinstance(result, BaseException):
            raise result
        out = result[0]
        assert out is not None, "a lone item is never withdrawn while it runs"
        return out

    @staticmethod
    def _withdraw(futures: list[asyncio.Future[Tensors]]) -> None:
        for f in futures:
            f.cancel()  # a no-op for finished ones; a queued item whose future is cancelled is skipped

    # -- the worker's side -------------------------------------------------------------------------------------------
    async def _next_batch(self) -> list[Item]:
        while not self._queue:
            self._wakeup.clear()
            await self._wakeup.wait()
        batch: list[Item] = []
        size = 0
        deadline: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            while self._queue:
                head = self._queue[0]
                if head.future.done():  # withdrawn (timed out or disconnected) while queued
                    self._queue.popleft()
                    self._queued -= head.size
                    continue
                if batch and (not self._batching or size + head.size > self._max_batch):
                    break
                self._queue.popleft()
                self._queued -= head.size
                batch.append(head)
                size += head.size
            full = not self._batching or size >= self._max_batch or bool(self._queue)
            if full or self._max_wait <= 0:
                break
            if deadline is None:
                deadline = loop.time() + self._max_wait
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                break
        self._observer.queue_depth(self.name, self._queued)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            live = [item for item in batch if not item.future.done()]
            if not live:
                continue
            calls: dict[Hashable, list[Item]] = {}
            for item in live:
                calls.setdefault(item.group, []).append(item)
            self._forwarding = True
            try:
                results = await loop.run_in_executor(self._executor, self._execute, list(calls.values()))
            except asyncio.CancelledError:
                for item in live:
                    if not item.future.done():
                        item.future.set_exception(ModelNotReady("the server is shutting down"))
                raise
            except Exception as e:  # the executor itself failed (e.g. shut down)
                logger.error("batch for model %r could not run: %s", self.name, e)
                results = [e] * len(calls)
            finally:
                self._forwarding = False
            for items, result in zip(calls.values(), results, strict=True):
                if isinstance(result, BaseException):
                    for item in items:
                        if not item.future.done():
                            item.future.set_exception(result)
                else:
                    for item, out in zip(items, result, strict=True):
                        if out is not None and not item.future.done():
                            item.future.set_result(out)

    def _execute(self, calls: list[list[Item]]) -> list[list[Tensors | None] | BaseException]:
        """Worker thread: one forward per call; each call's outputs split back into its items (None for an item
        withdrawn since the batch formed: it is dropped before the forward runs)."""
        results: list[list[Tensors | None] | BaseException] = []
        for items in calls:
            live = [item for item in items if not item.future.done()]  # done already: withdrawn since queued
            if not live:
                results.append([None] * len(items))
                continue
            first = live[0]
            try:
                if len(live) == 1:
                    inputs = first.inputs
                else:
                    inputs = {k: torch.cat([item.inputs[k] for item in live]) for k in first.inputs}
                started = time.perf_counter()
                out = self._forward(first.op, inputs, first.arg)
                sizes = [item.size for item in live]
                self._observer.batch(self.name, first.op, sum(sizes), time.perf_counter() - started)
                if len(live) == 1:  # whole: an unmergeable op's outputs need not have one row per input
                    by_item = {id(first): out}
                else:
                    split = {k: torch.split(v, sizes) for k, v in out.items()}
                    by_item = {id(item): {k: split[k][j] for k in out} for j, item in enumerate(live)}
                results.append([by_item.get(id(item)) for item in items])
            except Exception as e:
                logger.error("forward %s for model %r failed: %s: %s", first.op, self.name, type(e).__name__, e)
                results.append(e)
        return results
