"""The Prefect gateway against the real server: idempotent pools, deployments and runs."""

from __future__ import annotations

import anyio
import pytest

from lume_operator.backends import get_backend
from lume_operator.prefect.gateway import DeploymentSpec, PrefectError, PrefectGateway
from lume_operator.prefect.server import prefect_api
from lume_operator.reconcile.flowrun import idempotency_key


@pytest.mark.prefect
def test_gateway_writes_only_what_changes(prefect_home):
    backend = get_backend("process")
    template = backend.base_job_template()
    spec = DeploymentSpec(
        flow_name="beam-stats",
        name="default",
        entrypoint="flows/beam.py:beam_stats",
        work_pool_name="pool",
        work_queue_name="cpu",
        job_variables={"env": {"A": "1"}},
        parameters={"n": 1},
        tags=["cpu"],
    )

    async def scenario() -> None:
        async with PrefectGateway.connect(timeout=30) as gateway:
            pool_id = await gateway.ensure_work_pool("pool", "process", template, queues=["cpu"])
            assert gateway.writes == 2  # the pool and its queue
            assert (
                await gateway.ensure_work_pool("pool", "process", template, queues=["cpu"])
                == pool_id
            )
            assert gateway.writes == 2  # nothing changed, nothing written
            with pytest.raises(
                PrefectError, match="work pool 'pool' exists with type 'process', not 'docker'"
            ):
                await gateway.ensure_work_pool("pool", "docker", template)
            with pytest.raises(PrefectError, match="work pool 'elsewhere' to adopt does not exist"):
                await gateway.ensure_work_pool("elsewhere", "process", template, adopt=True)

            first = await gateway.ensure_deployment(spec)
            writes = gateway.writes
            assert await gateway.ensure_deployment(spec) == first
            assert gateway.writes == writes  # an unchanged deployment is not updated
            spec.parameters = {"n": 2}
            assert await gateway.ensure_deployment(spec) == first
            assert gateway.writes == writes + 1
            current = await gateway.client.read_deployment(first)
            assert current.parameters == {"n": 2}

            key = idempotency_key("uid-1", 3, 0)
            run_a = await gateway.create_flow_run(first, idempotency_key=key)
            run_b = await gateway.create_flow_run(first, idempotency_key=key)
            assert run_a.id == run_b.id  # the same key never makes a second run
            other = await gateway.create_flow_run(
                first, idempotency_key=idempotency_key("uid-1", 4, 0)
            )
            assert other.id != run_a.id

    with prefect_api() as (_, embedded):
        assert embedded
        anyio.run(scenario)


def test_idempotency_keys_are_deterministic():
    assert idempotency_key("u", 1, 0) == idempotency_key("u", 1, 0)
    assert (
        len(
            {
                idempotency_key("u", 1, 0),
                idempotency_key("u", 2, 0),
                idempotency_key("u", 1, 1),
                idempotency_key("u", 1, 0, "step"),
            }
        )
        == 4
    )
