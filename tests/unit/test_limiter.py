"""The concurrency to one Prefect API follows its latency: grows while answers stay fast,
shrinks as they slow down, halves on overload, and never lets more calls through than it says."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from lume_operator.prefect.limiter import AdaptiveLimit

from .clock import Clock

pytestmark = pytest.mark.unit


def _load(limit: AdaptiveLimit, clock: Clock, latency: float, calls: int) -> None:
    """`calls` calls, each with the limit fully used, each answered after `latency`."""
    for _ in range(calls):
        started = clock.now
        clock.now += latency
        limit.observe(started, busy=limit.slots)


def test_fast_answers_under_load_grow_the_limit_to_its_maximum():
    clock = Clock()
    limit = AdaptiveLimit(initial=8, maximum=40, clock=clock)
    _load(limit, clock, 0.01, 30)
    assert 8 < limit.limit < 40  # it grows, not at once
    _load(limit, clock, 0.01, 200)
    assert limit.limit == 40


def test_idle_calls_are_no_evidence_to_grow_on():
    clock = Clock()
    limit = AdaptiveLimit(initial=8, clock=clock)
    for _ in range(200):
        started = clock.now
        clock.now += 0.01
        limit.observe(started, busy=1)  # one call at a time: the limit held nothing back
    assert limit.limit == 8


def test_latency_far_above_the_baseline_shrinks_the_limit():
    clock = Clock()
    limit = AdaptiveLimit(initial=32, maximum=64, clock=clock)
    _load(limit, clock, 0.01, 1)  # the unloaded answer time
    _load(limit, clock, 0.2, 60)  # 20x: the server queues
    # At 20x the gradient is at its floor (0.5): the limit settles where halving it and its
    # square root's headroom balance, about 4 calls instead of 32.
    assert 3 <= limit.limit <= 5
    # Latency back near the baseline: it grows again.
    before = limit.limit
    _load(limit, clock, 0.012, 20)
    assert limit.limit > before + 3


def test_latency_within_tolerance_keeps_growing_beyond_it_settles():
    clock = Clock()
    limit = AdaptiveLimit(initial=8, maximum=64, clock=clock)
    _load(limit, clock, 0.01, 1)
    _load(limit, clock, 0.019, 100)  # under 2x the baseline: fine
    assert limit.limit == 64
    _load(limit, clock, 0.03, 300)  # 3x: shrinks to where the gradient meets the headroom
    assert limit.limit < 40


def test_an_overload_halves_the_limit_once_per_round_trip():
    clock = Clock()
    limit = AdaptiveLimit(initial=16, clock=clock)
    started = clock.now  # five calls in flight together, all timing out
    clock.now += 10.0
    for _ in range(5):
        limit.observe(started, busy=5, overloaded=True)
    assert limit.limit == 8
    started = clock.now  # a call started after the cut: a new signal
    clock.now += 10.0
    limit.observe(started, busy=1, overloaded=True)
    assert limit.limit == 4
    for _ in range(10):
        started = clock.now
        clock.now += 1.0
        limit.observe(started, busy=1, overloaded=True)
    assert limit.limit == limit.minimum == 1


def test_the_slot_reports_an_overload_the_caller_flags():
    async def scenario() -> None:
        clock = Clock()
        limit = AdaptiveLimit(initial=16, clock=clock)
        with pytest.raises(TimeoutError):
            async with limit.slot() as sample:
                clock.now += 10.0
                sample.overload()
                raise TimeoutError
        assert limit.limit == 8 and limit.in_flight == 0

    anyio.run(scenario)


def test_a_refusal_is_not_an_overload():
    async def scenario() -> None:
        clock = Clock()
        limit = AdaptiveLimit(initial=16, clock=clock)
        with pytest.raises(ValueError):
            async with limit.slot():
                clock.now += 0.01
                raise ValueError("422")
        assert limit.limit == 16

    anyio.run(scenario)


def test_never_more_calls_in_flight_than_the_limit_and_every_waiter_runs():
    async def scenario() -> None:
        limit = AdaptiveLimit(initial=3, maximum=3)
        seen: list[int] = []
        done: list[int] = []

        async def call(i: int) -> None:
            async with limit.slot():
                seen.append(limit.in_flight)
                await asyncio.sleep(0.001 * (i % 4))
                done.append(i)

        await asyncio.gather(*(call(i) for i in range(50)))
        assert sorted(done) == list(range(50))
        assert max(seen) == 3 == limit.peak
        assert limit.in_flight == 0

    asyncio.run(scenario())


def test_a_caller_cancelled_while_waiting_gives_its_place_up():
    async def scenario() -> None:
        limit = AdaptiveLimit(initial=1, minimum=1, maximum=1)
        release = asyncio.Event()

        async def holder() -> None:
            async with limit.slot():
                await release.wait()

        first = asyncio.create_task(holder())
        await asyncio.sleep(0)
        waiting = asyncio.create_task(holder())
        await asyncio.sleep(0)
        assert len(limit._waiters) == 1
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        release.set()
        await first
        assert limit.in_flight == 0 and not limit._waiters
        async with limit.slot():  # the slot is free again
            assert limit.in_flight == 1

    asyncio.run(scenario())


def test_a_call_waits_at_the_gate_holding_its_slot_and_the_wait_is_not_latency():
    async def scenario() -> None:
        clock = Clock()
        opened = asyncio.Event()
        limit = AdaptiveLimit(initial=2, maximum=2, clock=clock, gate=opened.wait)
        entered: list[int] = []

        async def call(i: int) -> None:
            async with limit.slot():
                entered.append(i)
                clock.now += 0.01

        tasks = [asyncio.create_task(call(i)) for i in range(3)]
        await asyncio.sleep(0.01)
        assert entered == [] and limit.in_flight == 2 and len(limit._waiters) == 1
        clock.now += 30.0  # a long hold at the gate
        opened.set()
        await asyncio.gather(*tasks)
        assert sorted(entered) == [0, 1, 2] and limit.in_flight == 0
        assert limit.baseline == pytest.approx(0.01)  # the server's time, not the gate's

    asyncio.run(scenario())


def test_a_caller_cancelled_at_the_gate_gives_its_slot_back():
    async def scenario() -> None:
        limit = AdaptiveLimit(initial=1, minimum=1, maximum=1, gate=asyncio.Event().wait)

        async def call() -> None:
            async with limit.slot():
                raise AssertionError("the gate never opens")

        held = asyncio.create_task(call())
        await asyncio.sleep(0)
        assert limit.in_flight == 1
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held
        assert limit.in_flight == 0 and limit.limit == 1

    asyncio.run(scenario())


def test_bounds_are_checked():
    with pytest.raises(ValueError, match="minimum <= initial <= maximum"):
        AdaptiveLimit(initial=100, maximum=10)
