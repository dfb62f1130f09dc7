"""Result storage both sides reach, end to end (issue 11, item 5): the operator in a subprocess,
kubectl, the emulated API, the real Prefect server, a real process worker started from the
agent Deployment (its keys resolved from the Secret it references), and moto's S3 server on
loopback as the object store. The flow writes where the backend declares, the operator reads
from there with its own credentials, and `lume-operator results get` fetches a file.

A process backend declares the storage so that the path is testable without containers; the
kubernetes and docker backends differ only in how their runs get the same env, volume and
references (tests/unit/test_result_storage_decisions.py checks their job variables).
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lume_operator.results import HDF5File
from tests.conftest import S3
from tests.k8s.conftest import Kubectl
from tests.k8s.emulator import EmulatorServer, wait_until
from tests.k8s.kubelet import KubeletStandIn
from tests.k8s.leaks import assert_no_plain_text
from tests.k8s.prefect_server import PrefectServer

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
OPERATOR = "lume_operator.handlers.operator"
LF = "lume.dev/v1alpha1/lumeflows"
SB = "lume.dev/v1alpha1/schedulingbackends"
FOF = "lume.dev/v1alpha1/flowofflows"
TIMEOUT = 180.0

pytestmark = pytest.mark.prefect

# A flow whose return value names a file outside the backend's storage (as a crafted or
# mistaken flow could): the operator must refuse it rather than look where it says.
OUTSIDE = """
from prefect import flow


@flow(name="outside")
def outside() -> dict:
    return {
        "stolen": {
            "filename": "s3://other-bucket/secrets.h5",
            "filesystem_identifier": "s3://lume-results/beam",
            "file_type_string": "HDF5File",
        }
    }
"""
PIPELINE = """
apiVersion: lume.dev/v1alpha1
kind: FlowOfFlows
metadata: {name: beam-pair, namespace: default}
spec:
  labels: [cpu]
  steps:
    - name: beam
      flowRef: {name: make-beam}
      parameters: {n_particles: 20000}
    - name: envelope
      flowRef: {name: beam-envelope}
      parameters: {length: 5.0, n_points: 50}
      mappedParameters:
        particles: {parentFlow: beam, mapType: file, attributeIndex: [particles]}
"""


@pytest.fixture
def env(shared_prefect_server: PrefectServer, monkeypatch: pytest.MonkeyPatch) -> PrefectServer:
    monkeypatch.setenv("PREFECT_API_URL", shared_prefect_server.api_url)
    monkeypatch.setenv("LUME_OPERATOR_FOLLOW_INTERVAL", "1")
    monkeypatch.delenv("LUME_OPERATOR_FAILPOINT", raising=False)
    # Importing Prefect sets the operator's root logger to WARNING: INFO (kopf's handler and
    # timer records) is what the log search below needs to be worth anything.
    monkeypatch.setenv("PREFECT_LOGGING_ROOT_LEVEL", "INFO")
    return shared_prefect_server


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The beam example and the pipeline's flows, where the worker runs."""
    root = tmp_path / "project"
    shutil.copytree(EXAMPLES / "beam", root)
    shutil.copy(EXAMPLES / "pipeline" / "flows" / "pipeline.py", root / "flows")
    (root / "flows" / "outside.py").write_text(OUTSIDE)
    return root


def backend(storage: dict[str, Any], type_: str = "process", name: str = "local") -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "lume.dev/v1alpha1",
            "kind": "SchedulingBackend",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"type": type_, "labels": ["cpu"], "resultStorage": storage},
        }
    )


def status_of(server: EmulatorServer, resource: str, name: str) -> dict[str, Any]:
    obj = server.emulator.get_object(resource, "default", name) or {}
    return obj.get("status") or {}


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def final(server: EmulatorServer, resource: str, name: str, log: Path) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        status = status_of(server, resource, name)
        return status if status.get("phase") in ("Completed", "Failed") else None

    try:
        return wait_until(done, timeout=TIMEOUT, interval=0.5)
    except AssertionError:
        raise AssertionError(
            f"{name}: {status_of(server, resource, name)}\n{log.read_text()[-4000:]}"
        ) from None


def cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`lume-operator` as a user runs it, with their own environment."""
    return subprocess.run(
        [sys.executable, "-m", "lume_operator.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def apply(kubectl: Kubectl, *manifests: str) -> None:
    for manifest in manifests:
        if manifest.startswith("/"):
            kubectl("apply", "--validate=false", "-f", manifest)
        else:
            kubectl("apply", "--validate=false", "-f", "-", input=manifest)


def test_object_store_results_from_run_to_status_to_user(
    env, s3: S3, project, tmp_path, k8s_emulator, kubectl: Kubectl, run_kopf_operator
):
    bucket = s3.bucket("lume-results")
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "s3-credentials", "namespace": "default"},
        "data": {
            "AWS_ACCESS_KEY_ID": base64.b64encode(s3.access_key_id.encode()).decode(),
            "AWS_SECRET_ACCESS_KEY": base64.b64encode(s3.secret_access_key.encode()).decode(),
        },
    }
    storage = {
        "objectStore": {
            "url": "s3://lume-results/beam",
            "endpointUrl": s3.endpoint,
            "region": s3.region,
            "credentialsSecretRef": {"name": "s3-credentials"},
        }
    }
    operator = run_kopf_operator(OPERATOR, in_subprocess=True, log_path=tmp_path / "operator.log")
    apply(kubectl, yaml.safe_dump(secret), backend(storage))
    sb = wait_until(
        lambda: (s := status_of(k8s_emulator, SB, "local")).get("resultStorageBlock") and s,
        timeout=60,
    )
    assert sb["resultStorageBlock"].startswith("remote-file-system/lume-results-default-local-")
    kubelet = KubeletStandIn(k8s_emulator, "default", "local-agent", project).start()
    try:
        assert kubelet.env["AWS_SECRET_ACCESS_KEY"] == s3.secret_access_key  # by reference
        outside = yaml.safe_load((EXAMPLES / "beam" / "lumeflow.yaml").read_text())
        outside["metadata"]["name"] = "outside"
        outside["spec"].update(entrypoint="flows/outside.py:outside", results=None, parameters={})
        apply(
            kubectl,
            str(EXAMPLES / "beam" / "lumeflow.yaml"),
            yaml.safe_dump(outside),
            str(EXAMPLES / "pipeline" / "flows.yaml"),
        )
        wait_until(
            lambda: all(
                status_of(k8s_emulator, LF, name).get("deploymentId")
                for name in ("make-beam", "beam-envelope")
            ),
            timeout=60,
        )
        apply(kubectl, PIPELINE)
        beam = final(k8s_emulator, LF, "beam-stats", kubelet.log)
        refused = final(k8s_emulator, LF, "outside", kubelet.log)
        pair = final(k8s_emulator, FOF, "beam-pair", kubelet.log)
    finally:
        kubelet.stop()

    # The example completes; status lists where each result is in the store.
    assert beam["phase"] == "Completed", f"{beam}\n{kubelet.log.read_text()[-4000:]}"
    assert condition(beam, "ResultsAvailable")["reason"] == "ResultStorage"
    run_id = beam["lastRun"]["id"]
    results = {r["name"]: r for r in beam["results"]}
    assert results["beam"] == {
        "name": "beam",
        "type": "HDF5File",
        "filesystem": "s3://lume-results/beam",
        "location": f"s3://lume-results/beam/{run_id}/beam.h5",
    }
    assert results["report"]["location"] == f"s3://lume-results/beam/{run_id}/report.txt"
    record, _, path = results["emittance"]["location"].partition("#")
    assert record.startswith("s3://lume-results/beam/prefect/") and path == "emittance"
    # The objects are in the store: the files, and Prefect's record of the return value.
    keys = s3.keys(bucket)
    assert {f"beam/{run_id}/beam.h5", f"beam/{run_id}/report.txt"} <= set(keys)
    assert record.removeprefix("s3://lume-results/") in keys
    assert s3.get(bucket, f"beam/{run_id}/report.txt").startswith(b"particles: 200000")

    # A file outside the declared storage is refused, not looked for where it says.
    assert refused["phase"] == "Failed"
    assert condition(refused, "Ready")["reason"] == "ResultsInvalid"
    assert "is outside the backend's result storage" in condition(refused, "Ready")["message"]

    # Two steps across the store: the second loaded the first's HDF5 file from it.
    assert pair["phase"] == "Completed", f"{pair}\n{kubelet.log.read_text()[-4000:]}"
    steps = {step["name"]: step for step in pair["steps"]}
    envelope = {r["name"]: r for r in steps["envelope"]["results"]}["envelope"]
    step_run = steps["envelope"]["run"]["id"]
    assert envelope["location"] == f"s3://lume-results/beam/{step_run}/envelope.h5"
    beam_run = steps["beam"]["run"]["id"]
    assert f"beam/{beam_run}/particles.h5" in s3.keys(bucket)

    # A user fetches the HDF5 file with their own credentials; the endpoint comes from the
    # backend in the cluster. It loads.
    user = {"AWS_ACCESS_KEY_ID": s3.access_key_id, "AWS_SECRET_ACCESS_KEY": s3.secret_access_key}
    got = cli("results", "get", "lf/beam-stats", "beam", "--kubeconfig", os.environ["KUBECONFIG"],
              cwd=tmp_path, env=user)  # fmt: skip
    assert got.returncode == 0, got.stderr
    data = HDF5File(filename=str(tmp_path / "beam.h5")).read()
    assert data["particles"]["x"].shape == (200000,) and data["stats"]["emittance"] > 0
    value = cli("results", "get", "lf/beam-stats", "emittance", "--kubeconfig",
                os.environ["KUBECONFIG"], cwd=tmp_path, env=user)  # fmt: skip
    assert value.returncode == 0, value.stderr
    assert float(value.stdout) == pytest.approx(data["stats"]["emittance"])
    # Without credentials the store says no, in one line.
    denied = cli("results", "get", "lf/beam-stats", "beam", "-o", "again.h5", "--kubeconfig",
                 os.environ["KUBECONFIG"], cwd=tmp_path, env={})  # fmt: skip
    assert denied.returncode == 1 and "no credentials" in denied.stderr, denied.stderr
    assert "Traceback" not in denied.stderr

    # The keys never appear in plain text: no object but the Secret (in any version), no
    # log, nothing in Prefect (deployments, blocks, pools, runs), no stored object.
    assert "flow_follow" in operator.output()
    assert_no_plain_text(
        (s3.secret_access_key, s3.access_key_id),
        k8s_emulator,
        env,
        {"operator": operator.output(), "worker": kubelet.log.read_text()},
        secret_objects=["s3-credentials"],
    )
    for key in s3.keys(bucket):
        if not key.endswith(".h5"):
            stored = s3.get(bucket, key)
            assert s3.secret_access_key.encode() not in stored, key
            assert s3.access_key_id.encode() not in stored, key


def test_volume_results_and_a_backend_without_storage(
    env, project, tmp_path, monkeypatch, k8s_emulator, kubectl: Kubectl, run_kopf_operator
):
    # The claim: a directory the worker's runs see at its mountPath, and the operator at
    # <volumesRoot>/<namespace>/<claim> (a link to the same directory, as two pods mount one
    # volume at two paths).
    claim = tmp_path / "claims" / "beam-results"
    claim.mkdir(parents=True)
    volumes = tmp_path / "operator-volumes"
    (volumes / "default").mkdir(parents=True)
    (volumes / "default" / "beam-results").symlink_to(claim)
    monkeypatch.setenv("LUME_OPERATOR_VOLUMES_ROOT", str(volumes))
    run_kopf_operator(OPERATOR, in_subprocess=True, log_path=tmp_path / "operator.log")
    storage = {"volume": {"claimName": "beam-results", "mountPath": str(claim)}}
    apply(kubectl, backend(storage), backend({}, "kubernetes", "cluster").replace(
        "  resultStorage: {}\n", ""))  # fmt: skip
    wait_until(lambda: status_of(k8s_emulator, SB, "local").get("workPoolId"), timeout=60)
    agent = k8s_emulator.emulator.get_object("apps/v1/deployments", "default", "local-agent")
    pod = agent["spec"]["template"]["spec"]
    assert {"name": "lume-result-storage", "persistentVolumeClaim": {"claimName": "beam-results"}} in pod["volumes"]  # fmt: skip
    nowhere = yaml.safe_load((EXAMPLES / "beam" / "lumeflow.yaml").read_text())
    nowhere["metadata"]["name"] = "nowhere"
    nowhere["spec"].update(backendRef={"name": "cluster"}, run={"policy": "OnRequest"})
    kubelet = KubeletStandIn(k8s_emulator, "default", "local-agent", project).start()
    try:
        apply(kubectl, str(EXAMPLES / "beam" / "lumeflow.yaml"), yaml.safe_dump(nowhere))
        beam = final(k8s_emulator, LF, "beam-stats", kubelet.log)
    finally:
        kubelet.stop()
    assert beam["phase"] == "Completed", f"{beam}\n{kubelet.log.read_text()[-4000:]}"
    run_id = beam["lastRun"]["id"]
    results = {r["name"]: r for r in beam["results"]}
    assert results["beam"]["location"] == f"{claim}/{run_id}/beam.h5"
    assert results["beam"]["filesystem"] == "pvc/beam-results"
    assert (claim / run_id / "beam.h5").is_file() and any((claim / "prefect").iterdir())
    assert condition(beam, "ResultsAvailable")["reason"] == "ResultStorage"
    got = cli("results", "get", "lf/beam-stats", "report", "--kubeconfig",
              os.environ["KUBECONFIG"], "--volume-path", str(volumes / "default" / "beam-results"),
              cwd=tmp_path, env={})  # fmt: skip
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "report.txt").read_text().startswith("particles: 200000")

    # A kubernetes backend with no storage: its LumeFlow says so, and what to declare.
    nowhere = wait_until(
        lambda: condition(status_of(k8s_emulator, LF, "nowhere"), "ResultsAvailable"),
        timeout=60,
    )
    assert (nowhere["status"], nowhere["reason"]) == ("False", "NoResultStorage")
    assert "declares no spec.resultStorage" in nowhere["message"]
    events = kubectl("get", "events", "-o", "jsonpath={.items[*].reason}").stdout.split()
    assert "NoResultStorage" in events
