"""A node for the emulated cluster: every pod runs as a Docker container of its image.

Why: a test world that runs pods as processes of the test, on its disk and as its user, hides
what a cluster separates (a result written to the pod's own filesystem, a secret copied into a
Job, a pod that fails Pod Security). `Node` plays the parts of a cluster that make pods real:

- admission: a Pod that fails PSS `restricted` (`lume_operator/backends/pss.py`) or names a ServiceAccount that
  does not exist is refused with 403, as the API server's admission plugins do;
- the Deployment and Job controllers: pods for Deployments (no ReplicaSet in between) and Jobs
  (with the labels, owner references, backoff, deadline, TTL and status the job controller
  writes: `active`, `succeeded`, `failed`, Complete/Failed conditions);
- the ServiceAccount controller: a `default` ServiceAccount in every namespace;
- a PVC provisioner: a claim is a directory of the node, shared by every pod that mounts it;
- the kubelet: each container as a container of its image on the host network, with its
  securityContext (user, groups, read-only root, capabilities, no-new-privileges, seccomp),
  its limits, env (`value`, `secretKeyRef`, `configMapKeyRef`, `fieldRef`, `envFrom`, `$(VAR)`),
  only its declared volumes, the ServiceAccount's token, the API's CA and namespace where
  automounted, probes, restarts, and its output kept as the pod's log (`pods/log`).

What it does not model is in `NOT_MODELLED` (and docs/testing.md).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import kmock
from docker.models.containers import Container
from docker.types import Mount
from kubernetes.utils import parse_quantity

from lume_operator.backends.pss import pss_restricted_problems
from tests.k8s.emulator import ApiError, EmulatorServer, _error

log = logging.getLogger(__name__)

NOT_MODELLED = """\
- One node, host networking: every pod shares the host's network (loopback included), so two
  pods declaring the same containerPort cannot run at once (the second stays Pending, as a
  hostNetwork pod would). NetworkPolicies are not enforced.
- No scheduler: resource requests, nodeSelector, affinity and tolerations are not acted on
  (they are checked where the operator renders them); limits are (cpu and memory).
- Deployments own their pods directly (no ReplicaSets); a template change replaces the pods
  at once (no rolling update). Jobs: one pod at a time (parallelism and completions of 1).
- Images are never pulled: a pod whose image is not on the node waits in ErrImagePull, as a
  cluster with no registry would. Build or load images first (as `kind load docker-image`).
- Restart back-off is short (1 s doubling to 10 s, not 10 s to 5 min), to keep tests fast.
- Volumes: emptyDir, persistentVolumeClaim (a directory of the node per claim),
  secret, configMap, projected and downwardAPI; hostPath is refused by admission; others fail.
- Init containers, sidecars, ephemeral containers and lifecycle hooks are not
  run. Startup, liveness and readiness probes: httpGet and tcpSocket (exec and grpc pass).
"""

NODE_NAME = "lume-node"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
LABEL = "lume.test/node"
GRACE_CAP = 10.0  # seconds a stopped container gets at most (terminationGracePeriodSeconds)


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ConfigError(Exception):
    """A container cannot be created: the kubelet's CreateContainerConfigError and friends."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


# ---- admission -------------------------------------------------------------------------------


def pod_admission(server: EmulatorServer) -> Any:
    """PodSecurity (`restricted`, every namespace) and ServiceAccount admission for Pods."""
    pods = kmock.resource("v1/pods")
    accounts = kmock.resource("v1/serviceaccounts")

    def admit(res: kmock.resource, ns: str | None, body: dict[str, Any]) -> None:
        if res != pods or ns is None:
            return
        meta = body.get("metadata") or {}
        name = meta.get("name") or meta.get("generateName") or ""
        spec = body.get("spec") or {}
        problems = pss_restricted_problems(spec, meta.get("annotations"))
        if problems:
            raise _error(
                403,
                "Forbidden",
                f'pods "{name}" is forbidden: violates PodSecurity "restricted:latest": '
                + "; ".join(problems),
            )
        account = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
        if server.emulator._stored(accounts, ns, account) is None:
            raise _error(
                403,
                "Forbidden",
                f'pods "{name}" is forbidden: error looking up service account {ns}/{account}: '
                f'serviceaccount "{account}" not found',
            )

    return admit


# ---- what the kubelet keeps per pod ----------------------------------------------------------


@dataclass
class Probe:
    spec: dict[str, Any]
    next_at: float
    failures: int = 0
    successes: int = 0


@dataclass
class Running:
    """One container of a pod, as the kubelet tracks it."""

    name: str
    container: Container | None = None
    restarts: int = 0
    state: dict[str, Any] = field(default_factory=lambda: {"waiting": {"reason": "Pending"}})
    last_state: dict[str, Any] = field(default_factory=dict)
    ready: bool = False
    log: str = ""  # the output of containers already removed
    restart_at: float = 0.0
    startup: Probe | None = None
    readiness: Probe | None = None
    liveness: Probe | None = None


@dataclass
class PodRecord:
    uid: str
    namespace: str
    name: str
    spec: dict[str, Any]
    directory: Path
    containers: dict[str, Running] = field(default_factory=dict)
    started: str | None = None
    phase: str = "Pending"
    ports: set[int] = field(default_factory=set)
    message: str | None = None
    reason: str | None = None
    deadline_killed: bool = False


