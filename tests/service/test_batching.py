"""MicroBatcher: grouping, order, splitting, isolation of failures, backpressure, timeouts, withdrawn work; and the
same behaviour through the app (forward calls counted with a spy, seeds independent of batch composition)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from service_helpers import as_tensor, assert_error, b64, digit_like, files, png, serve

from model import losses
from service.batching import BatchObserver, MicroBatcher
from service.errors import ClientDisconnected, InferenceTimeout, ModelNotReady, Overloaded

pytestmark = pytest.mark.anyio


class Forward:
    """A fake forward that records its calls; `gate` holds the first call until released."""

    def __init__(self, gate: threading.Event | None = None, fail_op: str | None = None) -> None:
        self.calls: list[tuple[str, int, str]] = []
        self.seen: list[float] = []
        self.gate = gate
        self.fail_op = fail_op

    def __call__(self, op: str, inputs: dict[str, torch.Tensor], arg: object) -> dict[str, torch.Tensor]:
        x = inputs["x"]
        self.calls.append((op, len(x), threading.current_thread().name))
        self.seen.extend(x[:, 0].tolist())
        if self.gate is not None and len(self.calls) == 1:
            assert self.gate.wait(10)
        if op == self.fail_op:
            raise ValueError("this op's forward failed")
        return {"y": x * 2 + (1 if op == "decode" else 0)}

    @property
    def sizes(self) -> list[int]:
        return [n for _, n, _ in self.calls]


@pytest.fixture
def executor():
    pool = ThreadPoolExecutor(1, thread_name_prefix="test-forward")
    yield pool
    pool.shutdown(wait=True)


def make(forward: Forward, executor, **kw) -> MicroBatcher:
    options = {
        "mergeable": frozenset({"encode", "decode"}),
        "max_batch_size": 64,
        "max_wait_ms": 0.0,
        "queue_size": 1024,
    }
    batcher = MicroBatcher("m", forward, executor, **{**options, **kw})
    batcher.start()
    return batcher


def rows(start: int, n: int = 1) -> dict[str, torch.Tensor]:
    return {"x": torch.arange(start, start + n, dtype=torch.float32).reshape(n, 1)}


async def until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


# -- the batcher on its own -------------------------------------------------------------------------------------------
async def test_an_idle_model_runs_a_request_at_once_and_batches_what_queues_meanwhile(executor) -> None:
    gate = threading.Event()
    forward = Forward(gate)
    batcher = make(forward, executor)
    try:
        first = asyncio.ensure_future(batcher.submit("encode", rows(0), timeout=10))
        await until(lambda: len(forward.calls) == 1)  # dispatched alone, without waiting for company
        rest = [asyncio.ensure_future(batcher.submit("encode", rows(i), timeout=10)) for i in range(1, 16)]
        await until(lambda: batcher.queued_images == 15)
        gate.set()
        results = await asyncio.gather(first, *rest)
    finally:
        gate.set()
        await batcher.stop()
    assert forward.sizes == [1, 15]  # 16 requests, 2 forward passes
    assert [float(r["y"][0, 0]) for r in results] == [2.0 * i for i in range(16)]  # each caller gets its own
    assert all(name.startswith("test-forward") for _, _, name in forward.calls)  # never on the event loop


async def test_max_wait_only_when_configured(executor) -> None:
    forward = Forward()
    batcher = make(forward, executor, max_wait_ms=400)
    try:
        started = time.monotonic()
        await batcher.submit("encode", rows(0), timeout=10)
        assert time.monotonic() - started >= 0.35  # a lone request waited for company
        together = [batcher.submit("encode", rows(i), timeout=10) for i in range(4)]
        await asyncio.gather(*together)
        assert forward.sizes == [1, 4]
    finally:
        await batcher.stop()
    quick = make(Forward(), executor, max_wait_ms=0)
    try:
        started = time.monotonic()
        await quick.submit("encode", rows(0), timeout=10)
        assert time.monotonic() - started < 0.35
    finally:
        await quick.stop()


async def test_large_requests_are_split_and_small_ones_merged_up_to_max_batch(executor) -> None:
    gate = threading.Event()
    forward = Forward(gate)
    batcher = make(forward, executor, max_batch_size=4)
    try:
        blocker = asyncio.ensure_future(batcher.submit("encode", rows(100), timeout=10))
        await until(lambda: len(forward.calls) == 1)
        big = asyncio.ensure_future(batcher.submit("encode", rows(0, 10), timeout=10))
        small = [asyncio.ensure_future(batcher.submit("encode", rows(50 + i, 1), timeout=10)) for i in range(3)]
        await until(lambda: batcher.queued_images == 13)
        gate.set()
        out = await big
        await asyncio.gather(blocker, *small)
    finally:
        gate.set()
        await batcher.stop()
    assert out["y"][:, 0].tolist() == [2.0 * i for i in range(10)]  # re-assembled in order
    assert max(forward.sizes) <= 4 and sum(forward.sizes) == 14
    assert forward.sizes[1:] == [4, 4, 4, 1]  # 4 | 4 | 2 + 2 small | 1 small


async def test_a_failing_forward_fails_only_its_own_call(executor) -> None:
    gate = threading.Event()
    forward = Forward(gate, fail_op="decode")
    batcher = make(forward, executor)
    try:
        blocker = asyncio.ensure_future(batcher.submit("encode", rows(0), timeout=10))
        await until(lambda: len(forward.calls) == 1)
        good = [asyncio.ensure_future(batcher.submit("encode", rows(i), timeout=10)) for i in range(1, 4)]
        bad = asyncio.ensure_future(batcher.submit("decode", rows(9), timeout=10))
        await until(lambda: batcher.queued_images == 4)
        gate.set()
        assert [float(r["y"][0, 0]) for r in await asyncio.gather(blocker, *good)] == [0.0, 2.0, 4.0, 6.0]
        with pytest.raises(ValueError, match="this op's forward failed"):
            await bad
    finally:
        gate.set()
        await batcher.stop()
    assert sorted(forward.sizes[1:]) == [1, 3]  # one batch hop, one call per op


async def test_unmergeable_ops_run_one_call_per_request(executor) -> None:
    forward = Forward()
    batcher = make(forward, executor)
    try:
        await asyncio.gather(*(batcher.submit("score", rows(i), arg=i, timeout=10) for i in range(3)))
    finally:
        await batcher.stop()
    assert forward.sizes == [1, 1, 1]


async def test_batching_off_gives_one_forward_per_request(executor) -> None:
    forward = Forward()
    batcher = make(forward, executor, batching=False)
    try:
        await asyncio.gather(*(batcher.submit("encode", rows(i), timeout=10) for i in range(6)))
    finally:
        await batcher.stop()
    assert forward.sizes == [1] * 6


async def test_a_full_queue_answers_overloaded(executor) -> None:
    """The domain error only: its Retry-After header is errors.py's (test_overload_over_http_... below)."""
    gate = threading.Event()
    forward = Forward(gate)
    batcher = make(forward, executor, queue_size=4)
    try:
        running = asyncio.ensure_future(batcher.submit("encode", rows(0), timeout=10))
        await until(lambda: len(forward.calls) == 1)
        queued = asyncio.ensure_future(batcher.submit("encode", rows(1, 4), timeout=10))
        await until(lambda: batcher.queued_images == 4)
        with pytest.raises(Overloaded) as info:
            await batcher.submit("encode", rows(5), timeout=10)
        assert "overloaded" in info.value.detail
        gate.set()
        await asyncio.gather(running, queued)
    finally:
        gate.set()
        await batcher.stop()


