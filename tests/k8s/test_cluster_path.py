"""The cluster path with real containers (issue 11): flows run where a cluster runs them.

Each test applies manifests with the real kubectl to the emulated API, runs the real operator
and a real Prefect server, and lets the backend's own Prefect worker start each flow run as a
container of an image built from this repository (`tests/containers/images.py`), on the tests'
own Docker Engine (`tests/containers/engine.py`). What the run and the operator share is only
what a cluster would let them share: the network (host networking, loopback) and the volumes
the run config declares.

Every pod runs on the node (`tests/k8s/node.py`): a container of its image with its
securityContext, admitted by Pod Security `restricted`, its ServiceAccount's token where it is
mounted, held to RBAC by the emulator.

- `test_docker_backend_end_to_end`: a `docker` SchedulingBackend and the beam example; the agent
  pod runs the prefect-docker worker, which runs the flow in a container of the examples image
  with the limits, volume, env, user and read-only root of the run config; status ends
  Completed with result locations on the declared volume.
- `test_kubernetes_backend_end_to_end[objectStore|volume]`: the agent pod runs the
  prefect-kubernetes worker (in-cluster credentials, its Role only); each run is a Job whose
  pod runs the flow as uid 1000 on a read-only root, with a jobTemplatePatch; results on S3
  (moto) or a shared claim, fetched by `results get`; the API key and the store's keys appear
  nowhere in plain text.
- `test_operator_image_runs_the_operator`: the chart's Deployment with the built image, under
  the chart's RBAC.
- `test_flow_of_flows_across_pods`: the example pipeline, parent and steps each in a Job pod,
  mappings across pods through the object store.
- `test_process_backend_agent_runs_flows_in_its_pod`: a process backend's agent pod (a flow
  image) runs `lume-operator worker`, whose warm runs are processes of that pod.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import pytest
import yaml

from tests.conftest import S3
from tests.containers.engine import DockerEngine
from tests.k8s.conftest import Kubectl
from tests.k8s.emulator import EmulatorServer, wait_until
from tests.k8s.leaks import assert_no_plain_text
from tests.k8s.node import Node, pods_of
from tests.k8s.prefect_server import PrefectServer, free_port
from tests.k8s.tools import helm_path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "beam"
OPERATOR = "lume_operator.handlers.operator"
LF = "lume.dev/v1alpha1/lumeflows"
FOF = "lume.dev/v1alpha1/flowofflows"
SB = "lume.dev/v1alpha1/schedulingbackends"
RUN_LABEL = "io.prefect.flow-run-id"  # prefect.io/flow-run-id, as prefect-docker writes it
TIMEOUT = 240.0

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
def flow_containers(docker_engine: DockerEngine) -> Iterator[list[Any]]:
    """The containers a test's flow runs made (appended by the test); removed afterwards, with
    the named volumes they used."""
    made: list[Any] = []
    yield made
    volumes = {m["Name"] for c in made for m in c.attrs["Mounts"] if m["Type"] == "volume"}
    for container in made:
        container.remove(force=True)
    client = docker_engine.client
    for name in volumes:
        client.volumes.get(name).remove(force=True)


def status_of(server: EmulatorServer, resource: str, name: str) -> dict[str, Any]:
    obj = server.emulator.get_object(resource, "default", name) or {}
    return obj.get("status") or {}


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def finished(
    server: EmulatorServer, resource: str, name: str, logs: Callable[[], str] = str
) -> dict[str, Any]:
    """The status once the phase is Completed or Failed; on timeout, the status and `logs()`."""
    try:
        return wait_until(
            lambda: (
                (s := status_of(server, resource, name)).get("phase") in ("Completed", "Failed")
                and s
            ),
            timeout=TIMEOUT,
            interval=0.5,
        )
    except AssertionError:
        raise AssertionError(f"{status_of(server, resource, name)}\n{logs()}") from None


def docker_backend(
    engine: DockerEngine, claim: str, scratch: str, agent_image: str
) -> dict[str, Any]:
    """A docker backend as an admin would declare it: its runs keep results on a volume
    (`resultStorage.volume`: a Docker named volume of the claim's name at /results) that the
    operator mounts too."""
    return {
        "apiVersion": "lume.dev/v1alpha1",
        "kind": "SchedulingBackend",
        "metadata": {"name": "docker", "namespace": "default"},
        "spec": {
            "type": "docker",
            "labels": ["cpu"],
            "resultStorage": {"volume": {"claimName": claim, "mountPath": "/results"}},
            "agent": {
                "replicas": 1,
                "image": agent_image,
                "imagePullPolicy": "Never",
                # The worker reaches the engine over TCP: no socket mounted into its pod.
                "env": {"DOCKER_HOST": engine.tcp_host, "PREFECT_WORKER_QUERY_SECONDS": "2"},
            },
            "runConfig": {
                "imagePullPolicy": "Never",  # built here; no registry to pull from
                "networkMode": "host",
                "cpuLimit": "0.5",
                "memoryLimit": "1Gi",
                "readOnlyRootFilesystem": True,
                "env": {"OMP_NUM_THREADS": "1"},
                "volumes": [
                    # A claim is a Docker named volume, private to the Docker host.
                    {
                        "name": "scratch",
                        "mountPath": "/scratch",
                        "persistentVolumeClaim": {"claimName": scratch},
                    },
                ],
            },
        },
    }


def beam_flow(image: str) -> dict[str, Any]:
    """The beam example, its code in the examples image, on the docker backend."""
    flow = yaml.safe_load((EXAMPLE / "lumeflow.yaml").read_text())
    flow["spec"]["backendRef"] = {"name": "docker"}
    flow["spec"]["source"] = {"image": image, "path": "/opt/examples/beam"}
    flow["spec"]["parameters"]["n_particles"] = 5000
    return flow


def test_docker_backend_end_to_end(
    prefect_server: PrefectServer,
    docker_engine: DockerEngine,
    node: Node,
    operator_image: str,
    examples_image: str,
    flow_containers: list[Any],
    k8s_emulator: EmulatorServer,
    kubectl: Kubectl,
    run_kopf_operator: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    results = tmp_path / "results"
    results.mkdir()
    results.chmod(0o777)  # the flow runs as uid 1000, the test as whoever it is
    # The result volume: a Docker named volume over that directory, which the operator finds
    # where the chart's resultVolumes would mount the claim.
    claim = f"lume-results-{uuid.uuid4().hex[:8]}"
    docker_engine.client.volumes.create(
        name=claim, driver="local",
        driver_opts={"type": "none", "o": "bind", "device": str(results)},
    )  # fmt: skip
    volumes_root = tmp_path / "operator-volumes"
    (volumes_root / "default").mkdir(parents=True)
    (volumes_root / "default" / claim).symlink_to(results)
    monkeypatch.setenv("LUME_OPERATOR_VOLUMES_ROOT", str(volumes_root))
    scratch = f"lume-scratch-{uuid.uuid4().hex[:8]}"
    backend = docker_backend(docker_engine, claim, scratch, operator_image)
    flow = beam_flow(examples_image)
    run_kopf_operator(OPERATOR)
    kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump(backend))
    wait_until(lambda: status_of(k8s_emulator, SB, "docker").get("workPoolId"), timeout=60)
    deployment = k8s_emulator.emulator.get_object("apps/v1/deployments", "default", "docker-agent")
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[3:7] == ["--pool", "default-docker", "--type", "docker"]

    # The agent's pod: a container of the operator image running the real prefect-docker
    # worker, its command and env as rendered.
    wait_until(
        lambda: condition(status_of(k8s_emulator, SB, "docker"), "Ready").get("status") == "True",
        timeout=120,
        interval=0.5,
    )
    (agent,) = pods_of(k8s_emulator, "default", {"lume.dev/backend": "docker"})

    def agent_log() -> str:
        return node.pod_log("default", agent["metadata"]["name"], None)[0][-4000:]

    kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump(flow))
    try:
        final = finished(k8s_emulator, LF, "beam-stats", agent_log)
    finally:
        run_id = status_of(k8s_emulator, LF, "beam-stats").get("lastRun", {}).get("id")
        if run_id:
            client = docker_engine.client
            flow_containers += client.containers.list(
                all=True, filters={"label": f"{RUN_LABEL}={run_id}"}
            )
    logs = "\n".join(c.logs().decode(errors="replace")[-3000:] for c in flow_containers)
    assert final["phase"] == "Completed", f"{final}\n{agent_log()}\n{logs}"

    # One container ran the run, as the run config says.
    assert len(flow_containers) == 1, [c.name for c in flow_containers]
    container = flow_containers[0]
    container.reload()
    config, host = container.attrs["Config"], container.attrs["HostConfig"]
    assert container.attrs["State"]["ExitCode"] == 0
    assert config["Image"] == examples_image
    assert host["NanoCpus"] == 500_000_000  # cpuLimit "0.5"
    assert host["Memory"] == 2 * 1024**3  # the LumeFlow's memoryLimit 2Gi over the backend's 1Gi
    assert host["NetworkMode"] == "host"
    assert host["Binds"] == [f"{scratch}:/scratch:rw", f"{claim}:/results:rw"]
    mounts = {m["Destination"]: m for m in container.attrs["Mounts"]}
    assert (mounts["/scratch"]["Type"], mounts["/scratch"]["Name"]) == ("volume", scratch)
    assert (mounts["/results"]["Type"], mounts["/results"]["Name"]) == ("volume", claim)
    assert host["ReadonlyRootfs"] is True and "/tmp" in host["Tmpfs"]
    assert config["User"] == "1000:1000"
    assert host["CapDrop"] == ["ALL"] and host["SecurityOpt"] == ["no-new-privileges"]
    assert host["Privileged"] is False
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["OMP_NUM_THREADS"] == "1" and env["LUME_RESULTS_FILESYSTEM"] == f"pvc/{claim}"
    assert env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] == "/results/prefect"
    assert env["PREFECT_API_URL"] == prefect_server.api_url
    assert env["PREFECT_RESULTS_DEFAULT_SERIALIZER"] == "json"

    # Status lists where the results are: on the volume (its path as the runs see it), written
    # there by uid 1000, read by the operator through its own mount of the claim.
    located = {r["name"]: r for r in final["results"]}
    assert located["emittance"]["type"] == "value"
    assert located["emittance"]["location"].startswith("/results/prefect/")
    assert located["beam"] == {
        "name": "beam",
        "type": "HDF5File",
        "filesystem": f"pvc/{claim}",
        "location": f"/results/{run_id}/beam.h5",
    }
    beam = results / run_id / "beam.h5"
    assert beam.stat().st_uid == 1000
    with h5py.File(beam) as data:
        assert data["particles"]["x"].shape == (5000,)
    report = (results / Path(located["report"]["location"]).relative_to("/results")).read_text()
    assert report.startswith("particles: 5000\n")
    assert condition(final, "Ready")["status"] == "True"


# ---- the kubernetes backend: pods as containers on the node ----------------------------------

AGENT_USER = "system:serviceaccount:default:kube-agent"


def kubernetes_backend(
    s3: S3, bucket: str, agent_image: str, flow_image: str, storage: str
) -> list[dict[str, Any]]:
    """A kubernetes backend as an admin declares it: the API key and the store's keys only by
    Secret reference, results on the object store or a shared claim, images from the node (no
    registry)."""
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "s3-credentials", "namespace": "default"},
        "type": "Opaque",
        "data": {
            "id": base64.b64encode(s3.access_key_id.encode()).decode(),
            "key": base64.b64encode(s3.secret_access_key.encode()).decode(),
        },
    }
    api_key = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "prefect-api", "namespace": "default"},
        "type": "Opaque",
        "data": {"key": base64.b64encode(CANARY.encode()).decode()},
    }
    backend = {
        "apiVersion": "lume.dev/v1alpha1",
        "kind": "SchedulingBackend",
        "metadata": {"name": "kube", "namespace": "default"},
        "spec": {
            "type": "kubernetes",
            "labels": ["cpu"],
            "prefect": {"apiKeySecretRef": {"name": "prefect-api", "key": "key"}},
            "agent": {
                "replicas": 1,
                "image": agent_image,
                "imagePullPolicy": "Never",
                "env": {"PREFECT_WORKER_QUERY_SECONDS": "2"},
            },
            "runConfig": {
                "image": flow_image,
                "imagePullPolicy": "Never",
                "cpuLimit": "1",
                "memoryLimit": "1Gi",
                "env": {"OMP_NUM_THREADS": "1"},
            },
            # What runConfig has no field for, merged into every run's Job.
            "jobTemplatePatch": {
                "spec": {"template": {"metadata": {"annotations": {"lume.dev/team": "beams"}}}}
            },
            "resultStorage": {
                "objectStore": {
                    "url": f"s3://{bucket}/runs",
                    "endpointUrl": s3.endpoint,
                    "region": s3.region,
                    "credentialsSecretRef": {
                        "name": "s3-credentials",
                        "accessKeyIdKey": "id",
                        "secretAccessKeyKey": "key",
                    },
                }
            },
        },
    }
    if storage == "volume":
        claim = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "results", "namespace": "default"},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }
        backend["spec"]["resultStorage"] = {
            "volume": {"claimName": "results", "mountPath": "/results"}
        }
        return [claim, api_key, backend]
    return [secret, api_key, backend]


# The Prefect API key: a value that must never appear in plain text outside its Secret.
CANARY = "pnu_lume-canary-" + uuid.uuid4().hex


@pytest.mark.parametrize("storage", ["objectStore", "volume"])
def test_kubernetes_backend_end_to_end(
    storage: str,
    prefect_server: PrefectServer,
    s3: S3,
    node: Node,
    operator_image: str,
    examples_image: str,
    k8s_emulator: EmulatorServer,
    kubectl: Kubectl,
    run_kopf_operator: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """kubectl applies a kubernetes backend and the beam example; the agent pod's container runs
    the real prefect-kubernetes worker (in-cluster config, its own Role, held to it); it creates
    the run's Job; the Job's pod container runs the flow as uid 1000 on a read-only root; status
    reaches Completed with result locations on the object store or the shared claim (which the
    operator reads where the chart would mount it); `results get` fetches the HDF5 file. Neither
    the API key nor the store's keys appear in plain text anywhere."""
    bucket = s3.bucket("lume-results")
    # The operator reads a claim where the chart's resultVolumes mounts it: <root>/<ns>/<claim>.
    monkeypatch.setenv("LUME_OPERATOR_VOLUMES_ROOT", str(node.root / "claims"))
    operator = run_kopf_operator(OPERATOR, in_subprocess=True, log_path=tmp_path / "operator.log")
    manifests = kubernetes_backend(s3, bucket, operator_image, examples_image, storage)
    kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump_all(manifests))
    flow = beam_flow(examples_image)
    flow["spec"]["backendRef"] = {"name": "kube"}
    wait_until(
        lambda: condition(status_of(k8s_emulator, SB, "kube"), "Ready").get("status") == "True",
        timeout=120,
        interval=0.5,
    )
    kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump(flow))
    (agent,) = pods_of(k8s_emulator, "default", {"lume.dev/backend": "kube"})
    agent_name = agent["metadata"]["name"]

    def agent_log() -> str:
        return node.pod_log("default", agent_name, None)[0][-5000:]

    final = finished(k8s_emulator, LF, "beam-stats", agent_log)
    run_id = final["lastRun"]["id"]

    def finished_job() -> dict[str, Any] | None:
        # Prefect hears Completed from the flow a moment before its process exits.
        for job in k8s_emulator.list_objects("batch/v1/jobs", "default"):
            labels = job["metadata"].get("labels", {})
            if labels.get("prefect.io/flow-run-id") == run_id and job["status"].get("conditions"):
                return job
        return None

    job = wait_until(finished_job, timeout=60, interval=0.5)
    (pod,) = pods_of(k8s_emulator, "default", {"job-name": job["metadata"]["name"]})
    job_log = node.pod_log("default", pod["metadata"]["name"], None)[0]
    assert final["phase"] == "Completed", f"{final}\nagent:\n{agent_log()}\njob:\n{job_log[-4000:]}"

    # The Job's pod ran as a container of the flow image, separated as the template says.
    assert pod["status"]["phase"] == "Succeeded"
    assert pod["metadata"]["annotations"]["lume.dev/team"] == "beams"  # the jobTemplatePatch
    assert [c["type"] for c in job["status"]["conditions"]] == ["SuccessCriteriaMet", "Complete"]
    container = node.container_of("default", pod["metadata"]["name"])
    config, host = container.attrs["Config"], container.attrs["HostConfig"]
    assert config["Image"] == examples_image
    assert config["User"] == "1000:1000"
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"] and host["SecurityOpt"] == ["no-new-privileges"]
    assert host["NanoCpus"] == 1_000_000_000 and host["Memory"] == 2 * 1024**3
    mounts = {m["Destination"] for m in container.attrs["Mounts"]}
    # No token, no host path: its own scratch, and the claim when results go there.
    assert mounts == ({"/tmp", "/results"} if storage == "volume" else {"/tmp"})
    spec = job["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    env = {e["name"]: e for e in spec["containers"][0]["env"]}
    assert env["PREFECT_API_KEY"] == {
        "name": "PREFECT_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "prefect-api", "key": "key"}},
    }
    if storage == "objectStore":
        secret_ref = env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]
        assert secret_ref["name"] == "s3-credentials"
    # The worker's observer saw the Job's outcome; the worker needed nothing beyond its Role.
    assert k8s_emulator.emulator.refusals(AGENT_USER) == []
    assert any(e.user == AGENT_USER and e.action == "watch" for e in k8s_emulator.emulator.log)

    # Results are on the storage, and a user fetches the HDF5 file, which loads.
    located = {r["name"]: r for r in final["results"]}
    fetch = ["results", "get", "lf/beam-stats", "beam", "--kubeconfig", os.environ["KUBECONFIG"]]
    user: dict[str, str] = {}
    if storage == "objectStore":
        assert located["beam"]["location"].startswith(f"s3://{bucket}/runs/")
        assert any(key.endswith(".h5") for key in s3.keys(bucket, "runs/"))
        user = {
            "AWS_ACCESS_KEY_ID": s3.access_key_id,
            "AWS_SECRET_ACCESS_KEY": s3.secret_access_key,
        }
    else:
        assert located["beam"]["location"] == f"/results/{run_id}/beam.h5"
        claim = node.volume_path("default", "results")
        assert (claim / run_id / "beam.h5").stat().st_uid == 1000  # written by the Job's pod
        fetch += ["--volume-path", str(claim)]
    got = subprocess.run(
        [sys.executable, "-m", "lume_operator.cli", *fetch],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env={**os.environ, **user},
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    with h5py.File(tmp_path / "beam.h5") as data:
        assert data["particles"]["x"].shape == (5000,)

    # The canaries: the Prefect API key and the store's keys, nowhere in plain text.
    secrets = (CANARY, s3.secret_access_key, s3.access_key_id)
    logs = {
        "agent": node.pod_log("default", agent_name, None)[0],
        "job": job_log,
        "operator": operator.output(),
    }
    assert_no_plain_text(
        secrets,
        k8s_emulator,
        prefect_server,
        logs,
        secret_objects=["s3-credentials", "prefect-api"],
    )


def test_operator_image_runs_the_operator(
    prefect_server: PrefectServer,
    node: Node,
    operator_image: str,
    examples_image: str,
    k8s_emulator: EmulatorServer,
    kubectl: Kubectl,
) -> None:
    """The chart's operator Deployment, rendered by helm with the image built from this
    repository, runs as a pod container: in-cluster credentials, the chart's RBAC and nothing
    more, its probes answered; it takes up a backend and a LumeFlow."""
    repository, tag = operator_image.split(":")
    port = free_port()  # host networking: the port must be free on this machine
    rendered = subprocess.run(
        [str(helm_path()), "template", "lume", str(ROOT / "charts" / "lume-operator"),
         "-n", "lume-system", "--set", f"image.repository={repository}",
         "--set", f"image.tag={tag}", "--set", "image.pullPolicy=Never",
         "--set", f"prefectApiUrl={prefect_server.api_url}", "--set", "clusterWide=true",
         "--set", f"probes.port={port}"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    kubectl("apply", "--validate=false", "-f", str(ROOT / "crds"))
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "lume-system"}}
    kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump(namespace))
    kubectl("apply", "--validate=false", "-f", "-", input=rendered)
    (deployment,) = k8s_emulator.list_objects("apps/v1/deployments", "lume-system")
    deployment_name = deployment["metadata"]["name"]

    def ready() -> dict[str, Any] | None:
        d = k8s_emulator.emulator.get_object("apps/v1/deployments", "lume-system", deployment_name)
        return d if d and (d.get("status") or {}).get("readyReplicas") == 1 else None

    try:
        deployment = wait_until(ready, timeout=180, interval=0.5)
    except AssertionError:
        pods = [p.get("status") for p in k8s_emulator.list_objects("v1/pods", "lume-system")]
        events = [e["message"] for e in k8s_emulator.list_objects("v1/events", "lume-system")]
        raise AssertionError(f"operator pod not ready: {pods}\n{events}") from None
    (pod,) = pods_of(k8s_emulator, "lume-system", {"app.kubernetes.io/component": "operator"})
    name = pod["metadata"]["name"]

    def operator_log() -> str:
        return node.pod_log("lume-system", name, None)[0][-4000:]

    # A kubernetes backend whose agent runs no replica, and the example flow on it.
    backend = kubernetes_backend_manifest()
    flow = beam_flow(examples_image)
    flow["spec"]["backendRef"] = {"name": "kube"}
    kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump_all([backend, flow]))
    try:
        wait_until(
            lambda: status_of(k8s_emulator, LF, "beam-stats").get("deploymentId"),
            timeout=120,
            interval=0.5,
        )
    except AssertionError:
        raise AssertionError(
            f"{status_of(k8s_emulator, LF, 'beam-stats')}\n{operator_log()}"
        ) from None
    assert condition(status_of(k8s_emulator, SB, "kube"), "WorkPoolReady")["status"] == "True"
    agent = k8s_emulator.emulator.get_object("apps/v1/deployments", "default", "kube-agent")
    assert agent is not None  # created by the operator pod, under the chart's RBAC
    account = pod["spec"]["serviceAccountName"]
    user = f"system:serviceaccount:lume-system:{account}"
    assert k8s_emulator.emulator.refusals(user) == [], operator_log()
    assert any(e.user == user and e.action == "watch" for e in k8s_emulator.emulator.log)

    # The container: the image's non-root user, read-only root, nothing but what it declares.
    container = node.container_of("lume-system", name)
    config, host = container.attrs["Config"], container.attrs["HostConfig"]
    assert config["Image"] == operator_image and deployment["spec"]["replicas"] == 1
    assert host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"]
    assert config["User"].split(":")[0] == str(pod["spec"]["securityContext"]["runAsUser"])
    top = container.top()
    assert all(row[0] != "root" for row in top["Processes"]), top


