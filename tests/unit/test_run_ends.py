"""The pause that an announcement on Prefect's event stream cuts short (`run_ends.Wake`), and a
listener whose failure leaves the interval reads (`run_ends.listened`)."""

from __future__ import annotations

import anyio
import pytest

from lume_operator.prefect.run_ends import Wake, listened

pytestmark = pytest.mark.unit


def _waited(wake: Wake, seconds: float, set_before: bool = False, set_during: bool = False):
    async def main() -> float:
        if set_before:
            wake.set()
        started = anyio.current_time()
        async with anyio.create_task_group() as group:
            group.start_soon(wake.wait, seconds)
            await anyio.sleep(0)
            if set_during:
                wake.set()
        return anyio.current_time() - started

    return anyio.run(main)


def test_a_wake_made_outside_an_event_loop_waits_its_seconds_unless_set():
    wake = Wake()  # as `LocalRunner.__init__` makes it, before any loop runs
    assert _waited(wake, 0.05) >= 0.05
    assert _waited(wake, 600.0, set_during=True) < 60


def test_a_set_while_the_poller_reads_ends_its_next_wait_at_once_and_only_that_one():
    wake = Wake()
    assert _waited(wake, 600.0, set_before=True) < 60
    assert _waited(wake, 0.05) >= 0.05  # renewed after the wait it cut short


def test_a_listener_that_fails_is_reported_to_failed_and_not_raised():
    reported: list[Exception] = []

    async def refused(port: int) -> None:
        raise ConnectionRefusedError(f"port {port}")

    anyio.run(lambda: listened(refused, 1, failed=reported.append))
    assert [str(error) for error in reported] == ["port 1"]
    anyio.run(lambda: listened(refused, 1))  # with nobody to tell: returns all the same
