"""The operator's lifecycle promises: restarts, deletion and Prefect outages.

- Killed at any point between a Prefect write and the status patch, then restarted: one work
  pool, one deployment and exactly one flow run for the LumeFlow's generation.
- Deleting a LumeFlow removes its Prefect deployment; deleting a backend removes the work pool
  it created but never an adopted one; with Prefect down the finalizer holds until it is back.
- A Prefect outage turns `Ready` False with reason `PrefectUnreachable`, and `Ready` comes back
  by itself when Prefect does, with the same operator process.

Every operator here runs as `kopf run -m lume_operator.handlers.operator` in a subprocess, as in
a pod: the failpoints (`LUME_OPERATOR_FAILPOINT`) end that process with exit code 137, and the
follow interval (`LUME_OPERATOR_FOLLOW_INTERVAL`) is read when the module is imported there.
Agents have `replicas: 0`, so no kubelet is needed; flow runs stay Scheduled (no worker) unless
a test ends them through the Prefect API.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import kmock
import pytest
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.client.schemas.objects import Deployment, FlowRun, WorkPool
from prefect.exceptions import ObjectNotFound
from prefect.states import Failed, Running

from lume_operator.failpoints import ENV as FAILPOINT_ENV
from lume_operator.prefect.port import idempotency_key
from tests.k8s.conftest import KopfOperator, Kubectl
from tests.k8s.emulator import EmulatorServer, wait_until
from tests.k8s.prefect_server import PrefectServer

OPERATOR = "lume_operator.handlers.operator"
LF = "lume.dev/v1alpha1/lumeflows"
SB = "lume.dev/v1alpha1/schedulingbackends"
FINALIZER = "lume.dev/finalizer"
FLOW = "beam-stats"
DEPLOYMENT = f"{FLOW}/default"  # `<flow name>/<namespace>`
POOL = "default-local"  # the default name: <namespace>-<name>
TIMEOUT = 60.0
DELETE_TIMEOUT = 25.0

T = TypeVar("T")

pytestmark = pytest.mark.prefect


def backend_manifest(name: str = "local", work_pool: str = "") -> str:
    """A process backend whose agent has no replicas: Ready needs no kubelet (0 >= 0)."""
    return f"""
apiVersion: lume.dev/v1alpha1
kind: SchedulingBackend
metadata: {{name: {name}, namespace: default}}
spec:
  type: process
  labels: [cpu]
  agent: {{replicas: 0}}
  {work_pool}
"""


def flow_manifest(policy: str = "OnChange") -> str:
    return f"""
apiVersion: lume.dev/v1alpha1
kind: LumeFlow
metadata: {{name: {FLOW}, namespace: default}}
spec:
  backendRef: {{name: local}}
  entrypoint: flows/beam.py:beam_stats
  source: {{path: .}}
  parameters: {{n_particles: 1000}}
  labels: [cpu]
  run: {{policy: {policy}}}
"""


def _use(server: PrefectServer, monkeypatch: pytest.MonkeyPatch) -> PrefectServer:
    """Operators started after this point use `server` and follow it each 1 s."""
    monkeypatch.setenv("PREFECT_API_URL", server.api_url)
    monkeypatch.setenv("LUME_OPERATOR_FOLLOW_INTERVAL", "1")
    monkeypatch.delenv(FAILPOINT_ENV, raising=False)
    return server


@pytest.fixture
def prefect_server(
    shared_prefect_server: PrefectServer, monkeypatch: pytest.MonkeyPatch
) -> PrefectServer:
    """The session's Prefect server, empty (no pool, deployment, flow or run of another test)."""
    return _use(shared_prefect_server, monkeypatch)


@pytest.fixture
def own_prefect_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PrefectServer]:
    """A Prefect server of this test alone, for the tests that stop and start it again.

    The operator's retries come at most 2 s apart (LUME_OPERATOR_MAX_BACKOFF; the bound itself
    is unit tested), so its recovery is seen when Prefect is back, not after a backoff that grew
    to 16 s while it was down. Its Prefect client does not retry a refused connection by itself
    (PREFECT_CLIENT_MAX_RETRIES=0): by default it retries for the whole call timeout (10 s) of
    each attempt, and the outage is the operator's to handle (a timeout is `PrefectUnreachable`
    too: tests/test_gateway.py)."""
    server = PrefectServer(tmp_path / "prefect-server").start()
    monkeypatch.setenv("LUME_OPERATOR_MAX_BACKOFF", "2")
    monkeypatch.setenv("PREFECT_CLIENT_MAX_RETRIES", "0")
    yield _use(server, monkeypatch)
    server.stop()