def kubernetes_backend_manifest() -> dict[str, Any]:
    return {
        "apiVersion": "lume.dev/v1alpha1",
        "kind": "SchedulingBackend",
        "metadata": {"name": "kube", "namespace": "default"},
        "spec": {"type": "kubernetes", "labels": ["cpu"], "agent": {"replicas": 0}},
    }


def test_flow_of_flows_across_pods(
    prefect_server: PrefectServer,
    s3: S3,
    node: Node,
    operator_image: str,
    examples_image: str,
    k8s_emulator: EmulatorServer,
    kubectl: Kubectl,
    run_kopf_operator: Any,
    tmp_path: Path,
) -> None:
    """The example pipeline on a kubernetes backend: the parent run and each step run in pods of
    their own, whose only common ground is the object store. Mappings of a file in a return
    value, of a task's file (parentTask) and of raw values all cross pods through it."""
    bucket = s3.bucket("lume-results")
    run_kopf_operator(OPERATOR, in_subprocess=True, log_path=tmp_path / "operator.log")
    manifests = kubernetes_backend(s3, bucket, operator_image, examples_image, "objectStore")
    kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump_all(manifests))
    flows = list(yaml.safe_load_all((ROOT / "examples" / "pipeline" / "flows.yaml").read_text()))
    for flow in flows:
        flow["spec"]["backendRef"] = {"name": "kube"}
        flow["spec"]["source"] = {"image": examples_image, "path": "/opt/examples/pipeline"}
    pipeline = yaml.safe_load((ROOT / "examples" / "pipeline" / "pipeline.yaml").read_text())
    pipeline["spec"]["steps"][0]["parameters"]["n_particles"] = 5000
    kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump_all(flows))
    wait_until(
        lambda: all(status_of(k8s_emulator, LF, f["metadata"]["name"]).get("deploymentId")
                    for f in flows),
        timeout=120,
        interval=0.5,
    )  # fmt: skip
    kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump(pipeline))
    final = finished(k8s_emulator, FOF, "beam-study")
    logs = {
        p["metadata"]["name"]: node.pod_log("default", p["metadata"]["name"], None)[0][-2500:]
        for p in k8s_emulator.list_objects("v1/pods", "default")
        if "job-name" in p["metadata"].get("labels", {})
    }
    assert final["phase"] == "Completed", f"{final}\n{logs}"

    # Five Jobs (the parent and four steps), each pod a container of the flow image.
    jobs = k8s_emulator.list_objects("batch/v1/jobs", "default")
    assert len(jobs) == 5, [j["metadata"]["name"] for j in jobs]

    def job_pods() -> list[dict[str, Any]]:
        return [
            p
            for p in k8s_emulator.list_objects("v1/pods", "default")
            if "job-name" in p["metadata"]["labels"]
        ]

    # Prefect hears Completed from a flow a moment before its process exits.
    wait_until(lambda: {p["status"]["phase"] for p in job_pods()} == {"Succeeded"}, timeout=60)
    pods = job_pods()
    containers = {node.container_of("default", p["metadata"]["name"]).id for p in pods}
    assert len(containers) == 5

    # Each step's results are on the store, under its own run; the report read both branches.
    steps = {step["name"]: step for step in final["steps"]}
    assert {name: step["phase"] for name, step in steps.items()} == dict.fromkeys(
        ("beam", "envelope", "emittance", "report"), "Completed"
    )
    report = {r["name"]: r for r in steps["report"]["results"]}["report"]
    key = report["location"].removeprefix(f"s3://{bucket}/")
    text = s3.get(bucket, key).decode()
    # The emittance came raw from one branch, the waist from the other's envelope file.
    assert text.startswith("emittance: ") and "\nwaist: s = " in text, text


