"""While new LumeFlows are still being taken up, the operator's Prefect calls wait a little
(`handlers.apply.Arrivals`): the first statuses of a mass apply go out before deployments."""

from __future__ import annotations

import asyncio

import pytest

from lume_operator.handlers.apply import Arrivals
from tests.unit.clock import Clock

pytestmark = pytest.mark.unit


def _arrivals(clock: Clock, slept: list[float]) -> Arrivals:
    async def sleep(seconds: float) -> None:
        slept.append(round(seconds, 3))
        clock.now += seconds

    return Arrivals(quiet=0.1, longest=5.0, clock=clock, sleep=sleep)


def test_calls_go_at_once_when_nothing_arrives():
    clock, slept = Clock(), []
    asyncio.run(_arrivals(clock, slept).settled())
    assert slept == []


def test_a_call_waits_until_no_new_object_came_for_the_quiet_time():
    clock, slept = Clock(), []
    arrivals = _arrivals(clock, slept)
    arrivals.seen()
    clock.now = 0.04
    asyncio.run(arrivals.settled())
    assert slept == [0.06] and clock.now == pytest.approx(0.1)


def test_objects_arriving_without_end_hold_a_call_back_for_the_longest_time_only():
    clock, slept = Clock(), []
    arrivals = _arrivals(clock, slept)

    async def sleep(seconds: float) -> None:  # one more object every 50 ms, for ever
        slept.append(seconds)
        clock.now += min(seconds, 0.05)
        arrivals.seen()

    arrivals.sleep = sleep
    arrivals.seen()
    asyncio.run(arrivals.settled())
    assert clock.now == pytest.approx(5.0)