def on_prefect(server: PrefectServer, call: Callable[[PrefectClient], Awaitable[T]]) -> T:
    """`call(client)` on the test's Prefect server, from the (synchronous) test."""

    async def main() -> T:
        async with PrefectClient(api=server.api_url) as client:
            return await call(client)

    return asyncio.run(main())


def deployment_or_none(server: PrefectServer) -> Deployment | None:
    async def read(client: PrefectClient) -> Deployment | None:
        try:
            return await client.read_deployment_by_name(DEPLOYMENT)
        except ObjectNotFound:
            return None

    return on_prefect(server, read)


def work_pool_or_none(server: PrefectServer, name: str) -> WorkPool | None:
    async def read(client: PrefectClient) -> WorkPool | None:
        try:
            return await client.read_work_pool(name)
        except ObjectNotFound:
            return None

    return on_prefect(server, read)


def flow_runs_of(server: PrefectServer, deployment_id: UUID) -> list[FlowRun]:
    return on_prefect(
        server,
        lambda client: client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        ),
    )


def status_of(server: EmulatorServer, resource: str, name: str) -> dict[str, Any]:
    obj = server.emulator.get_object(resource, "default", name) or {}
    return obj.get("status") or {}


def ready(status: dict[str, Any]) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), {})


def start_operator(
    run_kopf_operator: Callable[..., KopfOperator],
    monkeypatch: pytest.MonkeyPatch,
    failpoint: str | None = None,
) -> KopfOperator:
    """`kopf run` in a subprocess, as in a pod; with a failpoint it dies there (exit 137)."""
    if failpoint is None:
        monkeypatch.delenv(FAILPOINT_ENV, raising=False)
    else:
        monkeypatch.setenv(FAILPOINT_ENV, failpoint)
    return run_kopf_operator(OPERATOR, in_subprocess=True)


def apply(kubectl: Kubectl, manifest: str) -> None:
    kubectl("apply", "--validate=false", "-f", "-", input=manifest)


def wait_status(
    server: EmulatorServer, resource: str, name: str, done: Callable[[dict[str, Any]], Any]
) -> dict[str, Any]:
    """The object's status once `done(status)` holds; on timeout, fail showing the last one."""
    try:
        return wait_until(
            lambda: (status := status_of(server, resource, name)) and done(status) and status,
            timeout=TIMEOUT,
        )
    except AssertionError as error:
        raise AssertionError(
            f"{error}\n{name} status: {status_of(server, resource, name)}"
        ) from None


def wait_backend_ready(server: EmulatorServer, name: str = "local") -> dict[str, Any]:
    return wait_status(
        server, SB, name, lambda s: ready(s).get("status") == "True" and s.get("workPoolId")
    )