def test_process_backend_agent_runs_flows_in_its_pod(
    prefect_server: PrefectServer,
    s3: S3,
    node: Node,
    examples_image: str,
    k8s_emulator: EmulatorServer,
    kubectl: Kubectl,
    run_kopf_operator: Any,
    tmp_path: Path,
) -> None:
    """A process backend in a cluster: its agent pod (a container of a flow image built on the
    operator image) runs `lume-operator worker`, which starts each flow run warm as a process
    of that pod, on its read-only root; results go to the object store."""
    bucket = s3.bucket("lume-results")
    run_kopf_operator(OPERATOR, in_subprocess=True, log_path=tmp_path / "operator.log")
    secret, _, backend = kubernetes_backend(
        s3, bucket, examples_image, examples_image, "objectStore"
    )
    backend["metadata"]["name"] = "procs"
    backend["spec"] = {
        "type": "process",
        "labels": ["cpu"],
        "agent": {"replicas": 1, "image": examples_image, "imagePullPolicy": "Never",
                  "env": {"PREFECT_WORKER_QUERY_SECONDS": "2"}},
        "runConfig": {"env": {"OMP_NUM_THREADS": "1"}},
        "resultStorage": backend["spec"]["resultStorage"],
    }  # fmt: skip
    flow = beam_flow(examples_image)
    flow["spec"]["backendRef"] = {"name": "procs"}
    kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump_all([secret, backend]))
    wait_until(
        lambda: condition(status_of(k8s_emulator, SB, "procs"), "Ready").get("status") == "True",
        timeout=120,
        interval=0.5,
    )
    (agent,) = pods_of(k8s_emulator, "default", {"lume.dev/backend": "procs"})
    name = agent["metadata"]["name"]
    kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump(flow))
    final = finished(
        k8s_emulator, LF, "beam-stats", lambda: node.pod_log("default", name, None)[0][-4000:]
    )
    assert final["phase"] == "Completed", node.pod_log("default", name, None)[0][-4000:]
    container = node.container_of("default", name)
    config, host = container.attrs["Config"], container.attrs["HostConfig"]
    assert config["Entrypoint"][:4] == ["lume-operator", "worker", "--pool", "default-procs"]
    assert config["User"] == "1000:1000" and host["ReadonlyRootfs"] is True
    assert k8s_emulator.list_objects("batch/v1/jobs", "default") == []  # no Job: a process
    located = {r["name"]: r for r in final["results"]}
    assert located["beam"]["location"].startswith(f"s3://{bucket}/runs/")
