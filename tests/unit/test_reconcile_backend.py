"""SchedulingBackend decisions: reconcile_backend, check_backend, delete_backend."""

from __future__ import annotations

import copy

import pytest

from lume_operator.api.backend import SchedulingBackendStatus
from lume_operator.backends import get_backend
from lume_operator.prefect.port import (
    PrefectNotConfigured,
    PrefectRejected,
    PrefectUnreachable,
    WorkPoolView,
    pool_owner,
)
from lume_operator.reconcile.backend import check_backend, delete_backend, reconcile_backend
from tests.unit.conftest import (
    FakeCluster,
    backend_manifest,
    cond,
    events,
    kstatus,
    make_settings,
)

pytestmark = pytest.mark.unit

POOL = "default-local"
OWNED_BY_LOCAL = f"Managed by lume-operator ({pool_owner('uid-backend-local')})."


async def reconcile(body, status, connect, cluster, settings, retry=0):
    return await reconcile_backend(
        body, status, connect=connect, cluster=cluster, settings=settings, retry=retry
    )


# ---- reconcile_backend --------------------------------------------------------------------


@pytest.mark.asyncio
async def test_invalid_spec_stalls_without_any_prefect_call(fake, connect, cluster, settings):
    body = backend_manifest(generation=4, type="mainframe")
    outcome = await reconcile(body, SchedulingBackendStatus(), connect, cluster, settings)
    assert kstatus(outcome.status) == {
        "Ready": ("False", "InvalidSpec"),
        "Reconciling": ("False", "InvalidSpec"),
        "Stalled": ("True", "InvalidSpec"),
    }
    assert "spec.type" in outcome.status.conditions[0].message
    assert outcome.status.observed_generation == 4
    assert events(outcome) == [("Warning", "InvalidSpec")]
    assert outcome.retry_in is None
    assert not fake.calls and fake.writes == 0
    assert connect.backends == [] and cluster.applied == []


@pytest.mark.asyncio
async def test_run_config_field_of_another_backend_type_is_invalid(
    fake, connect, cluster, settings
):
    body = backend_manifest(runConfig={"memoryLimit": "2Gi"})  # not a process field
    outcome = await reconcile(body, SchedulingBackendStatus(), connect, cluster, settings)
    assert cond(outcome.status, "Stalled") == ("True", "InvalidSpec")
    assert "spec.runConfig.memoryLimit" in outcome.status.conditions[0].message
    assert not fake.calls