async def test_a_timed_out_request_leaves_no_work_behind(executor) -> None:
    gate = threading.Event()
    forward = Forward(gate)
    batcher = make(forward, executor)
    try:
        stuck = asyncio.ensure_future(batcher.submit("encode", rows(0), timeout=10))
        await until(lambda: len(forward.calls) == 1)
        with pytest.raises(InferenceTimeout, match="within 0.05 s"):
            await batcher.submit("encode", rows(7), timeout=0.05)
        gate.set()
        await stuck
        await batcher.submit("encode", rows(8), timeout=10)
    finally:
        gate.set()
        await batcher.stop()
    assert 7.0 not in forward.seen and 8.0 in forward.seen  # the timed-out item was skipped, not computed
    assert batcher.queued_images == 0


async def test_a_disconnected_client_withdraws_its_work(executor) -> None:
    gate = threading.Event()
    forward = Forward(gate)
    batcher = make(forward, executor)
    gone = asyncio.Event()

    async def disconnected() -> None:
        await gone.wait()

    try:
        stuck = asyncio.ensure_future(batcher.submit("encode", rows(0), timeout=10))
        await until(lambda: len(forward.calls) == 1)
        waiting = asyncio.ensure_future(batcher.submit("encode", rows(3), timeout=10, cancel_on=disconnected))
        await until(lambda: batcher.queued_images == 1)
        gone.set()
        with pytest.raises(ClientDisconnected):
            await waiting
        gate.set()
        await stuck
        await batcher.submit("encode", rows(4), timeout=10)
    finally:
        gate.set()
        await batcher.stop()
    assert 3.0 not in forward.seen and len(forward.calls) == 2


