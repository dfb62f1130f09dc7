"""Runs in flight read once per interval per Prefect API, however many objects follow them."""

from __future__ import annotations

import anyio
import pytest

from lume_operator.prefect.batching import Batched, RunReader
from lume_operator.prefect.deployment import DeploymentSpec
from lume_operator.prefect.fake import FakePrefect

from .clock import Clock

pytestmark = pytest.mark.unit


async def _runs(fake: FakePrefect, n: int) -> list[str]:
    spec = DeploymentSpec("f", "default", "f.py:f", "pool", "default", {}, {}, [])
    deployment = await fake.ensure_deployment(spec)
    return [(await fake.create_flow_run(deployment, idempotency_key=f"k{i}")).id for i in range(n)]


def test_a_thousand_followers_cost_one_request_per_interval():
    async def scenario() -> None:
        fake, clock = FakePrefect(), Clock()
        ids = await _runs(fake, 1000)
        reader = RunReader(max_age=5.0, chunk=200, clock=clock)
        port = Batched(fake, reader)
        # Round 1: each object asks for its run; the first new ids trigger reads, and once all
        # are known every later caller in the interval is answered from the snapshot.
        for run_id in ids:
            (view,) = await port.read_flow_runs([run_id])
            assert view.id == run_id
        assert fake.calls["read_flow_runs"] == 1000  # learning each new run, once
        # Round 2, a follow interval later: all 1000 in one snapshot of 5 chunked requests.
        clock.now += 5.0
        before = fake.calls["read_flow_runs"]
        for run_id in ids:
            await port.read_flow_runs([run_id])
        assert fake.calls["read_flow_runs"] - before == 5  # 1000 ids / 200 per request
        # Within the interval: no request at all.
        clock.now += 1.0
        before = fake.calls["read_flow_runs"]
        for run_id in ids:
            await port.read_flow_runs([run_id])
        assert fake.calls["read_flow_runs"] == before

    anyio.run(scenario)


def test_the_snapshot_follows_state_and_drops_ended_runs():
    async def scenario() -> None:
        fake, clock = FakePrefect(), Clock()
        first, second = await _runs(fake, 2)
        reader = RunReader(max_age=5.0, clock=clock)
        port = Batched(fake, reader)
        await port.read_flow_runs([first, second])
        fake.set_state(first, "COMPLETED")
        (stale,) = await port.read_flow_runs([first])
        assert stale.state.type == "SCHEDULED"  # within the interval: the snapshot
        clock.now += 5.0
        (fresh,) = await port.read_flow_runs([first])
        assert fresh.state.type == "COMPLETED"
        assert reader.wanted == {second}  # an ended run is not read again
        # Other calls pass through to the port.
        assert port.ui_url(first).endswith(first)
        assert await port.read_flow_runs([]) == []

    anyio.run(scenario)


def test_a_new_id_is_read_at_once():
    async def scenario() -> None:
        fake, clock = FakePrefect(), Clock()
        first, second = await _runs(fake, 2)
        port = Batched(fake, RunReader(max_age=60.0, clock=clock))
        await port.read_flow_runs([first])
        fake.set_state(first, "RUNNING")
        (view,) = await port.read_flow_runs([second])  # not in the snapshot yet: read alone
        assert view.id == second and fake.calls["read_flow_runs"] == 2
        (old,) = await port.read_flow_runs([first])  # the snapshot keeps its age
        assert old.state.type == "SCHEDULED" and fake.calls["read_flow_runs"] == 2

    anyio.run(scenario)


def test_followers_asking_while_a_snapshot_is_read_are_in_the_next_one():
    """Hundreds of timers ask at once, so many ask while a snapshot is being read. Dropped
    from the next snapshot, each of them would be read alone at every interval (the follow
    bench at 400 runs: 516 requests a minute instead of 24)."""

    class Slow(FakePrefect):
        def __init__(self) -> None:
            super().__init__()
            self.gate = anyio.Event()

        async def read_flow_runs(self, flow_run_ids):  # type: ignore[override]
            if len(flow_run_ids) > 1:
                await self.gate.wait()  # a snapshot being read, slowly
            return await super().read_flow_runs(flow_run_ids)

    async def scenario() -> None:
        fake, clock = Slow(), Clock()
        ids = await _runs(fake, 40)
        reader = RunReader(max_age=5.0, clock=clock)
        port = Batched(fake, reader)
        fake.gate.set()
        await port.read_flow_runs(ids[:20])  # the first 20 known
        clock.now += 5.0
        fake.gate = anyio.Event()
        async with anyio.create_task_group() as group:
            group.start_soon(port.read_flow_runs, ids[:20])  # takes a snapshot, held up
            await anyio.sleep(0.01)
            for run_id in ids[20:]:  # asking meanwhile: each read alone once, as new
                group.start_soon(port.read_flow_runs, [run_id])
            await anyio.sleep(0.01)
            fake.gate.set()
        assert reader.wanted == set(ids)
        clock.now += 5.0
        before = fake.calls["read_flow_runs"]
        for run_id in ids:
            await port.read_flow_runs([run_id])
        assert fake.calls["read_flow_runs"] - before == 1  # all 40 in one snapshot read

    anyio.run(scenario)