@pytest.mark.asyncio
async def test_creates_pool_and_agent_and_is_ready(fake, connect, cluster, settings):
    body = backend_manifest(generation=2)
    outcome = await reconcile(body, SchedulingBackendStatus(), connect, cluster, settings)

    runner = get_backend("process")
    pool = fake.pools[POOL]
    assert pool.type == runner.work_pool_type == "process"
    assert pool.base_job_template == runner.base_job_template()
    assert pool.queues == ["default", "cpu"]  # spec.labels became queues
    assert pool.concurrency_limit is None
    assert fake.calls == {"ensure_work_pool": 1}

    assert cluster.kinds() == ["ServiceAccount", "Deployment"]
    for obj in cluster.applied:
        assert obj["metadata"]["namespace"] == "default"
        assert obj["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "lume.dev/v1alpha1",
                "kind": "SchedulingBackend",
                "name": "local",
                "uid": "uid-backend-local",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    assert cluster.applied[1]["metadata"]["name"] == "local-agent"
    assert cluster.asked == [("default", "local-agent")]

    status = outcome.status
    assert status.observed_generation == 2
    assert status.work_pool_name == POOL
    assert status.work_pool_id == pool.id
    assert status.agent_deployment == "local-agent"
    assert status.agent_ready_replicas == 1
    assert kstatus(status) == {
        "Ready": ("True", "Reconciled"),
        "Reconciling": ("False", "Reconciled"),
        "Stalled": ("False", "Reconciled"),
    }
    assert cond(status, "AgentReady") == ("True", "AgentReady")
    assert cond(status, "WorkPoolReady") == ("True", "WorkPoolReady")
    assert [c.type for c in status.conditions] == [
        "Ready",
        "Reconciling",
        "Stalled",
        "AgentReady",
        "WorkPoolReady",
    ]
    assert events(outcome) == [("Normal", "WorkPoolReady")]
    assert outcome.retry_in is None


@pytest.mark.asyncio
async def test_work_pool_spec_name_and_concurrency(fake, connect, cluster, settings):
    body = backend_manifest(workPool={"name": "shared", "concurrencyLimit": 3}, labels=None)
    outcome = await reconcile(body, SchedulingBackendStatus(), connect, cluster, settings)
    assert outcome.status.work_pool_name == "shared"
    assert fake.pools["shared"].concurrency_limit == 3
    assert fake.pools["shared"].queues == ["default"]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("ready", "wanted", "reason"),
    [(None, 1, "AgentNotReady"), (0, 1, "AgentNotReady"), (1, 2, "AgentNotReady"), (2, 2, None)],
)
async def test_agent_readiness_by_ready_replicas(fake, connect, settings, ready, wanted, reason):
    cluster = FakeCluster(ready=ready)
    body = backend_manifest(agent={"replicas": wanted})
    outcome = await reconcile(body, SchedulingBackendStatus(), connect, cluster, settings)
    status = outcome.status
    assert status.agent_ready_replicas == (ready or 0)
    if reason is None:
        assert cond(status) == ("True", "Reconciled")
        assert cond(status, "AgentReady") == ("True", "AgentReady")
    else:
        assert kstatus(status) == {
            "Ready": ("False", "AgentNotReady"),
            "Reconciling": ("True", "AgentNotReady"),
            "Stalled": ("False", "AgentNotReady"),
        }
        ready_cond = next(c for c in status.conditions if c.type == "Ready")
        assert ready_cond.message == f"{ready or 0} of {wanted} agent replicas ready"
        agent = next(c for c in status.conditions if c.type == "AgentReady")
        assert (agent.status, agent.reason) == ("False", "AgentNotReady")
        assert agent.message == f"{ready or 0}/{wanted} replicas ready"
    # the work pool is there either way
    assert cond(status, "WorkPoolReady") == ("True", "WorkPoolReady")
    assert outcome.retry_in is None


@pytest.mark.asyncio
async def test_work_pool_ready_event_only_the_first_time(fake, connect, cluster, settings):
    body = backend_manifest()
    first = await reconcile(body, SchedulingBackendStatus(), connect, cluster, settings)
    writes = fake.writes
    again = await reconcile(body, first.status, connect, cluster, settings)
    assert events(first) == [("Normal", "WorkPoolReady")]
    assert again.events == []
    assert again.status.work_pool_id == first.status.work_pool_id
    assert fake.writes == writes  # nothing changed in Prefect
    assert fake.calls == {"ensure_work_pool": 2}


@pytest.mark.asyncio
async def test_adopt_of_a_missing_pool_is_rejected(fake, connect, cluster, settings):
    body = backend_manifest(workPool={"name": "theirs", "adopt": True})
    outcome = await reconcile(body, SchedulingBackendStatus(), connect, cluster, settings, retry=2)
    # issue 12: a refusal is Stalled with an event, not retried with backoff like an outage
    assert kstatus(outcome.status) == {
        "Ready": ("False", "PrefectRejected"),
        "Reconciling": ("False", "PrefectRejected"),
        "Stalled": ("True", "PrefectRejected"),
    }
    assert outcome.retry_in is None
    message = "work pool 'theirs' to adopt does not exist"
    assert outcome.status.conditions[0].message == message
    assert [(e.type, e.reason, e.message) for e in outcome.events] == [
        ("Warning", "PrefectRejected", message)
    ]
    assert "theirs" not in fake.pools and cluster.applied == []