async def test_stop_fails_queued_work_and_refuses_new_work(executor) -> None:
    gate = threading.Event()
    forward = Forward(gate)
    batcher = make(forward, executor)
    running = asyncio.ensure_future(batcher.submit("encode", rows(0), timeout=10))
    await until(lambda: len(forward.calls) == 1)
    queued = asyncio.ensure_future(batcher.submit("encode", rows(1), timeout=10))
    await until(lambda: batcher.queued_images == 1)
    stopping = asyncio.ensure_future(batcher.stop())
    with pytest.raises(ModelNotReady):
        await queued
    gate.set()
    await stopping
    with pytest.raises(ModelNotReady):
        await running
    with pytest.raises(ModelNotReady):
        await batcher.submit("encode", rows(2), timeout=1)


# -- a lone small request on the event loop (inline_max_images) --------------------------------------------------------
class Observer(BatchObserver):
    def __init__(self) -> None:
        self.batches: list[tuple[str, int]] = []

    def batch(self, model: str, op: str, size: int, seconds: float) -> None:
        self.batches.append((op, size))


async def test_a_lone_small_request_runs_on_the_event_loop_when_asked(executor) -> None:
    forward, observer = Forward(), Observer()
    alone = [True]
    batcher = make(forward, executor, inline_max_images=2, alone=lambda: alone[0], observer=observer)
    loop_thread = threading.current_thread().name
    try:
        small = await batcher.submit("encode", rows(0, 2), timeout=10)
        large = await batcher.submit("encode", rows(2, 3), timeout=10)  # more than inline_max_images
        unmergeable = await batcher.submit("score", rows(5), timeout=10)  # its cost is not its image count
        alone[0] = False
        company = await batcher.submit("encode", rows(6), timeout=10)  # another request in the server
    finally:
        await batcher.stop()
    threads = [name for _, _, name in forward.calls]
    assert threads[0] == loop_thread
    assert all(name.startswith("test-forward") for name in threads[1:])
    assert small["y"].flatten().tolist() == [0.0, 2.0] and company["y"].flatten().tolist() == [12.0]
    assert large["y"].flatten().tolist() == [4.0, 6.0, 8.0] and unmergeable["y"].flatten().tolist() == [10.0]
    assert observer.batches == [("encode", 2), ("encode", 3), ("score", 1), ("encode", 1)]  # all in the metrics


async def test_a_lone_request_queues_behind_a_running_forward_and_its_errors_reach_it(executor) -> None:
    gate = threading.Event()
    forward = Forward(gate, fail_op="decode")
    batcher = make(forward, executor, inline_max_images=8, alone=lambda: True)
    try:
        first = asyncio.ensure_future(batcher.submit("encode", rows(0, 9), timeout=10))  # too big: the worker
        await until(lambda: len(forward.calls) == 1)
        second = asyncio.ensure_future(batcher.submit("encode", rows(9), timeout=10))  # the worker is busy: queued
        await until(lambda: batcher.queued_images == 1)
        gate.set()
        await asyncio.gather(first, second)
        with pytest.raises(ValueError, match="forward failed"):
            await batcher.submit("decode", rows(10), timeout=10)  # inline, failing: raised to its caller alone
        after = await batcher.submit("encode", rows(11), timeout=10)
    finally:
        gate.set()
        await batcher.stop()
    assert [(op, n) for op, n, _ in forward.calls] == [("encode", 9), ("encode", 1), ("decode", 1), ("encode", 1)]
    assert forward.calls[1][2].startswith("test-forward") and not forward.calls[2][2].startswith("test-forward")
    assert after["y"].flatten().tolist() == [22.0]


