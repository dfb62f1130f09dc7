"""Run states as Prefect's event stream announces them: what wakes a poller early.

A poller that reads runs every interval sees an end half an interval late on average (a chain
of 5 steps waited 1.2 s in all). Prefect's server announces each state change on its event
stream (`/api/events/out`, the websocket Prefect's own engine and workers subscribe to); the
pollers here read as soon as a run they watch is announced ended (and `run`'s worker polls as
soon as a run is announced scheduled), and otherwise at their interval as before. The read
stays what decides, so a stream that is refused (no websockets through a proxy) or lost costs
only the wait. Imports nothing but Prefect: the FlowOfFlows parent, which every composition
run loads, uses it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

import anyio

# State names a run ends in (a final state with another name is seen at the next read).
FINAL_STATE_NAMES = ("Completed", "Failed", "Crashed", "Cancelled", "TimedOut")
RUN_PREFIX = "prefect.flow-run."


class Wake:
    """A poller's pause that an announcement cuts short.

    A listener calls `set()`; the poller's `wait(seconds)` returns then, or after `seconds`,
    and a `set()` during the read that follows ends the next wait at once. Can be made outside
    an event loop (anyio's Event cannot): its Event is made at first use.
    """

    def __init__(self) -> None:
        self._event: anyio.Event | None = None

    def set(self) -> None:
        self._renewed().set()

    async def wait(self, seconds: float) -> None:
        with anyio.move_on_after(seconds):
            await self._renewed().wait()
        self._event = anyio.Event()

    def _renewed(self) -> anyio.Event:
        if self._event is None:
            self._event = anyio.Event()
        return self._event


async def listened(
    listen: Callable[..., Awaitable[None]],
    *args: Any,
    failed: Callable[[Exception], None] | None = None,
) -> None:
    """Run a listener below until cancelled. Its failure (no websockets through a proxy, the
    stream lost for good) leaves the interval reads, so it goes to `failed`, not up."""
    try:
        await listen(*args)
    except Exception as error:
        if failed is not None:
            failed(error)


async def wake_on_run_ends(
    watched: Callable[[], Collection[str]], wake: Callable[[], None]
) -> None:
    """Until cancelled, call `wake` when a run whose id `watched()` holds is announced ended.

    Raises what the stream raised: refused, or lost for good after Prefect's reconnections.
    """

    def ended(run_id: str, event: Any) -> None:
        if run_id in watched():
            wake()

    await on_run_states(FINAL_STATE_NAMES, ended)


async def on_run_states(states: Sequence[str], call: Callable[[str, Any], None]) -> None:
    """Until cancelled, call `call(run_id, event)` for each run announced entering one of
    `states` (state names), with Prefect's event. Raises what the stream raised."""
    from prefect.events.clients import get_events_subscriber
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    announced = EventFilter(
        event=EventNameFilter(name=[f"{RUN_PREFIX}{name}" for name in states]),
        resource=EventResourceFilter(id_prefix=[RUN_PREFIX]),
    )
    async with get_events_subscriber(filter=announced) as events:
        async for event in events:
            call(event.resource.id.removeprefix(RUN_PREFIX), event)
