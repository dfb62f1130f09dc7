"""The in-cluster agent of a SchedulingBackend: Prefect workers as a Deployment, and their RBAC.

Pure functions from a backend spec to Kubernetes objects; the operator applies them and makes
the backend their owner, so deleting the backend removes them.
"""

from __future__ import annotations

from typing import Any

from lume_operator import __version__
from lume_operator.api.backend import SchedulingBackend
from lume_operator.api.common import SecretKeyRef
from lume_operator.backends.base import STORAGE_VOLUME

DEFAULT_WORKER_IMAGE = {
    "kubernetes": "prefecthq/prefect:3-python3.11-kubernetes",
    "docker": "prefecthq/prefect:3-python3.11",
    "process": "prefecthq/prefect:3-python3.11",
}
DEFAULT_WARM_IMAGE = f"lume-operator:{__version__}"
# Only kubernetes workers talk to the Kubernetes API. What prefect-kubernetes 0.8 calls, in its
# namespace only (PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES): the worker creates a
# flow run's Job and deletes it to cancel a run it is still submitting; its observer (kopf)
# lists and watches Jobs and Pods of flow runs, and for a Job that failed before its flow
# started reads the Job, lists the run's Jobs and Pods and reads the Pods' logs. Nothing
# gets a single Pod, touches Events or Secrets (the API key goes by Secret reference), or
# reads Namespaces (tests/k8s/test_rbac.py runs the real worker held to these rules).
# Process and docker workers need no rules at all, so they get no Role.
WORKER_RULES: dict[str, list[dict[str, Any]]] = {
    "kubernetes": [
        {
            "apiGroups": ["batch"],
            "resources": ["jobs"],
            "verbs": ["get", "list", "watch", "create", "delete"],
        },
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
        {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    ],
}
HEALTH_PORT = 8080
# prefect-kubernetes' worker settings (prefect_kubernetes/settings.py, KubernetesWorkerSettings).
K8S_WORKER = "PREFECT_INTEGRATIONS_KUBERNETES_WORKER"
# Non-root and unprivileged, as the Pod Security Standard `restricted` requires.
RESTRICTED_POD = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 1000,
    "fsGroup": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}
RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def agent_name(backend: SchedulingBackend) -> str:
    return f"{backend.metadata.name}-agent"


def agent_labels(backend: SchedulingBackend) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "prefect-worker",
        "app.kubernetes.io/instance": agent_name(backend),
        "app.kubernetes.io/managed-by": "lume-operator",
        "lume.dev/backend": backend.metadata.name,
    }


def warm_agent(backend: SchedulingBackend) -> bool:
    """A process backend's agent starts flow runs warm unless `agent.warmStarts` is false."""
    agent = backend.spec.agent
    return backend.spec.type == "process" and not (agent and agent.warm_starts is False)


def worker_command(backend: SchedulingBackend) -> list[str]:
    """The worker for the backend's pool, type and queues, with its health server:
    `lume-operator worker` (warm starts) for process backends, else `prefect worker start`."""
    if warm_agent(backend):
        command = ["lume-operator", "worker", "--pool", backend.work_pool_name]
    else:
        command = ["prefect", "worker", "start", "--pool", backend.work_pool_name]
        command += ["--type", backend.spec.type]
    command.append("--with-healthcheck")
    for label in backend.spec.labels or []:
        command += ["--work-queue", label]
    return command


def _secret_env(name: str, ref: SecretKeyRef) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def worker_env(backend: SchedulingBackend, api_url: str | None) -> list[dict[str, Any]]:
    """The worker's environment; the API key and auth string only as references to Secrets.

    A kubernetes worker copies its own Prefect settings into every Job it creates: told the
    Secret's name and key, prefect-kubernetes puts a `secretKeyRef` there instead of the value.
    Its observer watches only the backend's namespace, all that the agent's Role allows.
    """
    env: list[dict[str, Any]] = []
    if api_url:
        env.append({"name": "PREFECT_API_URL", "value": api_url})
    prefect = backend.spec.prefect
    kubernetes = backend.spec.type == "kubernetes"
    ref = prefect.api_key_secret_ref if prefect else None
    if ref:
        env.append(_secret_env("PREFECT_API_KEY", ref))
        if kubernetes:
            env += [
                {"name": f"{K8S_WORKER}_API_KEY_SECRET_NAME", "value": ref.name},
                {"name": f"{K8S_WORKER}_API_KEY_SECRET_KEY", "value": ref.key},
            ]
    auth = prefect.auth_string_secret_ref if prefect else None
    if auth:
        env.append(_secret_env("PREFECT_API_AUTH_STRING", auth))
        if kubernetes:
            env += [
                {"name": f"{K8S_WORKER}_API_AUTH_STRING_SECRET_NAME", "value": auth.name},
                {"name": f"{K8S_WORKER}_API_AUTH_STRING_SECRET_KEY", "value": auth.key},
            ]
    if kubernetes:
        env.append(
            {
                "name": "PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES",
                "value": backend.metadata.namespace,
            }
        )
    env += [
        {"name": "PREFECT_WORKER_WEBSERVER_HOST", "value": "0.0.0.0"},
        {"name": "PREFECT_WORKER_WEBSERVER_PORT", "value": str(HEALTH_PORT)},
        {"name": "PREFECT_HOME", "value": "/tmp/prefect"},
        {"name": "HOME", "value": "/tmp"},
        {"name": "PREFECT_SERVER_ANALYTICS_ENABLED", "value": "false"},
    ]
    storage = backend.spec.result_storage
    store = storage.object_store if storage and backend.spec.type == "process" else None
    if store and store.credentials_secret_ref:
        # A process worker's runs inherit its environment: the keys reach them only as
        # references here (kubernetes Jobs get their own, docker containers none).
        ref = store.credentials_secret_ref
        env += [
            _secret_env(
                "AWS_ACCESS_KEY_ID", SecretKeyRef(name=ref.name, key=ref.access_key_id_key)
            ),
            _secret_env(
                "AWS_SECRET_ACCESS_KEY", SecretKeyRef(name=ref.name, key=ref.secret_access_key_key)
            ),
        ]
    agent = backend.spec.agent
    taken = {item["name"] for item in env}
    for name, value in sorted(((agent.env if agent else None) or {}).items()):
        if name not in taken:
            env.append({"name": name, "value": value})
    return env