@pytest.mark.parametrize("latest", [True, False])
async def test_a_lone_request_yields_a_turn_of_the_loop_unless_no_task_was_made_after_it(executor, latest) -> None:
    """Before it runs on the event loop, a lone request lets requests that arrived with it start (and be counted),
    unless its task is the newest the loop made (service.arrivals): then none can be waiting, and it skips the turn.
    A request that is not alone waits the turn even then, as requests that found the model idle with it join it."""
    turns: list[bool] = []
    company = [False]

    class Watch(Forward):
        def __call__(self, op: str, inputs: dict[str, torch.Tensor], arg: object) -> dict[str, torch.Tensor]:
            turns.append(turned.is_set())
            return super().__call__(op, inputs, arg)

    forward = Watch()
    batcher = make(forward, executor, inline_max_images=2, alone=lambda: not company[0], latest=lambda: latest)
    loop = asyncio.get_running_loop()
    try:
        for with_company in (False, True):
            company[0] = with_company
            turned = asyncio.Event()
            loop.call_soon(turned.set)  # runs only if the request gives up a turn of the loop first
            await batcher.submit("encode", rows(0), timeout=10)
    finally:
        await batcher.stop()
    assert turns == [not latest, True]
    loop_thread = threading.current_thread().name
    assert [name == loop_thread for _, _, name in forward.calls] == [True, False]


async def test_the_loop_is_asked_to_linger_after_a_lone_request_on_it_only(executor) -> None:
    """after_inline (service.arrivals.Linger) is called with the running loop after a forward on the event loop, and
    never for a request that goes to the worker."""
    asked: list[asyncio.AbstractEventLoop] = []
    company = [False]
    batcher = make(
        Forward(),
        executor,
        inline_max_images=2,
        alone=lambda: not company[0],
        latest=lambda: True,
        after_inline=asked.append,
    )
    try:
        await batcher.submit("encode", rows(0), timeout=10)
        assert asked == [asyncio.get_running_loop()]
        company[0] = True
        await batcher.submit("encode", rows(1), timeout=10)
        await batcher.submit("encode", rows(2, 3), timeout=10)  # alone, but over inline_max_images
    finally:
        await batcher.stop()
    assert len(asked) == 1


# -- through the app --------------------------------------------------------------------------------------------------
class Spy:
    """Wraps a batcher's forward: counts calls and batch sizes; optionally holds the first call at a gate."""

    def __init__(self, forward, gate: threading.Event | None = None) -> None:
        self.forward, self.gate = forward, gate
        self.sizes: list[tuple[str, int]] = []
        self.threads: list[str] = []

    def __call__(self, op, inputs, arg):
        self.sizes.append((op, len(next(iter(inputs.values())))))
        self.threads.append(threading.current_thread().name)
        if self.gate is not None and len(self.sizes) == 1:
            assert self.gate.wait(10)
        return self.forward(op, inputs, arg)


def spy_on(app, gate: threading.Event | None = None, model: str = "tiny") -> tuple[Spy, MicroBatcher]:
    """A spy on `model`'s forward. With a gate, lone requests no longer run on the event loop (inline_max_images):
    a forward held at a gate there would hold the whole server."""
    batcher = app.state.registry.models[model].batcher
    spy = Spy(batcher._forward, gate)
    batcher._forward = spy
    if gate is not None:
        batcher._inline_max = 0
    return spy, batcher


