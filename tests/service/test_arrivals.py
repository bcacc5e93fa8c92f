"""service.arrivals: NewestTask (which task the event loop made last, and the loop's task factory given back) and
Linger (the loop polling for a while after a lone request instead of sleeping)."""

from __future__ import annotations

import asyncio

import pytest
from service_helpers import serve

from service.arrivals import Linger, NewestTask

pytestmark = pytest.mark.anyio


async def test_a_task_is_the_newest_until_the_loop_makes_another() -> None:
    newest = NewestTask()
    seen: dict[str, bool] = {}

    async def first() -> None:
        seen["first, alone"] = newest.is_current()
        second = asyncio.get_running_loop().create_task(later())  # made, not started yet
        seen["first, once another is made"] = newest.is_current()
        await second

    async def later() -> None:
        seen["second"] = newest.is_current()

    assert not newest.is_current()  # not installed: never the newest, so a request always yields its turn
    newest.install(asyncio.get_running_loop())
    try:
        await asyncio.ensure_future(first())
        loop = asyncio.get_running_loop()
        handle_saw: list[bool] = []
        loop.call_soon(lambda: handle_saw.append(newest.is_current()))  # a callback, outside any task
        await asyncio.sleep(0)
    finally:
        newest.uninstall()
    assert seen == {"first, alone": True, "first, once another is made": False, "second": True}
    assert handle_saw == [False]
    assert not newest.is_current()


async def test_the_previous_task_factory_still_makes_the_tasks_and_comes_back() -> None:
    loop = asyncio.get_running_loop()
    made: list[str] = []

    def previous(loop: asyncio.AbstractEventLoop, coro, **kwargs) -> asyncio.Task[None]:  # type: ignore[no-untyped-def]
        made.append(coro.__qualname__)
        return asyncio.Task(coro, loop=loop, **kwargs)

    async def job() -> bool:
        return newest.is_current()

    loop.set_task_factory(previous)
    newest = NewestTask()
    try:
        newest.install(loop)
        assert await loop.create_task(job()) is True
        assert made[-1].endswith("job")
        newest.uninstall()
        assert loop.get_task_factory() is previous
    finally:
        loop.set_task_factory(None)


async def test_the_server_makes_tasks_through_it_while_serving_and_a_lone_request_is_the_newest(settings_for) -> None:
    loop = asyncio.get_running_loop()
    before = loop.get_task_factory()
    async with serve(settings_for()) as (app, client):
        newest = app.state.registry.newest_task
        assert loop.get_task_factory() == newest._make
        batcher = app.state.registry.models["tiny"].batcher
        assert batcher._after_inline == app.state.registry.linger.request  # the settings' inline_linger_us
        assert app.state.registry.linger.seconds == pytest.approx(300e-6)
        seen: list[bool] = []
        batcher._latest = lambda: seen.append(newest.is_current()) or seen[-1]
        request = asyncio.ensure_future(client.post("/v1/decode", json={"latents": [[0.5, -0.5]]}))
        assert (await request).status_code == 200
        crowd = [client.post("/v1/decode", json={"latents": [[0.5, -0.5]]}) for _ in range(3)]
        assert all(r.status_code == 200 for r in await asyncio.gather(*crowd))
    assert seen[0] is True  # no task made after the request's own: it runs its forward without yielding first
    assert seen[1:].count(True) <= 1  # of requests made together, only the last made can be the newest
    assert loop.get_task_factory() is before


class Ticks:
    """A clock that moves one tick each time it is read, and counts the reads (one per poll of a Linger)."""

    def __init__(self) -> None:
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return float(self.reads - 1)


async def turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_linger_polls_once_a_turn_for_its_time_then_lets_the_loop_sleep() -> None:
    loop, clock = asyncio.get_running_loop(), Ticks()
    linger = Linger(10.0, clock=clock)
    linger.request(loop)
    await turns(30)
    assert clock.reads == 11  # read at ticks 0..10: the chain ends at tick 10, once its time is up
    await turns(5)
    assert clock.reads == 11  # and nothing polls any more


async def test_a_request_while_lingering_moves_the_end_and_starts_no_second_chain() -> None:
    loop, clock = asyncio.get_running_loop(), Ticks()
    linger = Linger(10.0, clock=clock)
    linger.request(loop)
    await turns(5)  # polls at ticks 0..4
    linger.request(loop)
    linger.request(loop)
    await turns(40)
    assert clock.reads == 16  # the poll at tick 5 moves the end to 15: one read a turn, never two
    linger.request(loop)  # after the chain ended: a new one
    await turns(40)
    assert clock.reads == 16 + 11


async def test_linger_of_zero_never_polls() -> None:
    clock = Ticks()
    Linger(0.0, clock=clock).request(asyncio.get_running_loop())
    await turns(5)
    assert clock.reads == 0


async def test_linger_stops_once_the_loop_has_requests_in_flight() -> None:
    loop, clock = asyncio.get_running_loop(), Ticks()
    busy = [False]
    linger = Linger(10.0, idle=lambda: not busy[0], clock=clock)
    linger.request(loop)
    await turns(3)  # polls at ticks 0..2
    busy[0] = True  # a request arrived: its own events wake the loop
    await turns(10)
    assert clock.reads == 4
