"""The node stand-in itself: pods really run as containers, separated as a cluster separates them.

These prove the harness before the operator's tests lean on it: a pod's user, read-only root,
capabilities, limits, env from Secrets, private emptyDirs, shared claims, Pod Security
admission, and the status and logs the job controller and kubelet write.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import yaml

from tests.k8s.conftest import Kubectl
from tests.k8s.emulator import EmulatorServer, wait_until
from tests.k8s.node import Node, pods_of

RESTRICTED_POD = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 1000,
    "fsGroup": 2000,
    "seccompProfile": {"type": "RuntimeDefault"},
}
RESTRICTED = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}
# What a pod reports about itself, as JSON on its last line of output.
PROBE = r"""
import json, os, pathlib
report = {"uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups())}
try:
    pathlib.Path("/probe-root").write_text("x")
    report["root_writable"] = True
except OSError as error:
    report["root_writable"] = False
    report["root_error"] = error.strerror
pathlib.Path("/scratch/mine").write_text(os.environ["HOSTNAME"])
report["scratch"] = sorted(p.name for p in pathlib.Path("/scratch").iterdir())
report["env"] = {k: os.environ.get(k) for k in ("PASSWORD", "MODE", "POD", "REF", "CFG_LEVEL")}
report["sa_mounted"] = pathlib.Path("/var/run/secrets/kubernetes.io/serviceaccount").exists()
status = pathlib.Path("/proc/self/status").read_text()
report["cap_eff"] = next(l.split()[1] for l in status.splitlines() if l.startswith("CapEff"))
report["no_new_privs"] = next(l.split()[1] for l in status.splitlines() if l.startswith("NoNewPrivs"))
print(json.dumps(report))
"""


def job(name: str, command: list[str], image: str, **pod: Any) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "main",
        "image": image,
        "command": command,
        "securityContext": copy.deepcopy(RESTRICTED),
    }
    container.update(pod.pop("container", {}))
    spec = {
        "securityContext": copy.deepcopy(RESTRICTED_POD),
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "containers": [container],
        **pod,
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"backoffLimit": 0, "template": {"spec": spec}},
    }


def apply(kubectl: Kubectl, *objects: dict[str, Any]) -> None:
    kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump_all(objects))


def job_status(server: EmulatorServer, name: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        obj = server.emulator.get_object("batch/v1/jobs", "default", name) or {}
        status = obj.get("status") or {}
        types = {c["type"] for c in status.get("conditions") or [] if c["status"] == "True"}
        return status if types & {"Complete", "Failed"} else None

    try:
        return wait_until(done, timeout=60, interval=0.2)
    except AssertionError as error:
        pods = [p.get("status") for p in pods_of(server, "default", {"job-name": name})]
        events = [e["message"] for e in server.list_objects("v1/events", "default")]
        raise AssertionError(f"{error}\npods: {pods}\nevents: {events}") from None


def test_a_job_runs_as_a_separated_container(
    node: Node, kubectl: Kubectl, k8s_emulator: EmulatorServer, base_image: str
) -> None:
    apply(
        kubectl,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "creds", "namespace": "default"},
            "stringData": {"password": "s3cret", "mode": "fast"},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "cfg", "namespace": "default"},
            "data": {"LEVEL": "debug"},
        },
        job(
            "probe",
            ["python3", "-c", PROBE],
            base_image,
            container={
                "env": [
                    {
                        "name": "PASSWORD",
                        "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}},
                    },
                    {
                        "name": "POD",
                        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                    },
                    {"name": "REF", "value": "pod=$(POD)"},
                ],
                "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
                "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
                "resources": {"limits": {"cpu": "0.5", "memory": "256Mi"}},
            },
            volumes=[{"name": "scratch", "emptyDir": {}}],
        ),
    )
    status = job_status(k8s_emulator, "probe")
    assert status["succeeded"] == 1, status
    assert [c["type"] for c in status["conditions"]] == ["SuccessCriteriaMet", "Complete"]
    (pod,) = pods_of(k8s_emulator, "default", {"job-name": "probe"})
    name = pod["metadata"]["name"]
    assert pod["status"]["phase"] == "Succeeded"
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 0 and terminated["reason"] == "Completed"
    report = json.loads(kubectl("logs", name).stdout.strip().splitlines()[-1])
    assert report["uid"] == 1000 and report["gid"] == 1000
    assert 2000 in report["groups"]  # fsGroup
    assert report["root_writable"] is False and report["root_error"] == "Read-only file system"
    assert report["scratch"] == ["mine"]
    assert report["env"] == {
        "PASSWORD": "s3cret",
        "MODE": None,
        "POD": name,
        "REF": f"pod={name}",
        "CFG_LEVEL": "debug",
    }
    assert report["sa_mounted"] is False
    assert int(report["cap_eff"], 16) == 0
    assert report["no_new_privs"] == "1"
    inspected = node.container_of("default", name).attrs["HostConfig"]
    assert inspected["NanoCpus"] == 500_000_000
    assert inspected["Memory"] == 256 * 1024**2
    assert inspected["NetworkMode"] == "host"


def test_admission_refuses_what_pod_security_refuses(
    node: Node, kubectl: Kubectl, k8s_emulator: EmulatorServer, base_image: str
) -> None:
    privileged = job("privileged", ["true"], base_image)
    privileged["spec"]["template"]["spec"]["containers"][0]["securityContext"] = {
        "privileged": True
    }
    apply(kubectl, privileged)
    event = wait_until(
        lambda: next(
            (
                e
                for e in k8s_emulator.list_objects("v1/events", "default")
                if e["reason"] == "FailedCreate" and e["involvedObject"]["name"] == "privileged"
            ),
            None,
        ),
        timeout=20,
    )
    assert 'violates PodSecurity "restricted:latest"' in event["message"]
    assert "privileged" in event["message"]
    assert list(pods_of(k8s_emulator, "default", {"job-name": "privileged"})) == []

    pod = job("x", ["true"], base_image)["spec"]["template"]
    bare = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "host", "namespace": "default"},
        "spec": {
            **pod["spec"],
            "volumes": [{"name": "h", "hostPath": {"path": "/etc"}}],
        },
    }
    refused = kubectl(
        "apply", "--validate=false", "-f", "-", input=yaml.safe_dump(bare), check=False
    )
    assert refused.returncode != 0
    assert "violates PodSecurity" in refused.stderr and "hostPath" in refused.stderr

    nobody = {**bare, "spec": {**pod["spec"], "serviceAccountName": "ghost"}}
    refused = kubectl(
        "apply", "--validate=false", "-f", "-", input=yaml.safe_dump(nobody), check=False
    )
    assert 'serviceaccount "ghost" not found' in refused.stderr


def test_a_failing_job_fails_as_the_job_controller_says(
    node: Node, kubectl: Kubectl, k8s_emulator: EmulatorServer, base_image: str
) -> None:
    apply(kubectl, job("fails", ["python3", "-c", "print('bye'); raise SystemExit(3)"], base_image))
    status = job_status(k8s_emulator, "fails")
    assert status["failed"] == 1 and "succeeded" not in status
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    (pod,) = pods_of(k8s_emulator, "default", {"job-name": "fails"})
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (3, "Error")
    assert kubectl("logs", pod["metadata"]["name"]).stdout == "bye\n"


def test_run_as_non_root_is_verified_against_the_image(
    node: Node, kubectl: Kubectl, k8s_emulator: EmulatorServer, base_image: str
) -> None:
    unverifiable = job("root", ["true"], base_image)
    del unverifiable["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    apply(kubectl, unverifiable)

    def waiting() -> dict[str, Any] | None:
        for pod in pods_of(k8s_emulator, "default", {"job-name": "root"}):
            for status in (pod.get("status") or {}).get("containerStatuses") or []:
                if "CreateContainerConfigError" in json.dumps(status):
                    return status
        return None

    status = wait_until(waiting, timeout=20)
    assert "runAsNonRoot and image will run as root" in status["state"]["waiting"]["message"]


def test_claims_are_shared_and_empty_dirs_are_not(
    node: Node, kubectl: Kubectl, k8s_emulator: EmulatorServer, base_image: str
) -> None:
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "shared", "namespace": "default"},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    mounts = {
        "volumeMounts": [
            {"name": "data", "mountPath": "/data"},
            {"name": "scratch", "mountPath": "/scratch"},
        ]
    }
    volumes = [
        {"name": "data", "persistentVolumeClaim": {"claimName": "shared"}},
        {"name": "scratch", "emptyDir": {}},
    ]
    write = (
        "import pathlib; pathlib.Path('/data/out').write_text('42'); "
        "pathlib.Path('/scratch/private').write_text('x')"
    )
    apply(
        kubectl,
        claim,
        job("writer", ["python3", "-c", write], base_image, container=mounts, volumes=volumes),
    )
    assert job_status(k8s_emulator, "writer").get("succeeded") == 1
    read = (
        "import pathlib; print(pathlib.Path('/data/out').read_text(), "
        "sorted(p.name for p in pathlib.Path('/scratch').iterdir()))"
    )
    apply(
        kubectl,
        job("reader", ["python3", "-c", read], base_image, container=mounts, volumes=volumes),
    )
    assert job_status(k8s_emulator, "reader").get("succeeded") == 1
    (pod,) = pods_of(k8s_emulator, "default", {"job-name": "reader"})
    assert kubectl("logs", pod["metadata"]["name"]).stdout == "42 []\n"
    assert (node.volume_path("default", "shared") / "out").read_text() == "42"
    claimed = k8s_emulator.emulator.get_object("v1/persistentvolumeclaims", "default", "shared")
    assert claimed is not None and claimed["status"]["phase"] == "Bound"


def test_a_deployment_gets_a_ready_pod_and_loses_it_when_deleted(
    node: Node, kubectl: Kubectl, k8s_emulator: EmulatorServer, base_image: str
) -> None:
    from tests.k8s.prefect_server import free_port

    port = free_port()
    pod = job(
        "x",
        ["python3", "-m", "http.server", str(port), "-d", "/tmp"],
        base_image,
        container={
            "ports": [{"name": "http", "containerPort": port}],
            "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        },
        volumes=[{"name": "tmp", "emptyDir": {}}],
    )["spec"]["template"]
    pod["spec"].update(restartPolicy="Always", terminationGracePeriodSeconds=1)
    pod["metadata"] = {"labels": {"app": "web"}}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}}, "template": pod},
    }
    apply(kubectl, deployment)
    status = wait_until(
        lambda: (
            (k8s_emulator.emulator.get_object("apps/v1/deployments", "default", "web") or {})
            .get("status", {})
            .get("readyReplicas")
            == 1
        ),
        timeout=30,
    )
    assert status
    (running,) = pods_of(k8s_emulator, "default", {"app": "web"})
    container = node.container_of("default", running["metadata"]["name"])
    kubectl("delete", "deployment", "web")
    wait_until(lambda: not list(pods_of(k8s_emulator, "default", {"app": "web"})), timeout=20)
    wait_until(lambda: _gone(container), timeout=30)


def _gone(container: Any) -> bool:
    import docker.errors

    try:
        container.reload()
    except docker.errors.NotFound:
        return True
    return False