@pytest.mark.parametrize("inline_max_images", [8, 0])
async def test_a_lone_request_runs_on_the_event_loop_unless_turned_off(settings_for, inline_max_images) -> None:
    async with serve(settings_for(inline_max_images=inline_max_images)) as (app, client):
        spy, _ = spy_on(app)
        loop_thread = threading.current_thread().name
        single = await client.post("/v1/decode", json={"latents": [[0.5, -0.5]]})
        many = await client.post("/v1/decode", json={"latents": [[0.5, -0.5]] * 9})  # over inline_max_images
    assert single.status_code == many.status_code == 200
    assert single.json()["images"][0] == many.json()["images"][8]  # the same answer either way
    on_loop = [name == loop_thread for name in spy.threads]
    assert on_loop == ([True, False] if inline_max_images else [False, False])
    assert spy.sizes == [("decode", 1), ("decode", 9)]


async def test_concurrent_requests_share_forward_passes(served, tiny_model) -> None:
    app, client = served
    gate = threading.Event()
    spy, batcher = spy_on(app, gate)
    images = [digit_like(i) for i in range(12)]
    try:
        tasks = [asyncio.ensure_future(client.post("/v1/encode", files=files(png(images[0]))))]
        await until(lambda: len(spy.sizes) == 1)
        tasks += [asyncio.ensure_future(client.post("/v1/encode", files=files(png(a)))) for a in images[1:]]
        await until(lambda: batcher.queued_images == 11)
        gate.set()
        responses = await asyncio.gather(*tasks)
    finally:
        gate.set()
    assert len(spy.sizes) < len(images) and spy.sizes == [("encode", 1), ("encode", 11)]
    mu = tiny_model.encode(as_tensor(images))[0]
    for i, r in enumerate(responses):
        assert r.status_code == 200
        torch.testing.assert_close(torch.tensor(r.json()["results"][0]["mu"]), mu[i], atol=1e-5, rtol=1e-5)


async def test_an_invalid_request_never_fails_its_batch_mates(served, tiny_model) -> None:
    app, client = served
    gate = threading.Event()
    spy, batcher = spy_on(app, gate)
    good = [digit_like(i) for i in range(4)]
    try:
        blocker = asyncio.ensure_future(client.post("/v1/encode", files=files(png(good[0]))))
        await until(lambda: len(spy.sizes) == 1)
        tasks = [asyncio.ensure_future(client.post("/v1/encode", files=files(png(a)))) for a in good[1:]]
        tasks.insert(1, asyncio.ensure_future(client.post("/v1/encode", files=files(b"not an image"))))
        tasks.insert(3, asyncio.ensure_future(client.post("/v1/decode", json={"latents": [[0.0, 1.0, 2.0]]})))
        tasks.append(asyncio.ensure_future(client.post("/v1/decode", json={"latents": [[0.5, 0.5]]})))
        await until(lambda: batcher.queued_images == 4)
        gate.set()
        responses = await asyncio.gather(blocker, *tasks)
    finally:
        gate.set()
    statuses = [r.status_code for r in responses]
    assert statuses == [200, 200, 400, 200, 422, 200, 200]
    mu = tiny_model.encode(as_tensor(good))[0]
    for i, r in zip(range(4), [responses[0], responses[1], responses[3], responses[5]], strict=True):
        torch.testing.assert_close(torch.tensor(r.json()["results"][0]["mu"]), mu[i], atol=1e-5, rtol=1e-5)
    assert sorted(spy.sizes[1:]) == [("decode", 1), ("encode", 3)]


