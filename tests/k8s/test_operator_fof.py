"""A FlowOfFlows applied to the emulated cluster runs as a DAG on Prefect, with per-step status."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.k8s.conftest import Kubectl
from tests.k8s.emulator import wait_until
from tests.k8s.kubelet import KubeletStandIn
from tests.k8s.prefect_server import PrefectServer

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "fof"
FOF = "lume.dev/v1alpha1/flowofflows"
SB = "lume.dev/v1alpha1/schedulingbackends"

pytestmark = pytest.mark.prefect

BACKEND = """
apiVersion: lume.dev/v1alpha1
kind: SchedulingBackend
metadata: {name: local, namespace: default}
spec:
  type: process
"""
PIPELINE = """
apiVersion: lume.dev/v1alpha1
kind: FlowOfFlows
metadata: {name: fan, namespace: default}
spec:
  steps:
    - name: a
      flowRef: {name: source}
      parameters: {value: 4}
    - name: b
      flowRef: {name: add}
      parameters: {right: 1}
      mappedParameters:
        left: {parentFlow: a, attributeIndex: [value]}
    - name: c
      flowRef: {name: explode}
      mappedParameters:
        value: {parentFlow: a, attributeIndex: [doubled]}
    - name: d
      flowRef: {name: add}
      mappedParameters:
        left: {parentFlow: c, attributeIndex: [sum]}
"""


@pytest.fixture
def prefect_server(
    shared_prefect_server: PrefectServer, monkeypatch: pytest.MonkeyPatch
) -> PrefectServer:
    """The session's Prefect server, empty; operators started after this point use it."""
    monkeypatch.setenv("PREFECT_API_URL", shared_prefect_server.api_url)
    # Follow each 1 s (the default is 5). In thread mode the operator module reads this when
    # first imported in the test process, so it holds only if no earlier test imported it.
    monkeypatch.setenv("LUME_OPERATOR_FOLLOW_INTERVAL", "1")
    return shared_prefect_server


def test_a_flow_of_flows_runs_in_the_cluster_with_per_step_status(
    prefect_server, tmp_path, k8s_emulator, kubectl: Kubectl, run_kopf_operator
):
    project = tmp_path / "project"
    shutil.copytree(DATA, project)
    run_kopf_operator("lume_operator.handlers.operator")
    kubectl("apply", "--validate=false", "-f", "-", input=BACKEND)
    wait_until(
        lambda: (
            (k8s_emulator.emulator.get_object(SB, "default", "local") or {})
            .get("status", {})
            .get("workPoolId")
        ),
        timeout=30,
    )
    kubelet = KubeletStandIn(k8s_emulator, "default", "local-agent", project).start()
    try:
        kubectl("apply", "--validate=false", "-f", str(project / "flows.yaml"))
        kubectl("apply", "--validate=false", "-f", "-", input=PIPELINE)
        final = wait_until(
            lambda: (
                (k8s_emulator.emulator.get_object(FOF, "default", "fan") or {}).get("status", {})
                if (k8s_emulator.emulator.get_object(FOF, "default", "fan") or {})
                .get("status", {})
                .get("phase")
                in ("Completed", "Failed")
                else None
            ),
            timeout=180,
            interval=0.5,
        )
    finally:
        kubelet.stop()
    steps = {step["name"]: step for step in final["steps"]}
    assert {name: step["phase"] for name, step in steps.items()} == {
        "a": "Completed",
        "b": "Completed",
        "c": "Failed",
        "d": "Skipped",
    }, (final, kubelet.log.read_text()[-3000:])
    assert final["phase"] == "Failed" and final["observedGeneration"] == 1
    ready = next(c for c in final["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "StepFailed"
    assert "step 'c'" in ready["message"] and "boom: cannot handle 8" in ready["message"]
    assert steps["b"]["run"]["stateType"] == "COMPLETED" and "run" not in steps["d"]
    events = kubectl("get", "events", "-o", "jsonpath={.items[*].reason}").stdout.split()
    assert "StepFailed" in events