@pytest.mark.asyncio
async def test_adopt_of_an_existing_pool_leaves_it_as_it_is(fake, connect, cluster, settings):
    fake.pools["theirs"] = WorkPoolView("their-id", "theirs", "process", {"x": 1}, 7, ["default"])
    body = backend_manifest(workPool={"name": "theirs", "adopt": True}, labels=None)
    outcome = await reconcile(body, SchedulingBackendStatus(), connect, cluster, settings)
    assert outcome.status.work_pool_id == "their-id"
    assert fake.pools["theirs"].base_job_template == {"x": 1}
    assert fake.pools["theirs"].concurrency_limit == 7
    assert fake.writes == 0
    assert events(outcome) == [("Normal", "WorkPoolReady")]


@pytest.mark.asyncio
@pytest.mark.parametrize(("retry", "delay"), [(0, 1.0), (1, 2.0), (3, 8.0), (6, 60.0), (40, 60.0)])
async def test_prefect_unreachable_is_retried_with_backoff(
    fake, connect, cluster, settings, retry, delay
):
    fake.failure = PrefectUnreachable("down")
    outcome = await reconcile(
        backend_manifest(), SchedulingBackendStatus(), connect, cluster, settings, retry=retry
    )
    assert outcome.retry_in == settings.backoff(retry) == delay
    assert kstatus(outcome.status) == {
        "Ready": ("False", "PrefectUnreachable"),
        "Reconciling": ("True", "PrefectUnreachable"),
        "Stalled": ("False", "PrefectUnreachable"),
    }
    assert outcome.retry_message == "Prefect API unreachable: down"
    assert outcome.status.conditions[0].message == "Prefect API unreachable: down"
    assert outcome.events == []
    assert cluster.applied == []
    assert outcome.status.work_pool_id is None
    assert outcome.status.work_pool_name == POOL


@pytest.mark.asyncio
@pytest.mark.parametrize("reason", ["NoPrefectAPI", "SecretNotFound", "SecretForbidden"])
async def test_prefect_not_configured(fake, connect, cluster, settings, reason):
    connect.error = PrefectNotConfigured(reason, f"because {reason}")
    outcome = await reconcile(
        backend_manifest(), SchedulingBackendStatus(), connect, cluster, settings, retry=1
    )
    assert kstatus(outcome.status) == {
        "Ready": ("False", reason),
        "Reconciling": ("True", reason),
        "Stalled": ("False", reason),
    }
    assert outcome.retry_in == 2.0
    assert outcome.retry_message == f"because {reason}"
    assert not fake.calls and cluster.applied == []


@pytest.mark.asyncio
async def test_agent_gets_the_backend_api_url_else_the_default(fake, connect, cluster):
    settings = make_settings("http://default-prefect:4200/api")
    await reconcile(backend_manifest(), SchedulingBackendStatus(), connect, cluster, settings)
    default_env = str(cluster.applied[-1]["spec"])
    assert "http://default-prefect:4200/api" in default_env

    cluster.applied.clear()
    body = backend_manifest(prefect={"apiUrl": "http://own-prefect/api"})
    await reconcile(body, SchedulingBackendStatus(), connect, cluster, settings)
    own_env = str(cluster.applied[-1]["spec"])
    assert "http://own-prefect/api" in own_env and "default-prefect" not in own_env


# ---- check_backend ------------------------------------------------------------------------


async def ready_status(fake, connect, cluster, settings, **spec) -> SchedulingBackendStatus:
    outcome = await reconcile(
        backend_manifest(**spec), SchedulingBackendStatus(), connect, cluster, settings
    )
    fake.calls.clear()
    cluster.asked.clear()
    return outcome.status


async def check(body, status, connect, cluster):
    return await check_backend(body, status, connect=connect, cluster=cluster)


@pytest.mark.asyncio
async def test_check_returns_none_when_nothing_changed(fake, connect, cluster, settings):
    status = await ready_status(fake, connect, cluster, settings)
    assert await check(backend_manifest(), status, connect, cluster) is None
    assert fake.calls == {"health": 1}
    assert cluster.asked == [("default", "local-agent")]