async def test_seeded_results_do_not_depend_on_batch_composition(served, tiny_model) -> None:
    app, client = served
    images = [digit_like(i) for i in range(3)]
    payloads = {
        "/v1/encode": {"images": [b64(png(a)) for a in images], "sample": True, "seed": 5},
        "/v1/reconstruct": {"images": [b64(png(a)) for a in images], "seed": 5, "encoding": "pixels"},
        "/v1/score": {"images": [b64(png(a)) for a in images], "seed": 5, "k": 16},
    }
    alone = {path: (await client.post(path, json=body)).json() for path, body in payloads.items()}
    gate = threading.Event()
    spy, batcher = spy_on(app, gate)
    noise = [{"images": [b64(png(digit_like(10 + i)))], "sample": True, "seed": i} for i in range(5)]
    try:
        blocker = asyncio.ensure_future(client.post("/v1/encode", json=noise[0]))
        await until(lambda: len(spy.sizes) == 1)
        crowd = [asyncio.ensure_future(client.post("/v1/encode", json=body)) for body in noise[1:]]
        crowd += [
            asyncio.ensure_future(client.post("/v1/reconstruct", json={"images": body["images"], "seed": 1}))
            for body in noise
        ]
        mine = {path: asyncio.ensure_future(client.post(path, json=body)) for path, body in payloads.items()}
        await until(lambda: batcher.queued_images == 4 + 5 + 9)
        gate.set()
        assert all(r.status_code == 200 for r in await asyncio.gather(blocker, *crowd))
        batched = {path: (await task).json() for path, task in mine.items()}
    finally:
        gate.set()
    assert any(n > 3 for _, n in spy.sizes)  # they really were batched with others
    for path in payloads:
        for got, expected in zip(batched[path]["results"], alone[path]["results"], strict=True):
            for key, value in expected.items():
                torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(value), atol=1e-5, rtol=1e-5)
    g = torch.Generator().manual_seed(5)
    x = torch.bernoulli(as_tensor(images), generator=g)
    elbo = losses.elbo(tiny_model, x, generator=g).elbo
    got = torch.tensor([r["elbo"] for r in batched["/v1/reconstruct"]["results"]])
    torch.testing.assert_close(got, elbo, atol=1e-5, rtol=1e-5)


async def test_overload_and_timeout_over_http(settings_for) -> None:
    async with serve(settings_for(queue_size=2, request_timeout_s=0.3, retry_after_s=3)) as (app, client):
        gate = threading.Event()
        spy, batcher = spy_on(app, gate)
        try:
            stuck = asyncio.ensure_future(client.post("/v1/decode", json={"latents": [[0, 0]]}))
            await until(lambda: len(spy.sizes) == 1)
            waiting = asyncio.ensure_future(client.post("/v1/decode", json={"latents": [[0, 0], [1, 1]]}))
            await until(lambda: batcher.queued_images == 2)
            r = await client.post("/v1/decode", json={"latents": [[0, 0]]})
            assert_error(r, 503, "overloaded", "retry later")
            assert r.headers["retry-after"] == "3"
            assert_error(await waiting, 504, "timeout", "0.3 s")
            assert_error(await stuck, 504, "timeout")
        finally:
            gate.set()
        await until(lambda: batcher.queued_images == 0)
        assert (await client.post("/v1/decode", json={"latents": [[0, 0]]})).status_code == 200
        metrics = (await client.get("/metrics")).text
        assert 'path="/v1/decode",status="503"} 1.0' in metrics and 'path="/v1/decode",status="504"} 2.0' in metrics


async def test_a_client_that_disconnects_leaves_no_work_behind(served) -> None:
    """Raw ASGI, as a server would drive it: the body arrives, then the client goes away while queued."""
    app, client = served
    gate = threading.Event()
    spy, batcher = spy_on(app, gate)
    body = b'{"latents": [[0.25, 0.75]]}'
    gone = asyncio.Event()
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/decode",
        "raw_path": b"/v1/decode",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1234),
        "server": ("test", 80),
        "state": {},
    }
    try:
        stuck = asyncio.ensure_future(client.post("/v1/decode", json={"latents": [[0, 0]]}))
        await until(lambda: len(spy.sizes) == 1)
        handler = asyncio.ensure_future(app(scope, receive, send))
        await until(lambda: batcher.queued_images == 1)
        gone.set()
        await asyncio.wait_for(handler, 5)  # the handler returns without waiting for the model
        gate.set()
        assert (await stuck).status_code == 200
        assert (await client.post("/v1/decode", json={"latents": [[1, 1]]})).status_code == 200
    finally:
        gate.set()
    assert spy.sizes == [("decode", 1), ("decode", 1)]  # the withdrawn request never reached the model
    assert sent[0]["status"] == 499
