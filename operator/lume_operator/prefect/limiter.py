"""How many calls the operator has in flight to one Prefect API: a limit that follows the
server's latency instead of a fixed number.

A fixed limit is wrong both ways: a PostgreSQL server on a big machine takes many more than 8
calls at once, while a SQLite server takes one writer at a time, so 8 concurrent writes wait
on each other and can take longer than the same 8 in a row. `AdaptiveLimit` is a gradient limiter (the
idea of Netflix's concurrency-limits, Gradient2; TCP Vegas before it): the shortest latency
seen in the last minutes is the server's unloaded answer time; while calls come back within `tolerance`
times that, the limit grows (by about the square root of itself per `1/smoothing` calls);
as latency rises beyond it, the limit shrinks in proportion; an overload (a timeout, 429 or
5xx) halves it, once per round trip. Waiting for a slot happens before a call's own timeout
starts, so a mass apply queues here rather than timing out in Prefect.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field


@dataclass
class Sample:
    """What the caller says of one call: overloaded, or not (a refusal is not overload)."""

    overloaded: bool = False

    def overload(self) -> None:
        self.overloaded = True


@dataclass
class AdaptiveLimit:
    initial: int = 8
    minimum: int = 1
    maximum: int = 64
    tolerance: float = 2.0
    smoothing: float = 0.2
    # The baseline is the shortest latency of this window and the one before it, so a server
    # that became slower for good (bigger objects, another tenant) is relearned in time, and
    # a queue that builds within minutes is not mistaken for the server's own speed.
    window: float = 300.0
    clock: Callable[[], float] = time.monotonic
    # Awaited by every call once it holds its slot, before its latency counts: the operator
    # holds calls back while a burst of new objects arrives (`handlers.apply.Arrivals`).
    gate: Callable[[], Awaitable[None]] | None = None
    limit: float = field(init=False)
    in_flight: int = field(init=False, default=0)
    baseline: float | None = field(init=False, default=None)
    _window_start: float = field(init=False, default=float("-inf"))
    _window_min: float = field(init=False, default=float("inf"))
    _previous_min: float = field(init=False, default=float("inf"))
    peak: int = field(init=False, default=0)
    _cut_at: float = field(init=False, default=float("-inf"))
    _waiters: collections.deque[asyncio.Future[None]] = field(
        init=False, default_factory=collections.deque
    )

    def __post_init__(self) -> None:
        if not 1 <= self.minimum <= self.initial <= self.maximum:
            raise ValueError(
                f"need 1 <= minimum <= initial <= maximum, got "
                f"{self.minimum}, {self.initial}, {self.maximum}"
            )
        self.limit = float(self.initial)

    @property
    def slots(self) -> int:
        return max(self.minimum, int(self.limit))

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[Sample]:
        """Hold one slot for one call; its latency (and `Sample.overload()`) adjust the limit."""
        await self._acquire()
        try:
            if self.gate is not None:
                await self.gate()
        except BaseException:
            self._release()
            raise
        busy = self.in_flight
        start = self.clock()
        sample = Sample()
        try:
            yield sample
        except asyncio.CancelledError:
            raise  # the caller gave up: says nothing about the server
        except BaseException:
            self.observe(start, busy=busy, overloaded=sample.overloaded)
            raise
        else:
            self.observe(start, busy=busy, overloaded=sample.overloaded)
        finally:
            self._release()

    async def _acquire(self) -> None:
        if self.in_flight < self.slots and not self._waiters:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._wake()
        try:
            await waiter  # resolved by _wake, which counts this call in flight
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # woken and cancelled at once: give the slot back
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def _release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_flight < self.slots:
            waiter = self._waiters.popleft()
            if waiter.done():
                continue
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            waiter.set_result(None)

    def observe(self, started: float, *, busy: int, overloaded: bool = False) -> None:
        """One call that started at `started` (on `clock`) with `busy` calls in flight ended."""
        now = self.clock()
        if overloaded:
            # One cut per round trip: calls already in flight at the last cut are the same
            # signal (a burst of timeouts from one window), not a new one.
            if started >= self._cut_at:
                self.limit = max(float(self.minimum), self.limit / 2)
                self._cut_at = now
            return
        latency = max(now - started, 1e-6)
        if now - self._window_start >= self.window:
            self._previous_min, self._window_min = self._window_min, latency
            self._window_start = now
        else:
            self._window_min = min(self._window_min, latency)
        self.baseline = min(self._previous_min, self._window_min)
        gradient = min(1.0, max(0.5, self.tolerance * self.baseline / latency))
        if gradient >= 1.0 and busy < self.limit / 2:
            return  # the limit was not what held calls back: no evidence to grow on
        target = self.limit * gradient + math.sqrt(self.limit)
        limit = self.limit * (1 - self.smoothing) + target * self.smoothing
        self.limit = min(float(self.maximum), max(float(self.minimum), limit))
        self._wake()