def _resources(backend: SchedulingBackend) -> dict[str, Any]:
    given = backend.spec.agent.resources if backend.spec.agent else None
    requests = {"cpu": "100m", "memory": "256Mi"}
    limits = {"memory": "1Gi"}
    if given:
        requests.update(
            {k: v for k, v in (("cpu", given.cpu_request), ("memory", given.memory_request)) if v}
        )
        limits.update(
            {k: v for k, v in (("cpu", given.cpu_limit), ("memory", given.memory_limit)) if v}
        )
    return {"requests": requests, "limits": limits}


def agent_objects(
    backend: SchedulingBackend, api_url: str | None, warm_image: str | None = None
) -> list[dict[str, Any]]:
    """ServiceAccount, Role and RoleBinding (kubernetes type only) and the worker Deployment.

    `warm_image`: the default image of a warm process agent (it runs `lume-operator worker`,
    so it needs lume-operator: the operator's own image).
    """
    name = agent_name(backend)
    namespace = backend.metadata.namespace
    labels = agent_labels(backend)
    agent = backend.spec.agent
    meta = {"name": name, "namespace": namespace, "labels": labels}
    objects: list[dict[str, Any]] = []
    account = agent.service_account_name if agent and agent.service_account_name else None
    if account is None:
        account = name
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": meta,
                "automountServiceAccountToken": backend.spec.type == "kubernetes",
            }
        )
    rules = WORKER_RULES.get(backend.spec.type)
    if rules:
        objects.append(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": meta,
                "rules": rules,
            }
        )
        objects.append(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": meta,
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
            }
        )
    container: dict[str, Any] = {
        "name": "worker",
        "image": (
            agent.image
            if agent and agent.image
            else (warm_image or DEFAULT_WARM_IMAGE)
            if warm_agent(backend)
            else DEFAULT_WORKER_IMAGE[backend.spec.type]
        ),
        "command": worker_command(backend),
        "env": worker_env(backend, api_url),
        "ports": [{"name": "health", "containerPort": HEALTH_PORT}],
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": "health"},
            "initialDelaySeconds": 30,
            "periodSeconds": 30,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {"path": "/health", "port": "health"},
            "initialDelaySeconds": 10,
            "periodSeconds": 10,
        },
        "resources": _resources(backend),
        "securityContext": RESTRICTED_CONTAINER,
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    if backend.spec.result_store:
        # Process workers hand their environment to the flows they start.
        container["envFrom"] = [{"secretRef": {"name": backend.spec.result_store.secret_name}}]
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    storage = backend.spec.result_storage
    if storage and storage.volume and backend.spec.type == "process":
        # A process worker's runs write in its own pod: the claim is mounted there.
        claim = storage.volume
        volumes.append(
            {"name": STORAGE_VOLUME, "persistentVolumeClaim": {"claimName": claim.claim_name}}
        )
        container["volumeMounts"].append({"name": STORAGE_VOLUME, "mountPath": claim.mount_path})
    if agent and agent.image_pull_policy:
        container["imagePullPolicy"] = agent.image_pull_policy
    objects.append(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta,
            "spec": {
                "replicas": agent.replicas if agent else 1,
                "selector": {"matchLabels": {"app.kubernetes.io/instance": name}},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": account,
                        "automountServiceAccountToken": backend.spec.type == "kubernetes",
                        "securityContext": RESTRICTED_POD,
                        "containers": [container],
                        "volumes": volumes,
                    },
                },
            },
        }
    )
    return objects