@pytest.mark.asyncio
async def test_check_skips_invalid_or_never_reconciled(fake, connect, cluster):
    assert await check(backend_manifest(), SchedulingBackendStatus(), connect, cluster) is None
    bad = backend_manifest(type="mainframe")
    status = SchedulingBackendStatus(work_pool_id="x")
    assert await check(bad, status, connect, cluster) is None
    assert not fake.calls and connect.backends == []


@pytest.mark.asyncio
async def test_check_event_when_the_agent_becomes_ready(fake, connect, settings):
    cluster = FakeCluster(ready=0)
    status = await ready_status(fake, connect, cluster, settings)
    assert cond(status) == ("False", "AgentNotReady")
    assert await check(backend_manifest(), status, connect, cluster) is None

    cluster.ready = 1
    outcome = await check(backend_manifest(), status, connect, cluster)
    assert outcome is not None
    assert events(outcome) == [("Normal", "Ready")]
    assert outcome.status.agent_ready_replicas == 1
    assert cond(outcome.status) == ("True", "Reconciled")
    assert cond(outcome.status, "AgentReady") == ("True", "AgentReady")
    assert cond(outcome.status, "WorkPoolReady") == ("True", "WorkPoolReady")
    assert outcome.retry_in is None
    assert await check(backend_manifest(), outcome.status, connect, cluster) is None


@pytest.mark.asyncio
async def test_check_agent_lost_then_more_replicas(fake, connect, settings):
    cluster = FakeCluster(ready=2)
    status = await ready_status(fake, connect, cluster, settings, agent={"replicas": 2})
    cluster.ready = 1
    lost = await check(backend_manifest(agent={"replicas": 2}), status, connect, cluster)
    assert lost is not None and lost.events == []
    assert kstatus(lost.status)["Ready"] == ("False", "AgentNotReady")
    # replicas changed but readiness did not: a new status, no event
    cluster.ready = None
    fewer = await check(backend_manifest(agent={"replicas": 2}), lost.status, connect, cluster)
    assert fewer is not None and fewer.events == []
    assert fewer.status.agent_ready_replicas == 0


@pytest.mark.asyncio
async def test_check_records_an_outage_once_and_its_end(fake, connect, cluster, settings):
    status = await ready_status(fake, connect, cluster, settings)
    fake.failure = PrefectUnreachable("connection refused")
    lost = await check(backend_manifest(), status, connect, cluster)
    assert lost is not None
    assert kstatus(lost.status) == {
        "Ready": ("False", "PrefectUnreachable"),
        "Reconciling": ("True", "PrefectUnreachable"),
        "Stalled": ("False", "PrefectUnreachable"),
    }
    assert lost.events[0].type == "Warning" and lost.events[0].reason == "PrefectUnreachable"
    assert lost.events[0].message == "Prefect API unreachable: connection refused"
    assert lost.retry_in is None
    # WorkPoolReady / AgentReady are not touched by an outage
    assert cond(lost.status, "WorkPoolReady") == ("True", "WorkPoolReady")

    assert await check(backend_manifest(), lost.status, connect, cluster) is None

    fake.failure = None
    back = await check(backend_manifest(), lost.status, connect, cluster)
    assert back is not None
    assert events(back) == [("Normal", "Ready")]
    assert cond(back.status) == ("True", "Reconciled")


@pytest.mark.asyncio
async def test_check_not_configured(fake, connect, cluster, settings):
    status = await ready_status(fake, connect, cluster, settings)
    connect.error = PrefectNotConfigured("SecretNotFound", "Secret prefect-key not found")
    outcome = await check(backend_manifest(), status, connect, cluster)
    assert outcome is not None
    assert cond(outcome.status) == ("False", "SecretNotFound")
    assert outcome.events == [] and outcome.retry_in is None
    # Recorded once, like an outage: the same trouble again writes nothing.
    assert await check(backend_manifest(), outcome.status, connect, cluster) is None


