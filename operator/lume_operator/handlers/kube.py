"""The few Kubernetes calls the operator makes besides kopf's own: agent objects, Secrets.

The official client is synchronous; each call runs in a worker thread so handlers stay async.
Every verb used here is listed in the chart's RBAC, and nothing else is called.
"""

from __future__ import annotations

import asyncio
import base64
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config import incluster_config

from lume_operator import GROUP, VERSION
from lume_operator.reconcile.outcome import NameTaken


class SecretMissing(Exception):
    """A Secret (or its key) that a spec refers to does not exist, or the operator may not
    read it; `reason` is the condition reason users see."""

    def __init__(self, message: str, reason: str = "SecretNotFound") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PodCredentials:
    """Where a pod reaches the API server, and as whom."""

    server: str
    token: str
    ca_path: str | None
    namespace: str | None


def pod_credentials() -> PodCredentials | None:
    """The pod's ServiceAccount and API address, read as the Kubernetes client's in-cluster
    config reads them ($KUBERNETES_SERVICE_HOST and _PORT, the mounted token and CA), so that
    kopf and the client reach the same server; None outside a pod."""
    host = os.environ.get(incluster_config.SERVICE_HOST_ENV_NAME)
    port = os.environ.get(incluster_config.SERVICE_PORT_ENV_NAME)
    token = Path(incluster_config.SERVICE_TOKEN_FILENAME)
    if not host or not port or not token.is_file():
        return None
    ca = Path(incluster_config.SERVICE_CERT_FILENAME)
    namespace = token.with_name("namespace")
    return PodCredentials(
        server=f"https://{f'[{host}]' if ':' in host else host}:{port}",
        token=token.read_text().strip(),
        ca_path=str(ca) if ca.is_file() else None,
        namespace=namespace.read_text().strip() if namespace.is_file() else None,
    )


def load_config(kubeconfig: str | None = None) -> None:
    """In-cluster config in a pod, else a kubeconfig (given, $KUBECONFIG or ~/.kube/config);
    "in a pod" as for kopf's login (`pod_credentials`), so both use the same identity."""
    if kubeconfig is None and pod_credentials() is not None:
        config.load_incluster_config()
    else:
        # $KUBECONFIG read now: the client library reads it once, at its import.
        config.load_kube_config(config_file=kubeconfig or os.environ.get("KUBECONFIG"))


class Kube:
    """Create-or-patch of the agent's objects, reads of Deployments and Secrets."""

    def __init__(self) -> None:
        api = client.ApiClient()
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.rbac = client.RbacAuthorizationV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    @classmethod
    def configured(cls, kubeconfig: str | None = None) -> Kube:
        """A client configured afresh (in-cluster, or a kubeconfig) for this operator run."""
        load_config(kubeconfig)
        return cls()

    def _methods(self, kind: str) -> tuple[Any, Any, Any]:
        """create, read and patch of a kind the agent is made of."""
        core, rbac, apps = self.core, self.rbac, self.apps
        return {
            "ServiceAccount": (
                core.create_namespaced_service_account,
                core.read_namespaced_service_account,
                core.patch_namespaced_service_account,
            ),
            "Role": (
                rbac.create_namespaced_role,
                rbac.read_namespaced_role,
                rbac.patch_namespaced_role,
            ),
            "RoleBinding": (
                rbac.create_namespaced_role_binding,
                rbac.read_namespaced_role_binding,
                rbac.patch_namespaced_role_binding,
            ),
            "Deployment": (
                apps.create_namespaced_deployment,
                apps.read_namespaced_deployment,
                apps.patch_namespaced_deployment,
            ),
        }[kind]

    def _apply(self, body: dict[str, Any]) -> None:
        create, read, patch = self._methods(body["kind"])
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        try:
            create(namespace, body)
            return
        except ApiException as error:
            if error.status != 409:
                raise
        existing = read(name, namespace)
        owners = {ref.uid for ref in existing.metadata.owner_references or []}
        ours = {ref.get("uid") for ref in body["metadata"].get("ownerReferences") or []}
        if not owners & ours:
            raise NameTaken(
                f"{body['kind']} {namespace}/{name} exists and is not this backend's: rename "
                "or remove it (it is never adopted)"
            )
        # A JSON merge patch replaces lists whole, so env entries or rules the spec no longer
        # has are removed (a strategic merge would keep them).
        patch(name, namespace, body, _content_type="application/merge-patch+json")

    async def apply(self, body: dict[str, Any]) -> None:
        await asyncio.to_thread(self._apply, body)

    def _ready_replicas(self, namespace: str, name: str) -> int | None:
        try:
            deployment = self.apps.read_namespaced_deployment(name, namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return (deployment.status.ready_replicas or 0) if deployment.status else 0

    async def ready_replicas(self, namespace: str, name: str) -> int | None:
        """Ready replicas of a Deployment; None when it does not exist."""
        return await asyncio.to_thread(self._ready_replicas, namespace, name)

    def _secret_value(self, namespace: str, name: str, key: str) -> str:
        try:
            secret = self.core.read_namespaced_secret(name, namespace)
        except ApiException as error:
            if error.status == 404:
                raise SecretMissing(f"Secret {namespace}/{name} not found") from None
            if error.status == 403:
                raise SecretMissing(
                    f"the operator may not read Secret {namespace}/{name}: Secrets are readable "
                    "only in the namespaces it watches, or (cluster-wide) in the chart's "
                    "rbac.secretNamespaces",
                    reason="SecretForbidden",
                ) from None
            raise
        data = secret.data or {}
        if key not in data:
            raise SecretMissing(f"Secret {namespace}/{name} has no key {key!r}")
        return base64.b64decode(data[key]).decode()

    async def secret_value(self, namespace: str, name: str, key: str) -> str:
        return await asyncio.to_thread(self._secret_value, namespace, name, key)

    async def patch_own_status(
        self, plural: str, namespace: str, name: str, status: dict[str, Any]
    ) -> None:
        """Merge-patch the status of one of our objects now, not when the handler returns."""
        await asyncio.to_thread(
            self.custom.patch_namespaced_custom_object_status,
            GROUP,
            VERSION,
            namespace,
            plural,
            name,
            {"status": status},
        )
