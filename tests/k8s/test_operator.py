"""The operator end to end: real kubectl, real kopf, the emulated API, a real Prefect server,
and a worker started from the agent Deployment the operator rendered."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s.conftest import Kubectl
from tests.k8s.emulator import EmulatorServer, wait_until
from tests.k8s.kubelet import KubeletStandIn
from tests.k8s.prefect_server import PrefectServer

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "beam"
OPERATOR = "lume_operator.handlers.operator"
LF = "lume.dev/v1alpha1/lumeflows"
SB = "lume.dev/v1alpha1/schedulingbackends"

pytestmark = pytest.mark.prefect


@pytest.fixture
def prefect_server(
    shared_prefect_server: PrefectServer, monkeypatch: pytest.MonkeyPatch
) -> PrefectServer:
    """The session's Prefect server, empty; operators started after this point use it."""
    monkeypatch.setenv("PREFECT_API_URL", shared_prefect_server.api_url)
    monkeypatch.setenv("LUME_OPERATOR_FOLLOW_INTERVAL", "1")
    return shared_prefect_server


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The beam example's code, where the worker runs (its results land under it)."""
    target = tmp_path / "project"
    shutil.copytree(EXAMPLE, target)
    return target


def status_of(server: EmulatorServer, resource: str, name: str) -> dict[str, Any]:
    obj = server.emulator.get_object(resource, "default", name) or {}
    return obj.get("status") or {}


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def test_apply_runs_the_flow_and_writes_results_into_status(
    prefect_server, project, k8s_emulator, kubectl: Kubectl, run_kopf_operator
):
    run_kopf_operator(OPERATOR)
    kubectl("apply", "--validate=false", "-f", str(EXAMPLE / "backend.yaml"))
    backend = wait_until(lambda: status_of(k8s_emulator, SB, "local").get("workPoolId"), timeout=30)
    assert backend
    status = status_of(k8s_emulator, SB, "local")
    assert status["workPoolName"] == "default-local"
    assert condition(status, "WorkPoolReady")["status"] == "True"
    assert condition(status, "AgentReady")["status"] == "False"  # no kubelet yet

    # The agent: owned by the backend, a worker for this pool and queue, PSS-restricted.
    deployment = k8s_emulator.emulator.get_object("apps/v1/deployments", "default", "local-agent")
    assert deployment["metadata"]["ownerReferences"][0]["kind"] == "SchedulingBackend"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    # A process backend's agent: Prefect's process worker with warm starts.
    assert container["command"][:4] == ["lume-operator", "worker", "--pool", "default-local"]
    assert container["command"][-2:] == ["--work-queue", "cpu"]
    assert {"name": "PREFECT_API_URL", "value": prefect_server.api_url} in container["env"]
    assert k8s_emulator.emulator.get_object("v1/serviceaccounts", "default", "local-agent")
    # A process worker needs no Kubernetes API access: no Role is made for it.
    assert (
        k8s_emulator.emulator.get_object(
            "rbac.authorization.k8s.io/v1/roles", "default", "local-agent"
        )
        is None
    )

    kubelet = KubeletStandIn(
        k8s_emulator, "default", "local-agent", project,
        extra_env={"LUME_RESULTS_DIR": str(project / "cluster-results")},
    ).start()  # fmt: skip
    try:
        wait_until(
            lambda: (
                condition(status_of(k8s_emulator, SB, "local"), "Ready").get("status") == "True"
            ),
            timeout=30,
        )
        kubectl("apply", "--validate=false", "-f", str(EXAMPLE / "lumeflow.yaml"))
        final = wait_until(
            lambda: (
                status_of(k8s_emulator, LF, "beam-stats").get("phase") in ("Completed", "Failed")
                and status_of(k8s_emulator, LF, "beam-stats")
            ),
            timeout=180,
            interval=0.5,
        )
    finally:
        kubelet.stop()
    assert final["phase"] == "Completed", f"{final}\n{kubelet.log.read_text()[-4000:]}"
    assert final["observedGeneration"] == 1 and final["deploymentId"]
    assert final["lastRun"]["stateType"] == "COMPLETED" and final["lastRun"]["generation"] == 1
    assert final["lastRun"]["url"].startswith(prefect_server.api_url.removesuffix("/api"))
    assert condition(final, "Ready")["status"] == "True"
    results = {r["name"]: r for r in final["results"]}
    assert Path(results["beam"]["location"]).exists()
    assert Path(results["report"]["location"]).read_text().startswith("particles: 200000")
    assert str(project / "cluster-results") in results["beam"]["location"]
    # Read back with kubectl, as users and GitOps tools do.
    shown = yaml.safe_load(kubectl("get", "lf", "beam-stats", "-o", "yaml").stdout)
    assert shown["status"]["phase"] == "Completed"
    events = kubectl("get", "events", "-o", "yaml").stdout
    reasons = [e["reason"] for e in yaml.safe_load(events)["items"]]
    posts = [(e.method, e.path) for e in k8s_emulator.emulator.log if "events" in e.path]
    assert "FlowRunCreated" in reasons and "FlowRunCompleted" in reasons, (reasons, posts)


def test_deleting_the_backend_first_still_removes_the_flows_deployment(
    prefect_server, k8s_emulator, kubectl: Kubectl, run_kopf_operator
):
    import anyio

    from lume_operator.prefect.gateway import PrefectGateway

    run_kopf_operator(OPERATOR)
    backend = yaml.safe_load((EXAMPLE / "backend.yaml").read_text())
    backend["spec"]["agent"] = {"replicas": 0}
    flow = yaml.safe_load((EXAMPLE / "lumeflow.yaml").read_text())
    flow["spec"]["run"] = {"policy": "OnRequest"}
    manifests = yaml.safe_dump_all([backend, flow])
    kubectl("apply", "--validate=false", "-f", "-", input=manifests)
    wait_until(lambda: status_of(k8s_emulator, LF, "beam-stats").get("deploymentId"), timeout=60)

    async def deployment_exists() -> bool:
        async with PrefectGateway.connect(api_url=prefect_server.api_url) as gateway:
            return await gateway.read_deployment("beam-stats", "default") is not None

    assert anyio.run(deployment_exists)
    kubectl("delete", "sb", "local", "--timeout=30s")
    kubectl("delete", "lf", "beam-stats", "--timeout=30s")
    assert k8s_emulator.emulator.get_object(LF, "default", "beam-stats") is None
    assert not anyio.run(deployment_exists)