@pytest.mark.asyncio
async def test_check_clears_an_outage_while_the_agent_is_not_ready(fake, connect, settings):
    cluster = FakeCluster(ready=0)
    status = await ready_status(fake, connect, cluster, settings)
    fake.failure = PrefectUnreachable("down")
    lost = await check(backend_manifest(), status, connect, cluster)
    assert lost is not None and cond(lost.status) == ("False", "PrefectUnreachable")
    fake.failure = None
    back = await check(backend_manifest(), lost.status, connect, cluster)
    assert back is not None
    assert cond(back.status) == ("False", "AgentNotReady")


# ---- delete_backend -----------------------------------------------------------------------


async def delete(body, status, connect, settings, retry=0):
    return await delete_backend(body, status, connect=connect, settings=settings, retry=retry)


@pytest.mark.asyncio
async def test_delete_removes_the_pool(fake, connect, cluster, settings):
    status = await ready_status(fake, connect, cluster, settings)
    assert POOL in fake.pools
    outcome = await delete(backend_manifest(), status, connect, settings)
    assert POOL not in fake.pools
    assert fake.calls == {"delete_work_pool": 1}
    assert outcome.retry_in is None and outcome.events == []
    # already gone counts as deleted
    again = await delete(backend_manifest(), status, connect, settings)
    assert again.retry_in is None


@pytest.mark.asyncio
async def test_delete_leaves_an_adopted_pool(fake, connect, settings):
    fake.pools["theirs"] = WorkPoolView("their-id", "theirs", "process", {}, None, ["default"])
    body = backend_manifest(workPool={"name": "theirs", "adopt": True})
    outcome = await delete(body, SchedulingBackendStatus(), connect, settings)
    assert "theirs" in fake.pools
    assert not fake.calls and connect.backends == []
    assert outcome.retry_in is None


@pytest.mark.asyncio
async def test_delete_invalid_spec_is_done(fake, connect, settings):
    outcome = await delete(
        backend_manifest(type="mainframe"), SchedulingBackendStatus(), connect, settings
    )
    assert outcome.retry_in is None and not fake.calls


@pytest.mark.asyncio
async def test_delete_holds_the_finalizer_while_prefect_fails(fake, connect, settings):
    fake.pools[POOL] = WorkPoolView("id", POOL, "process", {}, None, ["default"], OWNED_BY_LOCAL)
    fake.failure = PrefectUnreachable("down")
    outcome = await delete(
        backend_manifest(), SchedulingBackendStatus(), connect, settings, retry=3
    )
    assert outcome.retry_in == 8.0
    message = f"waiting to delete work pool {POOL!r}: down"
    assert outcome.retry_message == message
    # issue 12: a finalizer held by an outage says why in status (it wrote no condition)
    assert kstatus(outcome.status)["Reconciling"] == ("True", "PrefectUnreachable")
    assert outcome.status.conditions[0].message == message
    assert POOL in fake.pools


@pytest.mark.asyncio
async def test_delete_rejected_is_stalled_not_retried(fake, connect, settings):
    fake.pools[POOL] = WorkPoolView("id", POOL, "process", {}, None, ["default"], OWNED_BY_LOCAL)
    fake.failure = PrefectRejected("forbidden", 403)
    outcome = await delete(
        backend_manifest(), SchedulingBackendStatus(), connect, settings, retry=3
    )
    assert kstatus(outcome.status)["Stalled"] == ("True", "PrefectRejected")
    assert events(outcome) == [("Warning", "PrefectRejected")]
    # Decided: a refusal holds the finalizer Stalled, asked again only at the longest
    # backoff (a restored Secret or deletionPolicy: Orphan then takes effect), never a storm.
    assert outcome.retry_in == settings.max_backoff


@pytest.mark.asyncio
async def test_delete_without_a_prefect_api_is_done(fake, connect, settings):
    connect.error = PrefectNotConfigured("NoPrefectAPI", "no")
    outcome = await delete(backend_manifest(), SchedulingBackendStatus(), connect, settings)
    assert outcome.retry_in is None and outcome.retry_message == ""
    assert not fake.calls