# ---- restarts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failpoint", "finish_while_down"),
    [
        ("backend-pool-ensured", False),
        ("backend-agent-applied", False),
        ("flow-deployment-ensured", False),
        ("flow-run-created", False),
        ("flow-run-created", True),
        ("flow-follow-final", False),
    ],
    ids=[
        "backend-pool-ensured",
        "backend-agent-applied",
        "flow-deployment-ensured",
        "flow-run-created",
        "flow-run-created-run-ends-while-down",
        "flow-follow-final",
    ],
)
def test_killed_operator_restarts_without_a_second_flow_run(
    failpoint: str,
    finish_while_down: bool,
    prefect_server: PrefectServer,
    k8s_emulator: EmulatorServer,
    kubectl: Kubectl,
    run_kopf_operator: Callable[..., KopfOperator],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = start_operator(run_kopf_operator, monkeypatch, failpoint)
    apply(kubectl, backend_manifest() + "---" + flow_manifest("OnChange"))
    ends_run = failpoint == "flow-follow-final" or finish_while_down
    if failpoint == "flow-follow-final":
        # The run exists and is followed; end it, so the follower reads a final state.
        run_id = wait_until(
            lambda: (status_of(k8s_emulator, LF, FLOW).get("lastRun") or {}).get("id"),
            timeout=TIMEOUT,
        )
        failed = Failed(message="ended by the test")
        on_prefect(prefect_server, lambda c: c.set_flow_run_state(run_id, failed, force=True))

    wait_until(lambda: not first.alive, timeout=TIMEOUT)
    assert first.returncode == 137, first.output()[-3000:]
    # Killed before its status patch: nothing of that step reached the object.
    killed_status = status_of(k8s_emulator, LF, FLOW)
    if failpoint.startswith("backend-"):
        assert not status_of(k8s_emulator, SB, "local").get("workPoolId")
        assert not killed_status.get("deploymentId")
    elif failpoint in ("flow-deployment-ensured", "flow-run-created"):
        assert not killed_status.get("lastRun")
    else:
        assert killed_status["lastRun"]["stateType"] == "SCHEDULED"

    deployment = deployment_or_none(prefect_server)
    if finish_while_down:
        assert deployment is not None
        runs = flow_runs_of(prefect_server, deployment.id)
        assert len(runs) == 1
        failed = Failed(message="ended by the test")
        on_prefect(prefect_server, lambda c: c.set_flow_run_state(runs[0].id, failed, force=True))

    second = start_operator(run_kopf_operator, monkeypatch)
    backend = wait_backend_ready(k8s_emulator)
    expected_phase = "Failed" if ends_run else "Running"
    status = wait_status(
        k8s_emulator,
        LF,
        FLOW,
        lambda s: s.get("phase") == expected_phase and (s.get("lastRun") or {}).get("id"),
    )
    assert second.alive, second.output()[-3000:]

    # Prefect: one pool, one deployment, exactly one run, made with this generation's key.
    pools = on_prefect(prefect_server, lambda c: c.read_work_pools())
    assert [p.name for p in pools if p.name == POOL] == [POOL]
    pool = work_pool_or_none(prefect_server, POOL)
    assert pool is not None and backend["workPoolId"] == str(pool.id)
    deployments = on_prefect(prefect_server, lambda c: c.read_deployments())
    assert [d.name for d in deployments] == ["default"]
    assert status["deploymentId"] == str(deployments[0].id)
    all_runs = on_prefect(prefect_server, lambda c: c.read_flow_runs())
    runs = flow_runs_of(prefect_server, deployments[0].id)
    assert len(all_runs) == len(runs) == 1, [(r.name, r.idempotency_key) for r in all_runs]
    uid = k8s_emulator.emulator.get_object(LF, "default", FLOW)["metadata"]["uid"]
    assert runs[0].idempotency_key == idempotency_key(uid, 1, 0)
    last = status["lastRun"]
    assert last["id"] == str(runs[0].id)
    assert (last["generation"], last["index"]) == (1, 0)
    assert status["observedGeneration"] == 1
    if ends_run:
        assert last["stateType"] == "FAILED" and last["message"] == "ended by the test"
        assert ready(status)["reason"] == "FlowRunFailed"
    else:
        assert last["stateType"] == "SCHEDULED"
        assert ready(status)["reason"] == "FlowRunning"


# ---- deletion ---------------------------------------------------------------------------------


def test_deletion_removes_what_the_operator_created_in_prefect(
    prefect_server: PrefectServer,
    k8s_emulator: EmulatorServer,
    kubectl: Kubectl,
    run_kopf_operator: Callable[..., KopfOperator],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    on_prefect(
        prefect_server,
        lambda c: c.create_work_pool(WorkPoolCreate(name="shared-pool", type="process")),
    )
    start_operator(run_kopf_operator, monkeypatch)
    apply(
        kubectl,
        backend_manifest()
        + "---"
        + backend_manifest("byo", "workPool: {name: shared-pool, adopt: true}")
        + "---"
        + flow_manifest("OnRequest"),
    )
    assert wait_backend_ready(k8s_emulator)["workPoolName"] == POOL
    assert wait_backend_ready(k8s_emulator, "byo")["workPoolName"] == "shared-pool"
    wait_until(lambda: status_of(k8s_emulator, LF, FLOW).get("deploymentId"), timeout=TIMEOUT)
    assert deployment_or_none(prefect_server) is not None
    flow = k8s_emulator.emulator.get_object(LF, "default", FLOW)
    assert FINALIZER in flow["metadata"]["finalizers"]

    # Deleting takes well under a second; 20 s fails a finalizer held for kopf's 60 s polling.
    kubectl("delete", "lf", FLOW, "--timeout=20s", timeout=DELETE_TIMEOUT)
    assert k8s_emulator.emulator.get_object(LF, "default", FLOW) is None
    assert deployment_or_none(prefect_server) is None

    kubectl("delete", "sb", "local", "byo", "--timeout=20s", timeout=DELETE_TIMEOUT)
    assert k8s_emulator.emulator.get_object(SB, "default", "local") is None
    assert k8s_emulator.emulator.get_object(SB, "default", "byo") is None
    assert work_pool_or_none(prefect_server, POOL) is None
    assert work_pool_or_none(prefect_server, "shared-pool") is not None


def test_a_new_flow_says_deploying_with_the_finalizer_and_keeps_other_finalizers(
    prefect_server: PrefectServer,
    k8s_emulator: EmulatorServer,
    kubectl: Kubectl,
    run_kopf_operator: Callable[..., KopfOperator],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The operator adds its finalizer (with the first status, `Deploying`) to the list it
    found, here another controller's, once, and deleting takes only its own away. (That the
    two come in one handling cycle is not observable here: the bench times it.)"""
    start_operator(run_kopf_operator, monkeypatch)
    keep = "example.org/keep"
    manifest = flow_manifest("OnRequest").replace(
        "namespace: default}", f"namespace: default, finalizers: [{keep}]}}"
    )
    apply(kubectl, backend_manifest() + "---" + manifest)
    wait_until(lambda: status_of(k8s_emulator, LF, FLOW).get("deploymentId"), timeout=TIMEOUT)

    stored = k8s_emulator.emulator._objects[kmock.resource(LF), "default", FLOW]
    versions = [v.raw for v in stored.history.raw if v is not None]
    assert versions[0]["metadata"]["finalizers"] == [keep] and "status" not in versions[0]
    for version in versions[1:]:
        assert version["metadata"]["finalizers"] == [keep, FINALIZER], version["metadata"]
    first = next(v["status"] for v in versions if v.get("status"))
    assert first["phase"] == "Deploying", first
    assert ready(first)["reason"] == "Deploying" and first["observedGeneration"] == 1
    assert status_of(k8s_emulator, LF, FLOW)["phase"] == "Ready"

    # Deleting runs the operator's delete handler, which takes only its own finalizer away.
    kubectl("delete", "lf", FLOW, "--wait=false")
    held = wait_until(
        lambda: (
            (obj := k8s_emulator.emulator.get_object(LF, "default", FLOW))
            and obj["metadata"]["finalizers"] == [keep]
            and obj
        ),
        timeout=DELETE_TIMEOUT,
    )
    assert held["metadata"]["deletionTimestamp"]
    assert deployment_or_none(prefect_server) is None
    kubectl("patch", "lf", FLOW, "--type=merge", "-p", '{"metadata":{"finalizers":null}}')
    wait_until(lambda: k8s_emulator.emulator.get_object(LF, "default", FLOW) is None)


def test_deletion_waits_for_prefect_to_come_back(
    own_prefect_server: PrefectServer,
    k8s_emulator: EmulatorServer,
    kubectl: Kubectl,
    run_kopf_operator: Callable[..., KopfOperator],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    operator = start_operator(run_kopf_operator, monkeypatch)
    apply(kubectl, backend_manifest() + "---" + flow_manifest("OnRequest"))
    wait_backend_ready(k8s_emulator)
    wait_until(lambda: status_of(k8s_emulator, LF, FLOW).get("deploymentId"), timeout=TIMEOUT)

    own_prefect_server.stop()
    kubectl("delete", "lf", FLOW, "--wait=false")
    # Three refused attempts (1 s, then 2 s apart): the object is held all that time.
    wait_until(
        lambda: operator.output().count("waiting to delete the Prefect deployment") >= 3,
        timeout=TIMEOUT,
    )
    held = k8s_emulator.emulator.get_object(LF, "default", FLOW)
    assert held is not None
    assert held["metadata"].get("deletionTimestamp")
    assert FINALIZER in held["metadata"]["finalizers"]

    own_prefect_server.start()
    wait_until(lambda: k8s_emulator.emulator.get_object(LF, "default", FLOW) is None, TIMEOUT)
    assert deployment_or_none(own_prefect_server) is None
    assert operator.alive


# ---- outages ----------------------------------------------------------------------------------


def test_prefect_outage_turns_ready_false_and_recovers_without_a_restart(
    own_prefect_server: PrefectServer,
    k8s_emulator: EmulatorServer,
    kubectl: Kubectl,
    run_kopf_operator: Callable[..., KopfOperator],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    operator = start_operator(run_kopf_operator, monkeypatch)
    pid = operator.pid
    apply(kubectl, backend_manifest())
    before = wait_backend_ready(k8s_emulator)
    assert before["agentReadyReplicas"] == 0

    own_prefect_server.stop()
    down = wait_status(k8s_emulator, SB, "local", lambda s: ready(s).get("status") == "False")
    assert ready(down)["reason"] == "PrefectUnreachable", down
    assert "unreachable" in ready(down)["message"]

    # A LumeFlow applied while Prefect is down waits for it, saying why.
    apply(kubectl, flow_manifest("OnRequest"))
    # (A first `Deploying` status may come before any Prefect call; the reason follows it.)
    waiting = wait_status(
        k8s_emulator, LF, FLOW, lambda s: ready(s).get("reason") == "PrefectUnreachable"
    )
    assert ready(waiting)["status"] == "False"
    assert "unreachable" in ready(waiting)["message"]
    assert not waiting.get("deploymentId")

    own_prefect_server.start()
    after = wait_backend_ready(k8s_emulator)
    assert ready(after)["reason"] == "Reconciled"
    assert after["workPoolId"] == before["workPoolId"]
    deployed = wait_status(k8s_emulator, LF, FLOW, lambda s: ready(s).get("status") == "True")
    assert ready(deployed)["reason"] == "Deployed"
    assert deployed["phase"] == "Ready"
    deployment = deployment_or_none(own_prefect_server)
    assert deployment is not None and deployed["deploymentId"] == str(deployment.id)
    assert operator.alive and operator.pid == pid


def test_prefect_outage_during_a_flow_run_clears_when_prefect_is_back(
    own_prefect_server: PrefectServer,
    k8s_emulator: EmulatorServer,
    kubectl: Kubectl,
    run_kopf_operator: Callable[..., KopfOperator],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A followed run whose state has not changed when Prefect returns: still, `Ready` must
    stop saying Prefect is unreachable (Running, set through the API: no worker, and unlike a
    Scheduled run it does not turn Late on its own)."""
    operator = start_operator(run_kopf_operator, monkeypatch)
    apply(kubectl, backend_manifest() + "---" + flow_manifest("OnChange"))
    created = wait_status(k8s_emulator, LF, FLOW, lambda s: (s.get("lastRun") or {}).get("id"))
    run_id = UUID(created["lastRun"]["id"])
    on_prefect(own_prefect_server, lambda c: c.set_flow_run_state(run_id, Running(), force=True))
    running = wait_status(
        k8s_emulator, LF, FLOW, lambda s: (s.get("lastRun") or {}).get("state") == "Running"
    )
    assert running["phase"] == "Running"
    assert ready(running)["reason"] == "FlowRunning"

    own_prefect_server.stop()
    wait_status(k8s_emulator, LF, FLOW, lambda s: ready(s).get("reason") == "PrefectUnreachable")
    own_prefect_server.start()
    back = wait_status(k8s_emulator, LF, FLOW, lambda s: ready(s).get("reason") == "FlowRunning")
    assert back["phase"] == "Running"
    assert back["lastRun"]["id"] == str(run_id) and back["lastRun"]["state"] == "Running"
    assert operator.alive
