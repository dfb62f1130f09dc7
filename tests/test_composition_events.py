"""What Prefect's event stream announces wakes the pollers at once, not at their next interval
(a chain of 5 steps had waited half an interval per step, twice): a FlowOfFlows parent reads a
step's run when it is announced ended, and `lume-operator run`'s worker polls for a run when it
is announced scheduled."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, PREFECT_LOGGING_TO_API_ENABLED, temporary_settings
from prefect.states import Completed, Running

from lume_operator.flows.composition import _Composition

pytestmark = pytest.mark.prefect
LONG = 600.0  # a poll interval no test outlives: only the event stream can wake the read


@pytest.fixture
def api(shared_prefect_api: Any) -> Iterator[str]:
    """The shared server, for this process's Prefect however early it read its settings."""
    with temporary_settings(updates={PREFECT_API_URL: shared_prefect_api.api_url}):
        yield shared_prefect_api.api_url


@flow(name="watched")
def watched() -> None:
    """Only its runs are used: created and ended by the test, never executed."""


async def _wait_for_end_of_a_run(poll_interval: float) -> Any:
    """Create a run, watch it as a step's run is watched, end it; the run as last read."""
    composition = _Composition([], poll_interval=poll_interval)
    async with get_client() as client:
        run = await client.create_flow_run(watched, state=Running())
        seen: dict[str, Any] = {}
        async with anyio.create_task_group() as group:
            group.start_soon(composition._poll, client)
            group.start_soon(composition._listen)

            async def wait() -> None:
                seen["run"] = await composition._wait(run, timeout=30)
                group.cancel_scope.cancel()

            group.start_soon(wait)
            await anyio.sleep(1)  # the watch is registered, the stream connected
            await client.set_flow_run_state(run.id, Completed(), force=True)
    return seen["run"]


def test_a_watched_runs_end_is_read_when_the_event_stream_announces_it(api):
    @flow
    async def parent() -> str:
        run = await _wait_for_end_of_a_run(LONG)
        return run.state.type.value

    assert anyio.run(parent) == "COMPLETED"


def test_without_an_event_stream_the_interval_reads_still_see_the_end(api):
    @flow
    async def parent() -> tuple[bool, str]:
        composition = _Composition([], poll_interval=0.5)
        nowhere = {PREFECT_API_URL: "http://127.0.0.1:1/api", PREFECT_LOGGING_TO_API_ENABLED: False}
        with temporary_settings(updates=nowhere):
            with anyio.fail_after(60):
                await composition._listen()  # refused: returns, nothing raised
        run = await _wait_for_end_of_a_run(0.5)
        return True, run.state.type.value

    assert anyio.run(parent) == (True, "COMPLETED")


class _CountingWorker:
    """Stands in for the worker `run` polls: counts its polls, for runs of `work_pool`."""

    def __init__(self, work_pool: Any) -> None:
        self.work_pool = work_pool
        self.polls = 0

    async def get_and_submit_flow_runs(self) -> None:
        self.polls += 1


def test_runs_worker_polls_when_a_run_of_its_pool_is_announced_scheduled(api, tmp_path):
    """With a 600 s interval, a scheduled run of its pool has it poll at once (runs of other
    pools, such as other tests' on this shared server, do not wake it)."""
    import io
    import uuid

    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.states import Scheduled
    from rich.console import Console

    from lume_operator.local.runner import LocalRunner

    runner = LocalRunner(Console(file=io.StringIO()), tmp_path, timeout=60, poll_interval=LONG)

    async def scenario() -> tuple[int, int]:
        async with get_client() as client, anyio.create_task_group() as group:
            pool = await client.create_work_pool(
                WorkPoolCreate(name=f"wake-{uuid.uuid4().hex[:8]}", type="process")
            )
            deployment_id = await client.create_deployment(
                flow_id=await client.create_flow_from_name("watched"),
                name=pool.name,
                work_pool_name=pool.name,
            )
            worker = _CountingWorker(pool)
            group.start_soon(runner._poll_workers, [worker])
            await anyio.sleep(1)  # the first poll made, the stream connected
            before = worker.polls
            await client.create_flow_run_from_deployment(deployment_id, state=Scheduled())
            with anyio.fail_after(30):
                while worker.polls == before:
                    await anyio.sleep(0.05)
            group.cancel_scope.cancel()
        return before, worker.polls

    before, after = anyio.run(scenario)
    assert before >= 1 and after > before