@pytest.mark.asyncio
async def test_delete_with_its_secret_gone_holds_the_finalizer_with_a_condition(
    fake, connect, settings
):
    # issue 12: a missing API-key Secret no longer releases the finalizer (leaving the pool):
    # the deletion holds, and status says why and how out (Orphan).
    connect.error = PrefectNotConfigured("SecretNotFound", "Secret prefect-key not found")
    outcome = await delete(
        backend_manifest(), SchedulingBackendStatus(), connect, settings, retry=2
    )
    assert outcome.retry_in == 4.0
    assert kstatus(outcome.status) == {
        "Ready": ("False", "SecretNotFound"),
        "Reconciling": ("True", "SecretNotFound"),
        "Stalled": ("False", "SecretNotFound"),
    }
    message = outcome.status.conditions[0].message
    assert message == outcome.retry_message
    assert "Secret prefect-key not found" in message and "deletionPolicy: Orphan" in message
    assert not fake.calls


# ---- issue 12: one owner per work pool, agent names, Orphan ---------------------------------


def other_backend(**spec) -> dict:
    """A second backend, in another namespace, with its own uid."""
    body = backend_manifest(uid="uid-backend-other", **spec)
    body["metadata"]["namespace"] = "team-b"
    return body


@pytest.mark.asyncio
async def test_the_pool_it_creates_carries_its_owner_mark(fake, connect, cluster, settings):
    await reconcile(backend_manifest(), SchedulingBackendStatus(), connect, cluster, settings)
    assert pool_owner("uid-backend-local") in fake.pools[POOL].description


@pytest.mark.asyncio
async def test_a_second_backend_naming_the_same_pool_is_stalled(fake, connect, cluster, settings):
    shared = {"name": "shared", "concurrencyLimit": 2}
    await reconcile(
        backend_manifest(workPool=shared), SchedulingBackendStatus(), connect, cluster, settings
    )
    pool = copy.deepcopy(fake.pools["shared"])
    writes = fake.writes
    cluster.applied.clear()
    body = other_backend(workPool={"name": "shared", "concurrencyLimit": 9}, labels=["gpu"])
    outcome = await reconcile(body, SchedulingBackendStatus(), connect, cluster, settings, retry=3)
    assert kstatus(outcome.status) == {
        "Ready": ("False", "WorkPoolOwnedElsewhere"),
        "Reconciling": ("False", "WorkPoolOwnedElsewhere"),
        "Stalled": ("True", "WorkPoolOwnedElsewhere"),
    }
    assert events(outcome) == [("Warning", "WorkPoolOwnedElsewhere")]
    assert "workPool.adopt" in outcome.events[0].message
    assert outcome.retry_in is None
    assert fake.pools["shared"] == pool and fake.writes == writes  # not overwritten
    assert cluster.applied == [] and outcome.status.work_pool_id is None


@pytest.mark.asyncio
async def test_a_second_backend_adopting_the_pool_uses_it_untouched(
    fake, connect, cluster, settings
):
    await reconcile(
        backend_manifest(workPool={"name": "shared"}),
        SchedulingBackendStatus(),
        connect,
        cluster,
        settings,
    )
    pool = copy.deepcopy(fake.pools["shared"])
    writes = fake.writes
    body = other_backend(workPool={"name": "shared", "adopt": True, "concurrencyLimit": 9})
    outcome = await reconcile(body, SchedulingBackendStatus(), connect, cluster, settings)
    assert cond(outcome.status) == ("True", "Reconciled")
    assert outcome.status.work_pool_id == pool.id
    assert fake.pools["shared"] == pool and fake.writes == writes

    # and deleting the adopter leaves the pool to its owner
    assert (await delete(body, outcome.status, connect, settings)).retry_in is None
    assert "shared" in fake.pools


