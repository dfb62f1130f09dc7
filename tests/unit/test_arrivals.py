"""While new LumeFlows arrive in a burst, the operator's Prefect calls wait a little
(`handlers.apply.Arrivals`): the first statuses of a mass apply go out before deployments."""

from __future__ import annotations

import asyncio

import pytest

from lume_operator.handlers.apply import Arrivals, State
from lume_operator.prefect.limiter import AdaptiveLimit
from lume_operator.settings import OperatorSettings
from tests.unit.clock import Clock

pytestmark = pytest.mark.unit


def _arrivals(clock: Clock, slept: list[float]) -> Arrivals:
    async def sleep(seconds: float) -> None:
        slept.append(round(seconds, 3))
        clock.now += seconds

    return Arrivals(quiet=0.5, longest=5.0, clock=clock, sleep=sleep)


def test_calls_go_at_once_when_nothing_arrives():
    clock, slept = Clock(), []
    asyncio.run(_arrivals(clock, slept).settled())
    assert slept == []


def test_a_single_new_object_holds_no_call_back():
    clock, slept = Clock(), []
    arrivals = _arrivals(clock, slept)
    arrivals.seen()
    clock.now = 0.04
    asyncio.run(arrivals.settled())
    assert slept == [] and clock.now == 0.04


def test_in_a_burst_a_call_waits_until_no_new_object_came_for_the_quiet_time():
    clock, slept = Clock(), []
    arrivals = _arrivals(clock, slept)
    arrivals.seen()
    clock.now = 0.4
    arrivals.seen()
    clock.now = 0.5
    asyncio.run(arrivals.settled())
    assert slept == [0.4] and clock.now == pytest.approx(0.9)


def test_objects_apart_by_more_than_the_quiet_time_make_no_burst():
    clock, slept = Clock(), []
    arrivals = _arrivals(clock, slept)
    arrivals.seen()
    clock.now = 0.55
    arrivals.seen()
    asyncio.run(arrivals.settled())
    assert slept == []


def test_objects_arriving_without_end_hold_calls_back_until_the_longest_time_after_the_first():
    clock, slept = Clock(), []
    arrivals = _arrivals(clock, slept)

    async def sleep(seconds: float) -> None:  # one more object every 50 ms, for ever
        slept.append(seconds)
        clock.now += min(seconds, 0.05)
        arrivals.seen()

    arrivals.sleep = sleep
    arrivals.seen()
    arrivals.seen()
    asyncio.run(arrivals.settled())
    assert clock.now == pytest.approx(5.0)
    asyncio.run(arrivals.settled())  # a later call in the same endless burst waits no more
    assert clock.now == pytest.approx(5.0)


def test_one_caller_times_the_quiet_for_all_that_wait():
    clock, slept = Clock(), []
    arrivals = _arrivals(clock, slept)

    async def sleep(seconds: float) -> None:
        slept.append(round(seconds, 3))
        await asyncio.sleep(0)  # the other callers come in meanwhile
        clock.now += seconds

    arrivals.sleep = sleep
    arrivals.seen()
    arrivals.seen()

    async def many() -> None:
        await asyncio.gather(*(arrivals.settled() for _ in range(100)))

    asyncio.run(many())
    assert slept == [0.5] and clock.now == pytest.approx(0.5)


def test_when_the_caller_timing_the_quiet_is_cancelled_another_takes_over():
    clock = Clock()
    arrivals = Arrivals(clock=clock)
    timing: list[asyncio.Task[None]] = []

    async def sleep(seconds: float) -> None:
        timing.append(asyncio.current_task())  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        clock.now += seconds

    arrivals.sleep = sleep
    arrivals.seen()
    arrivals.seen()

    async def both() -> None:
        first = asyncio.create_task(arrivals.settled())
        await asyncio.sleep(0)  # the first takes the timing
        second = asyncio.create_task(arrivals.settled())
        await asyncio.sleep(0)
        first.cancel()
        await asyncio.wait_for(second, timeout=5)
        assert first.cancelled() and second.done() and not second.cancelled()

    asyncio.run(both())
    assert len(set(timing)) == 2 and clock.now == pytest.approx(arrivals.quiet)


def test_a_call_that_gets_its_slot_after_the_burst_resumed_waits_again():
    """The hold is per call, at each call's slot: the calls queued behind the limit when the API
    server pauses for longer than the quiet time do not all go while the apply goes on."""
    clock, slept = Clock(), []
    arrivals = _arrivals(clock, slept)
    arrivals.quiet = 0.1
    limit = AdaptiveLimit(initial=1, minimum=1, maximum=1, clock=clock, gate=arrivals.settled)
    went: list[tuple[str, float]] = []

    async def call(name: str, *, burst_resumes: bool = False) -> None:
        async with limit.slot():
            went.append((name, round(clock.now, 3)))
            if burst_resumes:  # two more objects arrive while this call is in flight
                clock.now += 0.05
                arrivals.seen()
                arrivals.seen()

    async def both() -> None:
        await asyncio.gather(call("a", burst_resumes=True), call("b"))

    arrivals.seen()
    arrivals.seen()
    asyncio.run(both())
    assert went == [("a", 0.1), ("b", 0.25)] and slept == [0.1, 0.1]


def test_the_operator_holds_every_call_to_a_prefect_api_at_its_limit():
    async def scenario() -> None:
        state = State(settings=OperatorSettings(), kube=None)  # type: ignore[arg-type]
        try:
            await state._gateway("http://127.0.0.1:9/api", None, None)
        finally:
            await state.close()
        assert state.limits["http://127.0.0.1:9/api"].gate == state.arrivals.settled

    asyncio.run(scenario())