class Node:
    """Controllers and a kubelet for one emulated cluster, over one Docker Engine."""

    def __init__(
        self,
        server: EmulatorServer,
        client: docker.DockerClient,
        root: Path,
        *,
        interval: float = 0.25,
    ) -> None:
        self.server, self.docker, self.root = server, client, root
        self.interval = interval
        self.id = secrets.token_hex(4)
        self.pods: dict[str, PodRecord] = {}
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()
        self._job_backoff: dict[str, float] = {}
        self._events: set[str] = set()

    # ---- life -------------------------------------------------------------------------------

    def start(self) -> Node:
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_orphans()
        self.server.emulator.admission.append(pod_admission(self.server))
        self.server.emulator.pod_log = self.pod_log
        self._thread = threading.Thread(target=self._main, name="k8s-node", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)
        with self._lock:
            for record in list(self.pods.values()):
                self._kill(record, grace=0)
            self.pods.clear()
        self.server.emulator.pod_log = None
        if self.errors:
            raise RuntimeError(f"the node failed: {self.errors[0]!r}") from self.errors[0]

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _main(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    self.sync()
            except Exception as error:  # a harness bug: kept for stop() to raise
                log.exception("node sync failed")
                self.errors.append(error)
                if len(self.errors) > 20:
                    return
            self._stop.wait(self.interval)

    def _remove_orphans(self) -> None:
        """Containers of nodes whose test process is gone (a session killed mid-test)."""
        for container in self.docker.containers.list(all=True, filters={"label": LABEL}):
            pid = int(container.labels.get("lume.test/pid", "0"))
            if pid and not _alive(pid):
                with contextlib.suppress(docker.errors.APIError):
                    container.remove(force=True)

    # ---- what tests use ---------------------------------------------------------------------

    def volume_path(self, namespace: str, claim: str) -> Path:
        """The directory a PersistentVolumeClaim is on this node (to seed or inspect it)."""
        path = self.root / "claims" / namespace / claim
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o777)
        return path

    def container_of(self, namespace: str, pod: str, container: str | None = None) -> Container:
        """The Docker container a pod's container runs in (to inspect it through Docker)."""
        with self._lock:
            record = next(
                (r for r in self.pods.values() if (r.namespace, r.name) == (namespace, pod)),
                None,
            )
            assert record is not None, f"pod {namespace}/{pod} is not on this node"
            name = container or next(iter(record.containers))
            running = record.containers[name].container
            assert running is not None, f"{namespace}/{pod}/{name} has no container"
            return running

    def pod_log(self, namespace: str, pod: str, container: str | None) -> tuple[str, bool]:
        with self._lock:
            record = next(
                (r for r in self.pods.values() if (r.namespace, r.name) == (namespace, pod)),
                None,
            )
            if record is None or not record.containers:
                raise _error(400, "BadRequest", f'pod "{pod}" has no running container')
            name = container or next(iter(record.containers))
            if name not in record.containers:
                raise _error(400, "BadRequest", f"container {name} is not valid for pod {pod}")
            running = record.containers[name]
            text = running.log
            if running.container is not None:
                with contextlib.suppress(docker.errors.APIError):
                    text += running.container.logs(stdout=True, stderr=True).decode(
                        errors="replace"
                    )
            return text, record.phase in ("Pending", "Running")

    # ---- one pass ---------------------------------------------------------------------------

    def sync(self) -> None:
        self._service_accounts()
        self._claims()
        self._deployments()
        self._jobs()
        self._kubelet()

    def _service_accounts(self) -> None:
        for namespace in self.server.list_objects("v1/namespaces"):
            ns = namespace["metadata"]["name"]
            if namespace["metadata"].get("deletionTimestamp"):
                continue
            if self.server.emulator.get_object("v1/serviceaccounts", ns, "default") is None:
                with contextlib.suppress(ApiError):
                    self.server.create_object(
                        "v1/serviceaccounts", ns, {"metadata": {"name": "default"}}
                    )

    def _claims(self) -> None:
        for claim in self.server.list_objects("v1/persistentvolumeclaims"):
            if (claim.get("status") or {}).get("phase") == "Bound":
                continue
            meta = claim["metadata"]
            self.volume_path(meta["namespace"], meta["name"])
            spec = claim.get("spec") or {}
            storage = ((spec.get("resources") or {}).get("requests") or {}).get("storage", "1Gi")
            self._status(
                "v1/persistentvolumeclaims",
                claim,
                {
                    "phase": "Bound",
                    "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                    "capacity": {"storage": storage},
                },
            )

    # ---- Deployment controller ----------------------------------------------------------------

    def _deployments(self) -> None:
        pods = self.server.list_objects("v1/pods")
        for deployment in self.server.list_objects("apps/v1/deployments"):
            meta = deployment["metadata"]
            if meta.get("deletionTimestamp"):
                continue
            spec = deployment.get("spec") or {}
            template = spec.get("template") or {}
            digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()
            pod_hash = digest[:10]
            owned = [p for p in pods if _owned_by(p, meta["uid"])]
            current = [
                p
                for p in owned
                if p["metadata"].get("labels", {}).get("pod-template-hash") == pod_hash
            ]
            for pod in owned:
                if pod not in current:
                    self.server.delete_object("v1/pods", meta["namespace"], pod["metadata"]["name"])
            replicas = int(spec.get("replicas", 1))
            for pod in current[replicas:]:
                self.server.delete_object("v1/pods", meta["namespace"], pod["metadata"]["name"])
            current = current[:replicas]
            failure = None
            for _ in range(replicas - len(current)):
                labels = {**(template.get("metadata") or {}).get("labels", {})}
                labels["pod-template-hash"] = pod_hash
                body = _pod_from_template(
                    template,
                    f"{meta['name']}-{pod_hash}-{secrets.token_hex(3)[:5]}",
                    labels,
                    deployment,
                )
                try:
                    current.append(self.server.create_object("v1/pods", meta["namespace"], body))
                except ApiError as error:
                    failure = _message(error)
                    self._event(
                        deployment, "Warning", "FailedCreate", failure, "replicaset-controller"
                    )
            ready = sum(1 for p in current if _pod_ready(p))
            conditions = [
                {
                    "type": "Available",
                    "status": "True" if ready >= replicas else "False",
                    "reason": "MinimumReplicasAvailable"
                    if ready >= replicas
                    else "MinimumReplicasUnavailable",
                },
            ]
            if failure:
                conditions.append(
                    {
                        "type": "ReplicaFailure",
                        "status": "True",
                        "reason": "FailedCreate",
                        "message": failure,
                    }
                )
            status = {
                "observedGeneration": meta.get("generation", 1),
                "replicas": len(current),
                "updatedReplicas": len(current),
                "readyReplicas": ready,
                "availableReplicas": ready,
                "unavailableReplicas": max(replicas - ready, 0),
                "conditions": conditions,
            }
            self._status("apps/v1/deployments", deployment, status)

    # ---- Job controller ---------------------------------------------------------------------

    def _jobs(self) -> None:
        pods = self.server.list_objects("v1/pods")
        for job in self.server.list_objects("batch/v1/jobs"):
            meta = job["metadata"]
            ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
            status = copy.deepcopy(job.get("status") or {})
            if _finished(status):
                ttl = (job.get("spec") or {}).get("ttlSecondsAfterFinished")
                done_at = status.get("completionTime") or _condition_time(status)
                if ttl is not None and done_at and _age(done_at) >= int(ttl):
                    self.server.delete_object("batch/v1/jobs", ns, name)
                continue
            if meta.get("deletionTimestamp"):
                continue
            spec = job.get("spec") or {}
            owned = [p for p in pods if _owned_by(p, uid)]
            active = [p for p in owned if _phase(p) in ("Pending", "Running")]
            succeeded = sum(1 for p in owned if _phase(p) == "Succeeded")
            failed = sum(1 for p in owned if _phase(p) == "Failed")
            status.setdefault("startTime", now())
            status.update(
                active=len(active),
                ready=sum(1 for p in active if _pod_ready(p)),
                succeeded=succeeded,
                failed=failed,
                uncountedTerminatedPods={},
            )
            for key in ("active", "succeeded", "failed"):
                if not status[key]:
                    status.pop(key)
            backoff = int(spec.get("backoffLimit", 6))
            deadline = spec.get("activeDeadlineSeconds")
            if succeeded:
                status.pop("active", None)
                status["completionTime"] = now()
                status["conditions"] = [
                    _condition(
                        "SuccessCriteriaMet",
                        "CompletionsReached",
                        "Reached expected number of succeeded pods",
                    ),
                    _condition(
                        "Complete",
                        "CompletionsReached",
                        "Reached expected number of succeeded pods",
                    ),
                ]
            elif failed > backoff:
                status["conditions"] = [
                    _condition(
                        "FailureTarget",
                        "BackoffLimitExceeded",
                        "Job has reached the specified backoff limit",
                    ),
                    _condition(
                        "Failed",
                        "BackoffLimitExceeded",
                        "Job has reached the specified backoff limit",
                    ),
                ]
            elif deadline is not None and _age(status["startTime"]) >= int(deadline):
                for pod in active:
                    self.server.delete_object("v1/pods", ns, pod["metadata"]["name"])
                status.pop("active", None)
                status["conditions"] = [
                    _condition(
                        "FailureTarget",
                        "DeadlineExceeded",
                        "Job was active longer than specified deadline",
                    ),
                    _condition(
                        "Failed",
                        "DeadlineExceeded",
                        "Job was active longer than specified deadline",
                    ),
                ]
            elif not active and time.monotonic() >= self._job_backoff.get(uid, 0):
                template = spec.get("template") or {}
                labels = {
                    **(template.get("metadata") or {}).get("labels", {}),
                    "batch.kubernetes.io/controller-uid": uid,
                    "batch.kubernetes.io/job-name": name,
                    "controller-uid": uid,
                    "job-name": name,
                }
                body = _pod_from_template(
                    template, f"{name}-{secrets.token_hex(3)[:5]}", labels, job
                )
                try:
                    self.server.create_object("v1/pods", ns, body)
                    status["active"] = 1
                except ApiError as error:
                    self._event(job, "Warning", "FailedCreate", _message(error), "job-controller")
                self._job_backoff[uid] = time.monotonic() + min(2.0**failed, 10.0)
            self._status("batch/v1/jobs", job, status)

    # ---- kubelet ----------------------------------------------------------------------------

    def _kubelet(self) -> None:
        pods = {p["metadata"]["uid"]: p for p in self.server.list_objects("v1/pods")}
        for uid in list(self.pods):
            if uid not in pods or pods[uid]["metadata"].get("deletionTimestamp"):
                record = self.pods.pop(uid)
                self._kill(record, grace=_grace(record.spec))
                if uid in pods:  # a graceful delete: finish it now that the containers are gone
                    self.server.delete_object("v1/pods", record.namespace, record.name)
        for uid, pod in pods.items():
            if pod["metadata"].get("deletionTimestamp"):
                continue
            record = self.pods.get(uid)
            if record is None:
                record = self._admit(pod)
                if record is None:
                    continue
            self._run(record, pod)
            self._status("v1/pods", pod, self._pod_status(record, pod))

    def _admit(self, pod: dict[str, Any]) -> PodRecord | None:
        """Take a pod onto the node once it can run here (its claims exist, its ports are free)."""
        meta, spec = pod["metadata"], pod.get("spec") or {}
        ports = {
            int(port["containerPort"])
            for container in spec.get("containers") or []
            for port in container.get("ports") or []
            if "containerPort" in port
        }
        taken = set().union(*(r.ports for r in self.pods.values())) if self.pods else set()
        if ports & taken:
            self._event(
                pod,
                "Warning",
                "FailedScheduling",
                "0/1 nodes are available: 1 node(s) didn't have free ports for the requested "
                "pod ports.",
                "default-scheduler",
            )
            return None
        for volume in spec.get("volumes") or []:
            claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
            if (
                claim
                and self.server.emulator.get_object(
                    "v1/persistentvolumeclaims", meta["namespace"], claim
                )
                is None
            ):
                self._event(
                    pod,
                    "Warning",
                    "FailedScheduling",
                    f'0/1 nodes are available: persistentvolumeclaim "{claim}" not found.',
                    "default-scheduler",
                )
                return None
        record = PodRecord(
            uid=meta["uid"],
            namespace=meta["namespace"],
            name=meta["name"],
            spec=spec,
            directory=self.root / "pods" / meta["uid"],
            ports=ports,
        )
        record.directory.mkdir(parents=True, exist_ok=True)
        record.started = now()
        for container in spec.get("containers") or []:
            record.containers[container["name"]] = Running(container["name"])
        self.pods[record.uid] = record
        if not pod.get("spec", {}).get("nodeName"):
            self._event(
                pod,
                "Normal",
                "Scheduled",
                f"Successfully assigned {meta['namespace']}/{meta['name']} to {NODE_NAME}",
                "default-scheduler",
            )
        return record

    def _run(self, record: PodRecord, pod: dict[str, Any]) -> None:
        """Start what is due, reap what exited, probe what runs."""
        policy = record.spec.get("restartPolicy", "Always")
        if record.phase in ("Succeeded", "Failed"):
            return
        for spec in record.spec.get("containers") or []:
            running = record.containers[spec["name"]]
            if running.container is None:
                if time.monotonic() < running.restart_at:
                    continue
                self._start(record, pod, spec, running)
                continue
            try:
                running.container.reload()
            except docker.errors.NotFound:
                running.container = None
                continue
            state = running.container.attrs["State"]
            if state["Status"] in ("running", "created", "restarting"):
                self._probe(record, spec, running)
                continue
            code = int(state.get("ExitCode", 0))
            reason = (
                "OOMKilled" if state.get("OOMKilled") else ("Completed" if code == 0 else "Error")
            )
            running.ready = False
            running.state = {
                "terminated": {
                    "exitCode": code,
                    "reason": reason,
                    "startedAt": _docker_time(state.get("StartedAt")),
                    "finishedAt": _docker_time(state.get("FinishedAt")),
                    "containerID": f"docker://{running.container.id}",
                }
            }
            if policy == "Always" or (policy == "OnFailure" and code != 0):
                running.last_state = running.state
                running.log += running.container.logs(stdout=True, stderr=True).decode(
                    errors="replace"
                )
                with contextlib.suppress(docker.errors.APIError):
                    running.container.remove(force=True)
                running.container = None
                running.restarts += 1
                running.restart_at = time.monotonic() + min(2.0 ** (running.restarts - 1), 10.0)
                running.state = {
                    "waiting": {
                        "reason": "CrashLoopBackOff",
                        "message": f"back-off restarting failed container {spec['name']} in "
                        f"pod {record.name}",
                    }
                }
        states = [r.state for r in record.containers.values()]
        if states and all("terminated" in s for s in states) and policy != "Always":
            failed = any(s["terminated"]["exitCode"] != 0 for s in states)
            record.phase = "Failed" if failed else "Succeeded"
        elif any("running" in s for s in states):
            record.phase = "Running"

    def _start(
        self, record: PodRecord, pod: dict[str, Any], spec: dict[str, Any], running: Running
    ) -> None:
        image = spec.get("image", "")
        try:
            self.docker.images.get(image)
        except docker.errors.ImageNotFound:
            pull = spec.get("imagePullPolicy", "IfNotPresent")
            reason = "ErrImageNeverPull" if pull == "Never" else "ErrImagePull"
            running.state = {
                "waiting": {
                    "reason": reason,
                    "message": f'image "{image}" is not present on the node and no registry '
                    f"is reachable (build or load it first)",
                }
            }
            return
        try:
            options = self._container_options(record, pod, spec)
        except ConfigError as error:
            running.state = {"waiting": {"reason": error.reason, "message": error.message}}
            self._event(pod, "Warning", "Failed", f"Error: {error.message}", "kubelet")
            return
        container = self.docker.containers.create(image, **options)
        container.start()
        running.container = container
        started = now()
        running.state = {"running": {"startedAt": started}}
        readiness, liveness = spec.get("readinessProbe"), spec.get("livenessProbe")
        t = time.monotonic()
        running.readiness = (
            Probe(readiness, t + float(readiness.get("initialDelaySeconds", 0)))
            if readiness
            else None
        )
        running.liveness = (
            Probe(liveness, t + float(liveness.get("initialDelaySeconds", 0))) if liveness else None
        )
        running.ready = readiness is None
        self._event(pod, "Normal", "Started", f"Started container {spec['name']}", "kubelet")

    def _probe(self, record: PodRecord, spec: dict[str, Any], running: Running) -> None:
        """Startup first; readiness and liveness only once it passed, as the kubelet does."""
        t = time.monotonic()
        for kind in ("startup", "readiness", "liveness"):
            probe: Probe | None = getattr(running, kind)
            if probe is None or t < probe.next_at:
                continue
            if kind != "startup" and running.startup is not None:
                continue
            probe.next_at = t + float(probe.spec.get("periodSeconds", 10))
            ok = _check(probe.spec, spec)
            if ok:
                probe.successes, probe.failures = probe.successes + 1, 0
            else:
                probe.failures, probe.successes = probe.failures + 1, 0
            if kind == "startup" and ok:
                running.startup = None  # passed: the others take over
                running.ready = running.readiness is None
            elif kind == "readiness":
                if ok and probe.successes >= int(probe.spec.get("successThreshold", 1)):
                    running.ready = True
                elif probe.failures >= int(probe.spec.get("failureThreshold", 3)):
                    running.ready = False
            elif probe.failures >= int(probe.spec.get("failureThreshold", 3)):
                assert running.container is not None
                log.info("liveness failed: restarting %s/%s", record.name, spec["name"])
                running.container.stop(timeout=int(min(_grace(record.spec), GRACE_CAP)))

    # ---- a container's options, as the kubelet derives them --------------------------------

    def _container_options(
        self, record: PodRecord, pod: dict[str, Any], spec: dict[str, Any]
    ) -> dict[str, Any]:
        pod_spec = record.spec
        pod_sc = pod_spec.get("securityContext") or {}
        sc = spec.get("securityContext") or {}
        options: dict[str, Any] = {
            "name": f"k8s_{spec['name']}_{record.name}_{record.namespace}_{record.uid[:8]}_"
            f"{record.containers[spec['name']].restarts}",
            "network_mode": "host",
            "detach": True,
            "labels": {
                LABEL: self.id,
                "lume.test/pid": str(os.getpid()),
                "io.kubernetes.pod.namespace": record.namespace,
                "io.kubernetes.pod.name": record.name,
                "io.kubernetes.container.name": spec["name"],
            },
        }
        image = self.docker.images.get(spec["image"])
        image_user = (image.attrs.get("Config") or {}).get("User") or ""
        uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
        gid = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
        non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        where = f'(pod: "{record.name}_{record.namespace}", container: {spec["name"]})'
        if non_root:
            if uid is not None and int(uid) == 0:
                raise ConfigError(
                    "CreateContainerConfigError",
                    f"container's runAsUser breaks non-root policy {where}",
                )
            if uid is None:
                user = image_user.split(":")[0]
                if user in ("", "root", "0"):
                    raise ConfigError(
                        "CreateContainerConfigError",
                        f"container has runAsNonRoot and image will run as root {where}",
                    )
                if not user.isdigit():
                    raise ConfigError(
                        "CreateContainerConfigError",
                        f"container has runAsNonRoot and image has non-numeric user ({user}), "
                        f"cannot verify user is non-root {where}",
                    )
        if uid is not None:
            options["user"] = f"{uid}:{gid}" if gid is not None else str(uid)
        elif gid is not None:
            options["user"] = f"{image_user.split(':')[0] or 0}:{gid}"
        groups = [str(g) for g in pod_sc.get("supplementalGroups") or []]
        if pod_sc.get("fsGroup") is not None:
            groups.append(str(pod_sc["fsGroup"]))
        if groups:
            options["group_add"] = groups
        options["read_only"] = bool(sc.get("readOnlyRootFilesystem"))
        options["privileged"] = bool(sc.get("privileged"))
        caps = sc.get("capabilities") or {}
        if caps.get("drop"):
            options["cap_drop"] = ["ALL" if c == "ALL" else c for c in caps["drop"]]
        if caps.get("add"):
            options["cap_add"] = list(caps["add"])
        security = []
        if sc.get("allowPrivilegeEscalation") is False:
            security.append("no-new-privileges")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp == "Unconfined":
            security.append("seccomp=unconfined")
        elif seccomp == "Localhost":
            raise ConfigError(
                "CreateContainerConfigError", "Localhost seccomp profiles are not modelled"
            )
        if security:
            options["security_opt"] = security
        limits = (spec.get("resources") or {}).get("limits") or {}
        if "cpu" in limits:
            options["nano_cpus"] = int(parse_quantity(limits["cpu"]) * 1_000_000_000)
        if "memory" in limits:
            options["mem_limit"] = int(parse_quantity(limits["memory"]))
        env = self._env(record, pod, spec)
        options["environment"] = env
        if spec.get("command") is not None:
            options["entrypoint"] = [_expand(a, env) for a in spec["command"]]
            options["command"] = [_expand(a, env) for a in spec.get("args") or []]
        elif spec.get("args") is not None:
            options["command"] = [_expand(a, env) for a in spec["args"]]
        if spec.get("workingDir"):
            options["working_dir"] = spec["workingDir"]
        mounts, tmpfs = self._mounts(record, pod, spec)
        options["mounts"] = mounts
        if tmpfs:
            options["tmpfs"] = tmpfs
        return options

    def _env(self, record: PodRecord, pod: dict[str, Any], spec: dict[str, Any]) -> dict[str, str]:
        ns = record.namespace
        env: dict[str, str] = {}
        https_port = getattr(self.server, "https_port", None)
        if https_port:
            env.update(
                KUBERNETES_SERVICE_HOST="127.0.0.1",
                KUBERNETES_SERVICE_PORT=str(https_port),
                KUBERNETES_SERVICE_PORT_HTTPS=str(https_port),
                KUBERNETES_PORT=f"tcp://127.0.0.1:{https_port}",
            )
        env["HOSTNAME"] = record.name
        for source in spec.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                ref = source["configMapRef"]
                data = self._data("v1/configmaps", ns, ref["name"], ref.get("optional"))
            else:
                ref = source["secretRef"]
                data = self._data("v1/secrets", ns, ref["name"], ref.get("optional"))
            for key, value in (data or {}).items():
                if re.fullmatch(r"[-._a-zA-Z][-._a-zA-Z0-9]*", key):
                    env[prefix + key] = value
        for item in spec.get("env") or []:
            name = item["name"]
            if "valueFrom" not in item:
                env[name] = _expand(item.get("value", ""), env)
                continue
            source = item["valueFrom"]
            value: str | None
            if "secretKeyRef" in source or "configMapKeyRef" in source:
                secret = "secretKeyRef" in source
                ref = source["secretKeyRef" if secret else "configMapKeyRef"]
                data = self._data(
                    "v1/secrets" if secret else "v1/configmaps",
                    ns,
                    ref["name"],
                    ref.get("optional"),
                )
                if data is None:
                    continue
                if ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    kind = "Secret" if secret else "ConfigMap"
                    raise ConfigError(
                        "CreateContainerConfigError",
                        f"couldn't find key {ref['key']} in {kind} {ns}/{ref['name']}",
                    )
                value = data[ref["key"]]
            elif "fieldRef" in source:
                value = _field(pod, source["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in source:
                ref = source["resourceFieldRef"]
                kind, _, resource = ref["resource"].partition(".")
                given = ((spec.get("resources") or {}).get(kind) or {}).get(resource)
                divisor = parse_quantity(ref.get("divisor", "1"))
                value = str(int(-(-parse_quantity(given) // divisor))) if given else "0"
            else:
                raise ConfigError("CreateContainerConfigError", f"env {name}: unknown source")
            if value is not None:
                env[name] = value
        return env

    def _data(
        self, resource: str, ns: str, name: str, optional: bool | None
    ) -> dict[str, str] | None:
        obj = self.server.emulator.get_object(resource, ns, name)
        kind = "secret" if resource == "v1/secrets" else "configmap"
        if obj is None:
            if optional:
                return None
            raise ConfigError("CreateContainerConfigError", f'{kind} "{name}" not found')
        if resource == "v1/secrets":
            data = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
            data.update(obj.get("stringData") or {})
            return data
        return dict(obj.get("data") or {})

    def _mounts(
        self, record: PodRecord, pod: dict[str, Any], spec: dict[str, Any]
    ) -> tuple[list[Mount], dict[str, str]]:
        volumes = {v["name"]: v for v in record.spec.get("volumes") or []}
        mounts: list[Mount] = []
        tmpfs: dict[str, str] = {}
        for mount in spec.get("volumeMounts") or []:
            volume = volumes.get(mount["name"])
            if volume is None:
                raise ConfigError(
                    "CreateContainerConfigError", f"volume {mount['name']!r} is not declared"
                )
            read_only = bool(mount.get("readOnly"))
            empty = volume.get("emptyDir")
            if empty is not None and empty.get("medium") == "Memory":
                size = empty.get("sizeLimit")
                tmpfs[mount["mountPath"]] = "mode=1777" + (
                    f",size={int(parse_quantity(size))}" if size else ""
                )
                continue
            source = self._volume_dir(record, pod, volume)
            if mount.get("subPath"):
                source = source / mount["subPath"]
                source.mkdir(parents=True, exist_ok=True)
            read_only = read_only or any(
                k in volume for k in ("secret", "configMap", "projected", "downwardAPI")
            )
            mounts.append(Mount(mount["mountPath"], str(source), type="bind", read_only=read_only))
        if _automount(self.server, record) and not any(m["Target"] == SA_DIR for m in mounts):
            mounts.append(Mount(SA_DIR, str(self._token_dir(record)), type="bind", read_only=True))
        return mounts, tmpfs

    def _volume_dir(self, record: PodRecord, pod: dict[str, Any], volume: dict[str, Any]) -> Path:
        name = volume["name"]
        if "emptyDir" in volume:
            path = record.directory / "volumes" / name
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o777)
            return path
        if "persistentVolumeClaim" in volume:
            return self.volume_path(record.namespace, volume["persistentVolumeClaim"]["claimName"])
        files: dict[str, tuple[bytes, int]] = {}
        default_mode = 0o644
        if "secret" in volume or "configMap" in volume:
            source = volume.get("secret") or volume.get("configMap")
            default_mode = int(source.get("defaultMode", 0o644))
            files = self._projected_files([volume], record, pod, default_mode)
        elif "projected" in volume:
            default_mode = int(volume["projected"].get("defaultMode", 0o644))
            files = self._projected_files(volume["projected"]["sources"], record, pod, default_mode)
        elif "downwardAPI" in volume:
            files = self._projected_files([volume], record, pod, default_mode)
        else:
            kinds = sorted(k for k in volume if k != "name")
            raise ConfigError("CreateContainerConfigError", f"volume {name}: {kinds} not modelled")
        path = record.directory / "volumes" / name
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        path.chmod(0o755)
        for relative, (content, mode) in files.items():
            target = path / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
            target.chmod(mode)
        return path

    def _projected_files(
        self,
        sources: list[dict[str, Any]],
        record: PodRecord,
        pod: dict[str, Any],
        default_mode: int,
    ) -> dict[str, tuple[bytes, int]]:
        files: dict[str, tuple[bytes, int]] = {}
        for source in sources:
            for kind, resource in (("secret", "v1/secrets"), ("configMap", "v1/configmaps")):
                if kind not in source:
                    continue
                ref = source[kind]
                name = ref.get("secretName") or ref.get("name")
                data = self._data(resource, record.namespace, name, ref.get("optional")) or {}
                items = ref.get("items")
                for key, value in data.items():
                    chosen = [i for i in items if i["key"] == key] if items else [{"path": key}]
                    for item in chosen:
                        files[item["path"]] = (value.encode(), int(item.get("mode", default_mode)))
            if "downwardAPI" in source:
                for item in source["downwardAPI"].get("items") or []:
                    value = _field(pod, item["fieldRef"]["fieldPath"]) if "fieldRef" in item else ""
                    files[item["path"]] = (
                        (value or "").encode(),
                        int(item.get("mode", default_mode)),
                    )
            if "serviceAccountToken" in source:
                files[source["serviceAccountToken"]["path"]] = (
                    self._token(record).encode(),
                    default_mode,
                )
        return files

    def _token(self, record: PodRecord) -> str:
        account = record.spec.get("serviceAccountName") or "default"
        issue = getattr(self.server.emulator, "issue_token", None)
        assert issue is not None, "the emulator issues no tokens (no RBAC support)"
        return str(issue(record.namespace, account))

    def _token_dir(self, record: PodRecord) -> Path:
        """The ServiceAccount's token, the API's CA and the namespace, as the kubelet mounts them."""
        path = record.directory / "serviceaccount"
        path.mkdir(parents=True, exist_ok=True)
        (path / "token").write_text(self._token(record))
        (path / "namespace").write_text(record.namespace)
        ca = getattr(self.server, "ca_path", None)
        if ca:
            shutil.copy(ca, path / "ca.crt")
        for child in path.iterdir():
            child.chmod(0o644)
        return path

    # ---- status and events ------------------------------------------------------------------

    def _pod_status(self, record: PodRecord, pod: dict[str, Any]) -> dict[str, Any]:
        statuses = []
        for spec in record.spec.get("containers") or []:
            running = record.containers[spec["name"]]
            entry: dict[str, Any] = {
                "name": spec["name"],
                "image": spec.get("image"),
                "imageID": "",
                "ready": running.ready,
                "started": "running" in running.state,
                "restartCount": running.restarts,
                "state": running.state,
            }
            if running.last_state:
                entry["lastState"] = running.last_state
            if running.container is not None:
                entry["containerID"] = f"docker://{running.container.id}"
            statuses.append(entry)
        ready = record.phase == "Running" and all(s["ready"] for s in statuses)
        status: dict[str, Any] = {
            "phase": record.phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": record.started,
            "qosClass": "Burstable",
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Initialized", "status": "True"},
                {"type": "ContainersReady", "status": str(ready)},
                {"type": "Ready", "status": str(ready)},
            ],
            "containerStatuses": statuses,
        }
        return status

    def _status(self, resource: str, obj: dict[str, Any], status: dict[str, Any]) -> None:
        """Write status only when it changed (ignoring times, which every pass would renew)."""
        current = obj.get("status") or {}
        if _strip_times(current) == _strip_times(status):
            return
        meta = obj["metadata"]
        with contextlib.suppress(AssertionError, ApiError, KeyError):
            self.server.patch_status(resource, meta.get("namespace"), meta["name"], status)

    def _event(
        self, obj: dict[str, Any], kind: str, reason: str, message: str, component: str
    ) -> None:
        meta = obj["metadata"]
        key = f"{meta.get('uid')}/{reason}/{message}"
        if key in self._events:
            return
        self._events.add(key)
        ns = meta.get("namespace") or "default"
        with contextlib.suppress(ApiError):
            self.server.create_object(
                "v1/events",
                ns,
                {
                    "metadata": {"name": f"{meta['name']}.{secrets.token_hex(8)}"},
                    "involvedObject": {
                        "apiVersion": obj.get("apiVersion"),
                        "kind": obj.get("kind"),
                        "name": meta["name"],
                        "namespace": ns,
                        "uid": meta.get("uid"),
                    },
                    "type": kind,
                    "reason": reason,
                    "message": message,
                    "source": {"component": component, "host": NODE_NAME},
                    "firstTimestamp": now(),
                    "lastTimestamp": now(),
                    "count": 1,
                },
            )

    def _kill(self, record: PodRecord, grace: float) -> None:
        for running in record.containers.values():
            if running.container is None:
                continue
            with contextlib.suppress(docker.errors.APIError):
                if grace > 0:
                    running.container.stop(timeout=int(min(grace, GRACE_CAP)))
                running.container.remove(force=True)
            running.container = None
        shutil.rmtree(record.directory, ignore_errors=True)


# ---- helpers ---------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return any(o.get("uid") == uid for o in obj["metadata"].get("ownerReferences") or [])


def _phase(pod: Mapping[str, Any]) -> str:
    return str((pod.get("status") or {}).get("phase") or "Pending")


def _pod_ready(pod: Mapping[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


def _finished(status: Mapping[str, Any]) -> bool:
    return any(
        c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


def _condition(kind: str, reason: str, message: str) -> dict[str, Any]:
    t = now()
    return {
        "type": kind,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastProbeTime": t,
        "lastTransitionTime": t,
    }


def _condition_time(status: Mapping[str, Any]) -> str | None:
    for condition in status.get("conditions") or []:
        if condition.get("type") in ("Complete", "Failed"):
            return condition.get("lastTransitionTime")
    return None


def _age(stamp: str) -> float:
    then = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    return (datetime.datetime.now(datetime.UTC) - then).total_seconds()


def _docker_time(stamp: str | None) -> str | None:
    return stamp.split(".")[0] + "Z" if stamp and not stamp.startswith("0001") else None


_TIME_KEYS = {
    "lastProbeTime",
    "lastTransitionTime",
    "lastUpdateTime",
    "startTime",
    "startedAt",
    "finishedAt",
    "completionTime",
    "lastHeartbeatTime",
}


def _strip_times(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _strip_times(v) for k, v in value.items() if k not in _TIME_KEYS}
    if isinstance(value, list):
        return [_strip_times(v) for v in value]
    return value


def _grace(spec: Mapping[str, Any]) -> float:
    return float(spec.get("terminationGracePeriodSeconds", 30))


def _message(error: ApiError) -> str:
    return str(error.message or error.reason or error.status)


def _pod_from_template(
    template: Mapping[str, Any], name: str, labels: dict[str, str], owner: Mapping[str, Any]
) -> dict[str, Any]:
    meta = copy.deepcopy(dict(template.get("metadata") or {}))
    meta.update(
        name=name,
        labels=labels,
        ownerReferences=[
            {
                "apiVersion": owner["apiVersion"],
                "kind": owner["kind"],
                "name": owner["metadata"]["name"],
                "uid": owner["metadata"]["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    )
    spec = copy.deepcopy(dict(template.get("spec") or {}))
    spec["nodeName"] = NODE_NAME
    spec.setdefault("serviceAccountName", spec.get("serviceAccount") or "default")
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def _automount(server: EmulatorServer, record: PodRecord) -> bool:
    """Whether the token is mounted: the pod's choice, else its ServiceAccount's, else yes."""
    if record.spec.get("automountServiceAccountToken") is not None:
        return bool(record.spec["automountServiceAccountToken"])
    account = server.emulator.get_object(
        "v1/serviceaccounts", record.namespace, record.spec.get("serviceAccountName") or "default"
    )
    if account is not None and account.get("automountServiceAccountToken") is not None:
        return bool(account["automountServiceAccountToken"])
    return True


def _field(pod: Mapping[str, Any], path: str) -> str | None:
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if match:
        return (meta.get(match[1]) or {}).get(match[2], "")
    values = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": NODE_NAME,
        "spec.serviceAccountName": spec.get("serviceAccountName") or "default",
        "status.hostIP": "127.0.0.1",
        "status.podIP": "127.0.0.1",
        "status.podIPs": "127.0.0.1",
        "status.hostIPs": "127.0.0.1",
    }
    if path not in values:
        raise ConfigError("CreateContainerConfigError", f"fieldRef {path} is not supported")
    return values[path]


def _expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: known names are replaced, `$$` escapes, others stay."""

    def one(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        return env.get(match[1], match[0])

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", one, value)


def _check(probe: Mapping[str, Any], container: Mapping[str, Any]) -> bool:
    """One probe of a container on the host network: httpGet or tcpSocket."""
    timeout = float(probe.get("timeoutSeconds", 1))
    ports = {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}

    def port_of(given: Any) -> int:
        return int(ports[given]) if isinstance(given, str) and not given.isdigit() else int(given)

    if "httpGet" in probe:
        get = probe["httpGet"]
        url = f"{get.get('scheme', 'HTTP').lower()}://127.0.0.1:{port_of(get['port'])}"
        url += get.get("path", "/")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as reply:
                return 200 <= reply.status < 400
        except OSError:
            return False
    if "tcpSocket" in probe:
        try:
            with socket.create_connection(
                ("127.0.0.1", port_of(probe["tcpSocket"]["port"])), timeout=timeout
            ):
                return True
        except OSError:
            return False
    return True  # exec and grpc probes are not run: counted as passing (NOT_MODELLED)


def pods_of(
    server: EmulatorServer, namespace: str, labels: Mapping[str, str]
) -> Iterator[dict[str, Any]]:
    """The pods in a namespace that carry all of `labels`."""
    for pod in server.list_objects("v1/pods", namespace):
        have = pod["metadata"].get("labels") or {}
        if all(have.get(k) == v for k, v in labels.items()):
            yield pod