@pytest.mark.asyncio
async def test_deleting_a_backend_leaves_a_pool_marked_by_another(fake, connect, cluster, settings):
    await reconcile(
        backend_manifest(workPool={"name": "shared"}),
        SchedulingBackendStatus(),
        connect,
        cluster,
        settings,
    )
    fake.calls.clear()
    body = other_backend(workPool={"name": "shared"})
    outcome = await delete(body, SchedulingBackendStatus(), connect, settings)
    assert "shared" in fake.pools
    assert fake.calls == {"delete_work_pool": 1}
    assert outcome.retry_in is None
    # its owner's deletion does delete it
    await delete(backend_manifest(workPool={"name": "shared"}), outcome.status, connect, settings)
    assert "shared" not in fake.pools


@pytest.mark.asyncio
async def test_delete_orphan_leaves_the_pool(fake, connect, cluster, settings):
    status = await ready_status(fake, connect, cluster, settings)
    connect.backends.clear()
    outcome = await delete(backend_manifest(deletionPolicy="Orphan"), status, connect, settings)
    assert POOL in fake.pools
    assert not fake.calls and connect.backends == []
    assert events(outcome) == [("Normal", "Orphaned")] and outcome.retry_in is None


@pytest.mark.asyncio
async def test_an_agent_name_taken_by_someone_else_is_stalled(fake, connect, settings):
    cluster = FakeCluster(taken={"local-agent"})
    outcome = await reconcile(
        backend_manifest(generation=5), SchedulingBackendStatus(), connect, cluster, settings
    )
    assert kstatus(outcome.status) == {
        "Ready": ("False", "NameTaken"),
        "Reconciling": ("False", "NameTaken"),
        "Stalled": ("True", "NameTaken"),
    }
    assert [(e.type, e.reason) for e in outcome.events] == [("Warning", "NameTaken")]
    assert "local-agent" in outcome.events[0].message
    assert outcome.events[0].message == outcome.status.conditions[0].message
    assert outcome.retry_in is None
    assert [o["metadata"]["name"] for o in cluster.applied] != ["local-agent"]
    assert all(o["kind"] != "Deployment" for o in cluster.applied)  # never adopted
    assert {c.observed_generation for c in outcome.status.conditions} == {5}


@pytest.mark.asyncio
async def test_conditions_carry_the_observed_generation(fake, connect, cluster, settings):
    outcome = await reconcile(
        backend_manifest(generation=3), SchedulingBackendStatus(), connect, cluster, settings
    )
    assert {c.observed_generation for c in outcome.status.conditions} == {3}


@pytest.mark.asyncio
async def test_an_api_url_with_credentials_is_invalid_and_never_repeated(
    fake, connect, cluster, settings
):
    body = backend_manifest(prefect={"apiUrl": "http://admin:hunter2@prefect:4200/api"})
    outcome = await reconcile(body, SchedulingBackendStatus(), connect, cluster, settings)
    assert cond(outcome.status, "Stalled") == ("True", "InvalidSpec")
    message = outcome.status.conditions[0].message
    assert "apiUrl" in message and "apiKeySecretRef" in message
    assert "hunter2" not in message and "hunter2" not in repr(outcome.events)
    assert not fake.calls and cluster.applied == []


@pytest.mark.asyncio
async def test_check_unreachable_is_reconciling(fake, connect, cluster, settings):
    status = await ready_status(fake, connect, cluster, settings)
    fake.failure = PrefectUnreachable("Prefect answered 503", 503)
    outcome = await check(backend_manifest(), status, connect, cluster)
    assert kstatus(outcome.status)["Reconciling"] == ("True", "PrefectUnreachable")


@pytest.mark.asyncio
async def test_check_rejected_is_stalled_with_one_event(fake, connect, cluster, settings):
    status = await ready_status(fake, connect, cluster, settings)
    fake.failure = PrefectRejected("401: invalid API key", 401)
    outcome = await check(backend_manifest(), status, connect, cluster)
    assert kstatus(outcome.status)["Stalled"] == ("True", "PrefectRejected")
    assert [(e.type, e.reason, e.message) for e in outcome.events] == [
        ("Warning", "PrefectRejected", "401: invalid API key")
    ]
