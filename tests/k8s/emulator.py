"""An in-memory Kubernetes API server for the end-to-end tests, built on kmock's emulator.

Why: there is no cluster and no Docker on the test machines. kmock's `KubernetesEmulator`
serves discovery, list, watch, create, patch and delete over real HTTP, but it treats objects
as plain JSON: no generation, resourceVersion or uid, no status subresource, no `kind` in
lists, no PUT. The operator's promises (observedGeneration, no drift loops, finalizers that
hold deletion, owner references) cannot be tested without those, so `LumeKubernetesEmulator`
re-implements every write on top of kmock's object store and keeps kmock's reads, watch
streams, request recording and fault-injection DSL (``emulator['patch', ...] << 500``).

Requests are authenticated and authorized as a cluster would (`tests/k8s/rbac.py`):
`ADMIN_TOKEN` (kubectl and the fixtures) is cluster-admin; a token from `issue_token()` is a
ServiceAccount held to the Roles and bindings stored here (403 otherwise); any other token is
refused (401). Without a token: cluster-admin on the plain HTTP port (as the API server's old
insecure port was; kubectl sends no token over plain HTTP), `system:anonymous` over HTTPS.

`EmulatorServer` runs it over HTTP on 127.0.0.1 in a background thread with its own event
loop, so blocking callers (``subprocess.run([kubectl, ...])``, a kopf operator in another
thread) can use it from synchronous tests; with ``tls=True`` also over HTTPS, for pods that
reach it with an in-cluster config (`write_service_account()`).

What it does not model is listed in `NOT_MODELLED`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import copy
import datetime
import functools
import json
import re
import secrets
import shutil
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import aiohttp.test_utils
import attrs
import jsonpatch
import kmock
import yaml
from kmock._internal import apps, enums, parsing, rendering
from typing_extensions import override

from tests.k8s import rbac
from tests.k8s.tls import make_server_certificate

T = TypeVar("T")

ALL_VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]

NOT_MODELLED = """\
- No admission: CRD OpenAPI schemas, CEL rules and defaulting are not enforced (use
  `kubectl apply --validate=false`; check schemas offline instead). RBAC is enforced (see
  tests/k8s/rbac.py) but for aggregated ClusterRoles, impersonation, access reviews
  (`kubectl auth can-i`) and other authorizers; authentication is bearer tokens only (no client
  certificates, no TokenReview, tokens never expire but die with their ServiceAccount).
- No controllers: Deployments never get Pods or readyReplicas, Jobs never run, nothing
  schedules; tests set such status themselves (`EmulatorServer.patch_status`).
- Garbage collection is immediate and synchronous (background propagation only; foreground
  and blockOwnerDeletion are not modelled). Namespace deletion deletes its objects at once.
- Strategic merge patch is approximated: maps merge, lists of dicts merge by `name`, other
  lists are replaced; `$patch`/`$retainKeys` and other directives are mostly dropped.
- Server-side apply is approximated as a merge patch (no managedFields, no conflicts).
- Watches replay the current objects as ADDED and ignore the requested resourceVersion;
  there is no watch cache, compaction or 410 Gone. Field selectors: metadata.name and
  metadata.namespace only. No pagination (`limit`/`continue` ignored). No Table output.
- No aggregated discovery and no OpenAPI documents (`/openapi/v2`, `/openapi/v3` are 404).
- JSON and YAML bodies only: protobuf is refused (415), so kubectl's imperative generators for
  built-in kinds (`kubectl create secret|namespace|configmap ...`) fail; use `kubectl apply -f`.
"""


def _resource_info(
    kind: str,
    singular: str,
    *,
    namespaced: bool = True,
    shortnames: Iterable[str] = (),
    categories: Iterable[str] = (),
    subresources: Iterable[str] = (),
    verbs: Iterable[str] = ALL_VERBS,
) -> dict[str, Any]:
    return {
        "kind": kind,
        "singular": singular,
        "namespaced": namespaced,
        "verbs": list(verbs),
        "shortnames": list(shortnames),
        "categories": list(categories),
        "subresources": list(subresources),
    }


# What the operator, kubectl and kopf touch. Tests may add more via `emulator.resources[...]`
# (or by creating a CustomResourceDefinition, which registers its resources).
DEFAULT_RESOURCES: dict[str, dict[str, Any]] = {
    "lume.dev/v1alpha1/schedulingbackends": _resource_info(
        "SchedulingBackend", "schedulingbackend", shortnames=["sb"], categories=["lume"],
        subresources=["status"],
    ),
    "lume.dev/v1alpha1/lumeflows": _resource_info(
        "LumeFlow", "lumeflow", shortnames=["lf"], categories=["lume"], subresources=["status"]
    ),
    "lume.dev/v1alpha1/flowofflows": _resource_info(
        "FlowOfFlows", "flowofflows", shortnames=["fof"], categories=["lume"],
        subresources=["status"],
    ),
    "v1/namespaces": _resource_info(
        "Namespace", "namespace", namespaced=False, shortnames=["ns"], subresources=["status"]
    ),
    "v1/secrets": _resource_info("Secret", "secret"),
    "v1/configmaps": _resource_info("ConfigMap", "configmap", shortnames=["cm"]),
    "v1/serviceaccounts": _resource_info("ServiceAccount", "serviceaccount", shortnames=["sa"]),
    "v1/events": _resource_info("Event", "event", shortnames=["ev"]),
    "v1/pods": _resource_info(
        "Pod", "pod", shortnames=["po"], subresources=["status", "log"]
    ),
    "v1/persistentvolumeclaims": _resource_info(
        "PersistentVolumeClaim", "persistentvolumeclaim", shortnames=["pvc"],
        subresources=["status"],
    ),
    "apps/v1/deployments": _resource_info(
        "Deployment", "deployment", shortnames=["deploy"], subresources=["status"]
    ),
    "batch/v1/jobs": _resource_info("Job", "job", subresources=["status"]),
    "rbac.authorization.k8s.io/v1/roles": _resource_info("Role", "role"),
    "rbac.authorization.k8s.io/v1/rolebindings": _resource_info("RoleBinding", "rolebinding"),
    "rbac.authorization.k8s.io/v1/clusterroles": _resource_info(
        "ClusterRole", "clusterrole", namespaced=False
    ),
    "rbac.authorization.k8s.io/v1/clusterrolebindings": _resource_info(
        "ClusterRoleBinding", "clusterrolebinding", namespaced=False
    ),
    "coordination.k8s.io/v1/leases": _resource_info("Lease", "lease"),
    # Stored, not enforced: the node runs every pod on the host network (tests/k8s/node.py).
    "networking.k8s.io/v1/networkpolicies": _resource_info(
        "NetworkPolicy", "networkpolicy", shortnames=["netpol"]
    ),
    "apiextensions.k8s.io/v1/customresourcedefinitions": _resource_info(
        "CustomResourceDefinition", "customresourcedefinition", namespaced=False,
        shortnames=["crd", "crds"], subresources=["status"],
    ),
    "kopf.dev/v1/clusterkopfpeerings": _resource_info(
        "ClusterKopfPeering", "clusterkopfpeering", namespaced=False
    ),
    "kopf.dev/v1/kopfpeerings": _resource_info("KopfPeering", "kopfpeering"),
}  # fmt: skip

DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public")

# The token of the tests' own clients (kubectl, fixtures): cluster-admin, as no token is.
ADMIN_TOKEN = "emulator-token"
SERVICE_ACCOUNTS = kmock.resource("v1/serviceaccounts")
RBAC_RESOURCES = {
    kmock.resource(f"{rbac.RBAC_GROUP}/v1/{plural}")
    for plural in ("roles", "clusterroles", "rolebindings", "clusterrolebindings")
}
# Who makes the request being served, for the escalation check deep in a write.
_REQUESTER: contextvars.ContextVar[rbac.UserInfo | None] = contextvars.ContextVar(
    "requester", default=None
)

# The API server's generated names: the prefix cut to 58 characters, then 5 of these.
GENERATED_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
GENERATED_PREFIX_MAX = 58
GENERATED_TRIES = 8  # a taken one is generated again, 7 times (RetryGenerateName, Kubernetes 1.31+)
HISTORY_LIMIT = 100_000  # watch events kept for resuming; older resourceVersions get 410 Gone

_SMP_DIRECTIVE = re.compile(r"^\$(setElementOrder|deleteFromPrimitiveList|retainKeys)(/.*)?$")


@dataclass(frozen=True)
class LoggedRequest:
    """One API call, as recorded for assertions (`emulator.log`)."""

    method: str
    path: str
    query: Mapping[str, str]
    action: str | None  # kmock's guess: list, watch, fetch, create, update, delete
    subresource: str | None
    user: str | None = None  # who it authenticated as; None when it did not
    refused: int | None = None  # 401 (unknown token) or 403 (RBAC) when it was refused
    refusal: str | None = None  # the message the refusal carried


class ApiError(kmock.KubernetesError):
    """A Kubernetes `Status` failure with the reason codes client-go and kubectl understand."""


def _error(status: int, reason: str, message: str, **details: Any) -> ApiError:
    return ApiError(
        status=status, reason=reason, message=message, details=details or {"causes": []}
    )


_PODS = kmock.resource("v1/pods")
_END: dict[str, Any] = {}  # the end-of-stream marker in a watch queue


def _gone(rv: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Status",
        "status": "Failure",
        "code": 410,
        "reason": "Expired",
        "message": f"too old resource version: {rv}",
    }


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: maps merge, `null` deletes, everything else replaces."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """An approximation of strategic merge patch (see NOT_MODELLED), enough for kubectl apply."""
    if isinstance(patch, list) and isinstance(target, list):
        named = all(isinstance(x, Mapping) and "name" in x for x in [*target, *patch])
        if not named:
            return copy.deepcopy(patch)
        merged = {x["name"]: x for x in target}
        order = [x["name"] for x in target]
        for item in patch:
            if item.get("$patch") == "delete":
                merged.pop(item["name"], None)
                continue
            if item["name"] not in merged:
                order.append(item["name"])
            merged[item["name"]] = strategic_merge_patch(merged.get(item["name"]), item)
        return [merged[n] for n in order if n in merged]
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "delete":
        return None
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if key == "$patch" or _SMP_DIRECTIVE.match(key):
            continue
        if value is None:
            result.pop(key, None)
        else:
            merged = strategic_merge_patch(result.get(key), value)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
    return result


_NAMESPACE_PATH = re.compile(r"^/api/v1/namespaces(?:/([^/]+)(?:/(status|finalize))?)?/?$")
_kmock_parse_path = parsing.parse_path


def _parse_path(path: str) -> parsing.ParsedPath:
    """kmock 0.8 reads `/api/v1/namespaces/x` as "namespace x" and fails on `/api/v1/namespaces`.

    The namespace objects themselves live there, so parse those paths as the resource.
    Installed into kmock's parser module once, on import (idempotent; only these paths change).
    """
    match = _NAMESPACE_PATH.match(path)
    if match is None:
        return _kmock_parse_path(path)
    name, sub = match.groups()
    return parsing.ParsedPath("", "v1", "namespaces", None, name, sub)


parsing.parse_path = _parse_path


def _labels_match(labels: Mapping[str, str], selector: str) -> bool:
    """Equality- and set-less label selectors: `a=b`, `a==b`, `a!=b`, `a`, `!a`."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _fields_match(obj: Mapping[str, Any], selector: str) -> bool:
    meta = obj.get("metadata", {})
    for term in filter(None, (t.strip() for t in selector.split(","))):
        negate = "!=" in term
        key, value = re.split(r"!=|==|=", term, maxsplit=1)
        actual = {"metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace")}
        if key not in actual:
            raise _error(400, "BadRequest", f'field label not supported: "{key}"')
        if (actual[key] == value) == negate:
            return False
    return True


@attrs.define(kw_only=True)
class LumeKubernetesEmulator(kmock.KubernetesEmulator):
    """kmock's emulator with the API-server semantics that operators rely on.

    Writes (POST, PUT, PATCH, DELETE) are applied here, under kmock's lock, before kmock
    looks for reactions; reads use the stored objects. Every stored object carries `kind`,
    `apiVersion`, `metadata.uid`, `resourceVersion` (one global counter), `generation` and
    `creationTimestamp`.
    """

    _rv: int = attrs.field(default=0, init=False)
    _outcomes: dict[int, tuple[int, dict[str, Any]]] = attrs.field(factory=dict, init=False)
    # Every watch event ever emitted, to resume watches from a resourceVersion, and the live
    # watches; both only touched under the lock, so no event falls between replay and live.
    _history: list[tuple[int, kmock.resource, dict[str, Any]]] = attrs.field(
        factory=list, init=False
    )
    _watchers: list[tuple[rendering.Request, asyncio.Queue[dict[str, Any]]]] = attrs.field(
        factory=list, init=False
    )
    # Admission: each is called with (resource, namespace, object) before a create is stored and
    # raises an `ApiError` to refuse it (the node's Pod Security and ServiceAccount checks).
    admission: list[Callable[[kmock.resource, str | None, dict[str, Any]], None]] = attrs.field(
        factory=list, init=False
    )
    # Where `pods/log` reads come from: (namespace, pod, container or None) -> the log so far and
    # whether it can still grow; the node that runs the pods sets it.
    pod_log: Callable[[str, str, str | None], tuple[str, bool]] | None = attrs.field(
        default=None, init=False
    )
    # token -> (namespace, service account, its uid): a token dies with its ServiceAccount.
    _tokens: dict[str, tuple[str, str, str]] = attrs.field(factory=dict, init=False)
    # id(request) -> (user name, refusal code, refusal message), for `log`.
    _access: dict[int, tuple[str | None, int | None, str | None]] = attrs.field(
        factory=dict, init=False
    )
    # The stored RBAC objects as a Policy, built on first use after each RBAC write.
    _policy_cache: rbac.Policy | None = attrs.field(default=None, init=False)
    # The 5 characters after a generateName prefix (a test may make them collide).
    name_suffix: Callable[[], str] = attrs.field(
        default=lambda: "".join(secrets.choice(GENERATED_ALPHABET) for _ in range(5)), init=False
    )

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.fallback[enums.method.PUT] << self._serve_outcome
        self.fallback["get /version/"] << self._serve_server_version  # the Python client's
        for key, info in DEFAULT_RESOURCES.items():
            self.resources[key] = copy.deepcopy(info)  # type: ignore[assignment]
        for name in DEFAULT_NAMESPACES:
            self.put_object("v1/namespaces", None, {"metadata": {"name": name}})
            self.put_object("v1/serviceaccounts", name, {"metadata": {"name": "default"}})
        for role in rbac.BOOTSTRAP_CLUSTER_ROLES:
            self.put_object(f"{rbac.RBAC_GROUP}/v1/clusterroles", None, role)
        for binding in rbac.BOOTSTRAP_CLUSTER_ROLE_BINDINGS:
            self.put_object(f"{rbac.RBAC_GROUP}/v1/clusterrolebindings", None, binding)

    # ---- identities ----------------------------------------------------------------------------

    def issue_token(self, namespace: str, service_account: str = "default") -> str:
        """A bearer token for `system:serviceaccount:<namespace>:<service_account>`, as the
        kubelet mounts one into each pod of that account. The ServiceAccount must exist (the
        API server refuses a pod whose account does not); the token stops authenticating
        (401) once the account is deleted, or `revoke_token()` (the pod deleted)."""
        account = self._stored(SERVICE_ACCOUNTS, namespace, service_account)
        if account is None:
            raise ValueError(
                f"ServiceAccount {namespace}/{service_account} does not exist: create it "
                "before issuing its token"
            )
        token = f"sa.{secrets.token_urlsafe(32)}"
        self._tokens[token] = (namespace, service_account, account["metadata"]["uid"])
        return token

    def revoke_token(self, token: str) -> None:
        """Stop a token authenticating, as deleting the pod it was bound to does."""
        self._tokens.pop(token, None)

    def refusals(self, user: str | None = None) -> list[LoggedRequest]:
        """The requests refused (401 or 403), optionally only those of one user."""
        return [e for e in self.log if e.refused is not None and (user is None or e.user == user)]

    def _authenticate(self, request: rendering.Request) -> rbac.UserInfo:
        header = next((v for k, v in request.headers.items() if k.lower() == "authorization"), None)
        if header is None:
            # The plain HTTP port is like the API server's old insecure port: what comes
            # without credentials is cluster-admin (kubectl sends no token over plain HTTP).
            return rbac.ANONYMOUS if request.url.scheme == "https" else rbac.ADMIN
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token == ADMIN_TOKEN:
            return rbac.ADMIN
        entry = self._tokens.get(token) if scheme.lower() == "bearer" else None
        if entry is not None:
            namespace, name, uid = entry
            account = self._stored(SERVICE_ACCOUNTS, namespace, name)
            if account is not None and account["metadata"]["uid"] == uid:
                return rbac.UserInfo.service_account(namespace, name)
        raise _error(401, "Unauthorized", "Unauthorized")

    def _attributes(self, request: rendering.Request) -> rbac.Attributes:
        """The request in the authorizer's terms; discovery paths are non-resource requests."""
        method = request.method.value.upper()
        res = request.resource
        if res is None or res.plural is None:
            return rbac.Attributes(
                verb=method.lower(), resource_request=False, path=request.url.path
            )
        verb = rbac.resource_verb(method, request.name, request.params)
        namespace = request.namespace or ""
        if res == kmock.resource("v1/namespaces") and request.name:
            namespace = request.name  # a namespace is in itself, as the API server sees it
        return rbac.Attributes(
            verb=verb,
            namespace=namespace,
            api_group=res.group or "",
            resource=res.plural,
            subresource=request.subresource or "",
            name=rbac.name_of(verb, request.name, request.params),
        )

    def _policy(self) -> rbac.Policy:
        if self._policy_cache is None:
            self._policy_cache = rbac.Policy.of(
                obj.raw
                for (res, _, _), obj in list(self._objects.items())
                if res in RBAC_RESOURCES and not obj.deleted
            )
        return self._policy_cache

    def _admit(self, request: rendering.Request) -> rbac.UserInfo:
        """Authenticate and authorize one request, recording who made it and any refusal."""
        try:
            user = self._authenticate(request)
        except ApiError as e:
            self._access[id(request)] = (None, e.status, e.message)
            raise
        if rbac.MASTERS not in user.groups:
            attrs = self._attributes(request)
            if not self._policy().allows(user, attrs):
                message = rbac.forbidden_message(user, attrs)
                self._access[id(request)] = (user.name, 403, message)
                details = {"group": attrs.api_group, "kind": attrs.resource}
                if attrs.name:
                    details["name"] = attrs.name
                raise _error(403, "Forbidden", message, **details)
        self._access[id(request)] = (user.name, None, None)
        return user

    def _confirm_no_escalation(
        self, res: kmock.resource, ns: str | None, obj: Mapping[str, Any], url_name: str
    ) -> None:
        """Writing a Role takes holding what it grants (or `escalate`); binding a role takes
        holding what it grants (or `bind` on it), in the namespace it is written to."""
        user = _REQUESTER.get()
        if res not in RBAC_RESOURCES or user is None or rbac.MASTERS in user.groups:
            return
        policy, namespace = self._policy(), ns or ""
        if res.plural in ("roles", "clusterroles"):
            asked = rbac.Attributes("escalate", True, namespace, rbac.RBAC_GROUP, res.plural)
            if policy.allows(user, replace(asked, name=url_name)):
                return
            wanted = list(obj.get("rules") or [])
        else:
            ref = obj.get("roleRef") or {}
            role = "clusterroles" if ref.get("kind") == "ClusterRole" else "roles"
            asked = rbac.Attributes("bind", True, namespace, rbac.RBAC_GROUP, role)
            if policy.allows(user, replace(asked, name=ref.get("name", ""))):
                return
            found = policy.role_rules(ref, namespace)
            if found is None:
                raise _error(
                    404,
                    "NotFound",
                    f'{role}.{rbac.RBAC_GROUP} "{ref.get("name")}" not found',
                    name=ref.get("name"),
                    group=rbac.RBAC_GROUP,
                    kind=role,
                )
            wanted = found
        missing = rbac.not_held(policy.rules_for(user, namespace), wanted)
        if missing:
            name = (obj.get("metadata") or {}).get("name", "")
            raise _error(
                403,
                "Forbidden",
                f'{res.plural}.{rbac.RBAC_GROUP} "{name}" is forbidden: '
                + rbac.escalation_message(user, missing),
                name=name,
                group=rbac.RBAC_GROUP,
                kind=res.plural,
            )

    # ---- introspection for tests -------------------------------------------------------------

    @property
    def log(self) -> list[LoggedRequest]:
        """Every request served so far, in order."""
        return [
            LoggedRequest(
                method=r.method.value.upper(),
                path=r.url.path,
                query=dict(r.params),
                action=r.action.value.lower() if r.action is not None else None,
                subresource=r.subresource,
                user=access[0],
                refused=access[1],
                refusal=access[2],
            )
            for r in list(self._requests)
            for access in [self._access.get(id(r), (None, None, None))]
        ]

    def count(self, method: str | None = None, path: str | re.Pattern[str] | None = None) -> int:
        """How many requests match a method (any case) and a path (exact or a full regex)."""
        n = 0
        for entry in self.log:
            if method is not None and entry.method != method.upper():
                continue
            if isinstance(path, str) and entry.path != path:
                continue
            if isinstance(path, re.Pattern) and not path.fullmatch(entry.path):
                continue
            n += 1
        return n

    def counts(self) -> collections.Counter[tuple[str, str]]:
        """(method, path) -> number of calls, e.g. to assert that a resync wrote nothing."""
        return collections.Counter((entry.method, entry.path) for entry in self.log)

    def get_object(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The current state of an object (a deep copy), or None if absent or deleted."""
        obj = self._stored(kmock.resource(resource), namespace, name)
        return copy.deepcopy(obj) if obj is not None else None

    def put_object(self, resource: str, namespace: str | None, body: Mapping[str, Any]) -> None:
        """Seed an object before the server runs (no watch event is emitted)."""
        res = kmock.resource(resource)
        obj = self._new_object(res, namespace, dict(body))
        self._objects[res, namespace, obj["metadata"]["name"]] = obj
        if res in RBAC_RESOURCES:
            self._policy_cache = None

    # ---- writes --------------------------------------------------------------------------------

    @override
    async def _handle(self, request: rendering.Request) -> Any:
        requester = _REQUESTER.set(self._admit(request))
        try:
            return await self._handle_admitted(request)
        finally:
            _REQUESTER.reset(requester)

    async def _handle_admitted(self, request: rendering.Request) -> Any:
        is_write = request.method in {
            enums.method.POST,
            enums.method.PUT,
            enums.method.PATCH,
            enums.method.DELETE,
        }
        if request.resource is None or not is_write:
            return await apps.RawHandler._handle(self, request)
        async with self._lock:
            events: list[tuple[kmock.resource, dict[str, Any]]] = []
            self._outcomes[id(request)] = self._write(request, events)
            self._publish(events)
        try:
            return await apps.RawHandler._handle(self, request)
        finally:
            self._outcomes.pop(id(request), None)

    async def _serve_outcome(self, request: rendering.Request) -> rendering.Response:
        status, body = self._outcomes[id(request)]
        return rendering.Response(status=status, payload=body)

    _serve_create = _serve_update = _serve_delete = _serve_outcome  # type: ignore[assignment]

    def _write(
        self, request: rendering.Request, events: list[tuple[kmock.resource, dict[str, Any]]]
    ) -> tuple[int, dict[str, Any]]:
        res = request.resource
        assert res is not None
        info = self._info(res)
        sub = request.subresource
        if sub is not None and sub not in info.subresources:
            raise _error(
                404, "NotFound", f"the server could not find the requested resource ({sub})"
            )
        ns = request.namespace if info.namespaced else None
        if info.namespaced and ns is None and request.method != enums.method.DELETE:
            raise _error(404, "NotFound", f"{res.plural} must be created in a namespace")
        dry_run = bool(request.params.get("dryRun"))
        method = request.method

        if method == enums.method.POST and request.name is None:
            body = self._body(request)
            return 201, self._create(res, ns, body, events, dry_run=dry_run)
        if request.name is None or method == enums.method.POST:
            raise _error(405, "MethodNotAllowed", f"{method.value} is not supported here")
        if method == enums.method.DELETE:
            body = self._body(request, required=False) or {}
            return 200, self._delete(res, ns, request.name, body, events, dry_run=dry_run)

        current = self._stored(res, ns, request.name)
        body = self._body(request)
        ctype = request.headers.get("Content-Type", "").split(";")[0].strip()
        if current is None:
            if method == enums.method.PATCH and ctype == "application/apply-patch+yaml":
                # Creating by apply needs `create` as well as `patch`, as in the API server.
                user = _REQUESTER.get()
                if user is not None and rbac.MASTERS not in user.groups:
                    asked = replace(self._attributes(request), verb="create", name="")
                    if not self._policy().allows(user, asked):
                        message = rbac.forbidden_message(user, asked)
                        self._access[id(request)] = (user.name, 403, message)
                        raise _error(403, "Forbidden", message, group=res.group, kind=res.plural)
                body.setdefault("metadata", {})["name"] = request.name
                return 201, self._create(res, ns, body, events, dry_run=dry_run)
            raise self._not_found(res, request.name)
        if method == enums.method.PUT:
            self._check_rv(res, request.name, current, body)
            desired = body
        else:
            desired = self._apply_patch(current, body, ctype)
            if isinstance(body, Mapping):
                self._check_rv(res, request.name, current, body)
        return 200, self._update(res, ns, current, desired, sub, events, dry_run=dry_run)

    def _create(
        self,
        res: kmock.resource,
        ns: str | None,
        body: dict[str, Any],
        events: list[tuple[kmock.resource, dict[str, Any]]],
        *,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        meta = body.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            prefix = meta["generateName"][:GENERATED_PREFIX_MAX]
            for _ in range(GENERATED_TRIES):
                meta["name"] = prefix + self.name_suffix()
                if self._stored(res, ns, meta["name"]) is None:
                    break
        if not meta.get("name"):
            raise _error(422, "Invalid", "metadata.name: Required value")
        if ns is not None and meta.get("namespace", ns) != ns:
            raise _error(400, "BadRequest", "the namespace of the object does not match the URL")
        if ns is not None and self._stored(kmock.resource("v1/namespaces"), None, ns) is None:
            raise _error(
                404, "NotFound", f'namespaces "{ns}" not found', name=ns, kind="namespaces"
            )
        existing = self._stored(res, ns, meta["name"])
        if existing is None and not dry_run:
            for admit in self.admission:
                admit(res, ns, body)
        if existing is not None:
            raise _error(
                409,
                "AlreadyExists",
                f'{self._qualified(res)} "{meta["name"]}" already exists',
                name=meta["name"],
                kind=res.plural,
            )
        self._confirm_no_escalation(res, ns, body, url_name="")
        obj = self._new_object(res, ns, body)
        if dry_run:
            return obj
        key = (res, ns, obj["metadata"]["name"])
        if key in self._objects:
            self._objects[key].create(obj)
        else:
            self._objects[key] = obj
        events.append((res, {"type": "ADDED", "object": copy.deepcopy(obj)}))
        if res == kmock.resource("apiextensions.k8s.io/v1/customresourcedefinitions"):
            self._register_crd(obj)
        if res == kmock.resource("v1/namespaces"):
            # The serviceaccount controller: every namespace has a `default` account.
            self._create(SERVICE_ACCOUNTS, meta["name"], {"metadata": {"name": "default"}}, events)
        return obj

    def _new_object(
        self, res: kmock.resource, ns: str | None, body: dict[str, Any]
    ) -> dict[str, Any]:
        info = self._info(res)
        obj = copy.deepcopy(body)
        obj["apiVersion"] = f"{res.group}/{res.version}" if res.group else res.version
        obj["kind"] = info.kind
        if "status" in info.subresources:
            obj.pop("status", None)
        if res == kmock.resource("v1/namespaces"):
            obj["status"] = {"phase": "Active"}
        meta = obj.setdefault("metadata", {})
        for field in ("deletionTimestamp", "deletionGracePeriodSeconds", "managedFields"):
            meta.pop(field, None)
        if ns is not None:
            meta["namespace"] = ns
        meta["uid"] = str(uuid.uuid4())
        meta["generation"] = 1
        meta["creationTimestamp"] = _now()
        meta["resourceVersion"] = self._next_rv()
        return obj

    def _update(
        self,
        res: kmock.resource,
        ns: str | None,
        current: dict[str, Any],
        desired: Any,
        sub: str | None,
        events: list[tuple[kmock.resource, dict[str, Any]]],
        *,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        if not isinstance(desired, Mapping):
            raise _error(400, "BadRequest", "the body must be a JSON object")
        info = self._info(res)
        if sub == "status":  # only status changes; everything else stays as it is
            new = copy.deepcopy(current)
            new.pop("status", None)
            if desired.get("status") is not None:
                new["status"] = copy.deepcopy(desired["status"])
        else:
            new = copy.deepcopy(dict(desired))
            new.pop("status", None)
            if "status" not in info.subresources and desired.get("status") is not None:
                new["status"] = copy.deepcopy(desired["status"])
            elif current.get("status") is not None:
                new["status"] = copy.deepcopy(current["status"])
            new["apiVersion"], new["kind"] = current["apiVersion"], current["kind"]
            meta = new.setdefault("metadata", {})
            cur_meta = current["metadata"]
            for field in ("name", "namespace", "uid", "creationTimestamp", "generation"):
                if field in cur_meta:
                    meta[field] = cur_meta[field]
                else:
                    meta.pop(field, None)
            for field in ("deletionTimestamp", "deletionGracePeriodSeconds"):
                if field in cur_meta:
                    meta[field] = cur_meta[field]
                else:
                    meta.pop(field, None)
            meta.pop("managedFields", None)
            if cur_meta.get("deletionTimestamp"):
                added = set(meta.get("finalizers") or []) - set(cur_meta.get("finalizers") or [])
                if added:
                    raise _error(
                        422,
                        "Invalid",
                        f"metadata.finalizers: Forbidden: no new finalizers can be added if the "
                        f"object is being deleted, found new finalizers {sorted(added)}",
                    )
            if not meta.get("finalizers"):
                meta.pop("finalizers", None)

            def body_of(o: Mapping[str, Any]) -> dict[str, Any]:
                return {k: v for k, v in o.items() if k not in ("metadata", "status")}

            if body_of(new) != body_of(current):
                meta["generation"] = int(cur_meta.get("generation", 1)) + 1
        new["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        if new == current:  # a no-op write changes nothing, not even the resourceVersion
            return current
        if res in RBAC_RESOURCES and sub is None:
            name = new["metadata"]["name"]
            if "roleRef" in current and new.get("roleRef") != current["roleRef"]:
                raise _error(
                    422,
                    "Invalid",
                    f'{info.kind}.{rbac.RBAC_GROUP} "{name}" is invalid: roleRef: Invalid value: '
                    "cannot change roleRef",
                )
            self._confirm_no_escalation(res, ns, new, url_name=name)
        new["metadata"]["resourceVersion"] = self._next_rv()
        if dry_run:
            return new
        self._objects[res, ns, new["metadata"]["name"]].history.append(new)
        events.append((res, {"type": "MODIFIED", "object": copy.deepcopy(new)}))
        meta = new["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return self._finalize(res, ns, new, events, orphan=False)
        return new

    def _delete(
        self,
        res: kmock.resource,
        ns: str | None,
        name: str,
        options: Mapping[str, Any],
        events: list[tuple[kmock.resource, dict[str, Any]]],
        *,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        current = self._stored(res, ns, name)
        if current is None:
            raise self._not_found(res, name)
        pre = options.get("preconditions") or {}
        if pre.get("uid") and pre["uid"] != current["metadata"]["uid"]:
            raise _error(409, "Conflict", f"precondition failed: uid {pre['uid']}")
        rv = pre.get("resourceVersion")
        if rv and rv != current["metadata"]["resourceVersion"]:
            raise _error(409, "Conflict", f"precondition failed: resourceVersion {rv}")
        if dry_run:
            return current
        orphan = options.get("propagationPolicy") == "Orphan" or options.get("orphanDependents")
        if current["metadata"].get("finalizers"):
            if current["metadata"].get("deletionTimestamp"):
                return current  # already being deleted; wait for the finalizers
            new = copy.deepcopy(current)
            new["metadata"]["deletionTimestamp"] = _now()
            new["metadata"]["deletionGracePeriodSeconds"] = 0
            new["metadata"]["resourceVersion"] = self._next_rv()
            self._objects[res, ns, name].history.append(new)
            events.append((res, {"type": "MODIFIED", "object": copy.deepcopy(new)}))
            return new
        return self._finalize(res, ns, current, events, orphan=bool(orphan))

    def _finalize(
        self,
        res: kmock.resource,
        ns: str | None,
        obj: dict[str, Any],
        events: list[tuple[kmock.resource, dict[str, Any]]],
        *,
        orphan: bool,
    ) -> dict[str, Any]:
        """Remove an object for good, then collect what it owned (or what lived in it)."""
        final = copy.deepcopy(obj)
        final["metadata"]["resourceVersion"] = self._next_rv()
        self._objects[res, ns, final["metadata"]["name"]].delete()
        events.append((res, {"type": "DELETED", "object": copy.deepcopy(final)}))
        if orphan:
            return final
        uid = final["metadata"]["uid"]
        is_namespace = res == kmock.resource("v1/namespaces")
        for (dres, dns, dname), dobj in list(self._objects.items()):
            if dobj.deleted:
                continue
            meta = dobj.raw.get("metadata", {})
            owners = [o.get("uid") for o in meta.get("ownerReferences") or []]
            in_namespace = is_namespace and dns == final["metadata"]["name"]
            if in_namespace or uid in owners:
                alive = [u for u in owners if u != uid and self._uid_alive(u)]
                if in_namespace or not alive:
                    self._delete(dres, dns, dname, {}, events)
        return final

    def _uid_alive(self, uid: str) -> bool:
        return any(
            not o.deleted and o.raw.get("metadata", {}).get("uid") == uid
            for o in self._objects.values()
        )

    def _register_crd(self, crd: Mapping[str, Any]) -> None:
        """Serve a newly created CRD's resources, as the real apiextensions server does."""
        spec = crd.get("spec", {})
        names = spec.get("names", {})
        for version in spec.get("versions", []):
            if not version.get("served", True):
                continue
            key = f"{spec.get('group')}/{version['name']}/{names.get('plural')}"
            self.resources[key] = _resource_info(  # type: ignore[assignment]
                names.get("kind"),
                names.get("singular") or names.get("kind", "").lower(),
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                shortnames=names.get("shortNames", []),
                categories=names.get("categories", []),
                subresources=(version.get("subresources") or {}).keys(),
            )

    # ---- reads ---------------------------------------------------------------------------------

    @override
    async def _serve_version(self, request: rendering.Request) -> rendering.Payload:
        """Discovery as the real server sends it: core is `v1`; subresources have no short names.

        kmock says `/v1` for the core group (kubectl then knows no Secret), and copies short
        names onto `lumeflows/status`, which makes kubectl warn that `lf` is ambiguous.
        """
        reply: Any = await super()._serve_version(request)
        reply["groupVersion"] = reply["groupVersion"].lstrip("/")  # core is "v1", not "/v1"
        for entry in reply["resources"]:
            if "/" in entry["name"]:
                entry.update(shortNames=[], categories=[], verbs=["get", "patch", "update"])
                entry.pop("singularName", None)
        reply["resources"].sort(key=lambda entry: entry["name"])
        return reply

    @override
    async def _serve_fetch(self, request: rendering.Request) -> rendering.Payload:
        assert request.resource is not None and request.name is not None
        info = self._info(request.resource)
        async with self._lock:
            ns = request.namespace if info.namespaced else None
            obj = self._stored(request.resource, ns, request.name)
        if obj is None:
            raise self._not_found(request.resource, request.name)
        if request.subresource == "log" and request.resource == _PODS:
            return self._serve_pod_log(request)
        return obj

    def _serve_pod_log(self, request: rendering.Request) -> rendering.Response:
        """A container's output as the kubelet keeps it: text, whole or followed (`follow`)."""
        assert request.namespace is not None and request.name is not None
        ns, name = request.namespace, request.name
        container = request.params.get("container")
        if self.pod_log is None:
            raise _error(400, "BadRequest", f'container of pod "{name}" is not running')
        text, growing = self.pod_log(ns, name, container)
        headers = {"Content-Type": "text/plain"}
        tail = request.params.get("tailLines")
        if tail:
            text = "".join(text.splitlines(keepends=True)[-int(tail) :])
        if request.params.get("follow") != "true" or not growing:
            return rendering.Response(headers=headers, payload=text.encode())
        source = self.pod_log

        async def follow() -> AsyncIterator[bytes]:
            sent = text
            yield sent.encode()
            while True:
                await asyncio.sleep(0.2)
                now, still = source(ns, name, container)
                if len(now) > len(sent):
                    yield now[len(sent) :].encode()
                    sent = now
                if not still:
                    return

        return rendering.Response(headers=headers, payload=follow())

    @override
    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        assert request.resource is not None
        info = self._info(request.resource)
        async with self._lock:
            items = self._select(request)
            rv = str(self._rv)
        res = request.resource
        return {
            "apiVersion": f"{res.group}/{res.version}" if res.group else res.version,
            "kind": f"{info.kind}List",
            "metadata": {"resourceVersion": rv},
            "items": items,
        }

    @override
    def _serve_watch(self, request: rendering.Request) -> rendering.Response:  # type: ignore[override]
        """A JSON stream: client-go refuses kmock's default application/octet-stream."""
        assert request.resource is not None
        self._info(request.resource)
        headers = {"Content-Type": "application/json"}
        return rendering.Response(headers=headers, payload=self._watch_events(request))

    async def _watch_events(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        """Replay (current objects, or events after the requested resourceVersion), then live."""
        res = request.resource
        assert res is not None
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        since = request.params.get("resourceVersion") or "0"
        initial = request.params.get("sendInitialEvents") == "true"
        async with self._lock:
            if since == "0" or initial:
                replay = [{"type": "ADDED", "object": obj} for obj in self._select(request)]
            elif self._history and int(since) < self._history[0][0] - 1:
                replay = [{"type": "ERROR", "object": _gone(since)}]
            else:
                replay = [
                    copy.deepcopy(event)
                    for rv, r, event in self._history
                    if r == res and rv > int(since) and self._matches(request, event["object"])
                ]
            if initial:
                replay.append(self._bookmark(res, str(self._rv)))
            watcher = (request, queue)
            self._watchers.append(watcher)
        try:
            yield b""  # send the headers now, even if no event ever comes
            for event in replay:
                yield event
            if replay and replay[-1]["type"] == "ERROR":
                return
            timeout = float(request.params.get("timeoutSeconds") or 0) or None
            try:
                async with asyncio.timeout(timeout):
                    while (event := await queue.get()) is not _END:
                        yield event
            except TimeoutError:
                return
        finally:
            async with self._lock:
                self._watchers.remove(watcher)

    async def close_watches(self) -> None:
        """End every open watch stream (so the HTTP server can stop without waiting on them)."""
        async with self._lock:
            for _, queue in self._watchers:
                queue.put_nowait(_END)

    def _bookmark(self, res: kmock.resource, rv: str) -> dict[str, Any]:
        """The end of initial events, for client-go's WatchList (sendInitialEvents=true)."""
        return {
            "type": "BOOKMARK",
            "object": {
                "kind": self._info(res).kind,
                "apiVersion": f"{res.group}/{res.version}" if res.group else res.version,
                "metadata": {
                    "resourceVersion": rv,
                    "annotations": {"k8s.io/initial-events-end": "true"},
                },
            },
        }

    def _publish(self, events: list[tuple[kmock.resource, dict[str, Any]]]) -> None:
        """Record events and hand them to matching watches (call under the lock)."""
        for res, event in events:
            if res in RBAC_RESOURCES:
                self._policy_cache = None
            rv = int(event["object"]["metadata"]["resourceVersion"])
            self._history.append((rv, res, event))
            for request, queue in self._watchers:
                if request.resource == res and self._matches(request, event["object"]):
                    queue.put_nowait(copy.deepcopy(event))
        del self._history[: max(0, len(self._history) - HISTORY_LIMIT)]

    def _select(self, request: rendering.Request) -> list[dict[str, Any]]:
        assert request.resource is not None
        found = []
        for (res, ns, name), obj in self._objects.items():
            if res != request.resource or obj.deleted:
                continue
            raw = obj.raw
            if self._matches(request, raw):
                found.append(((ns or "", name), copy.deepcopy(raw)))
        return [raw for _, raw in sorted(found, key=lambda pair: pair[0])]

    def _matches(self, request: rendering.Request, obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata", {})
        if request.namespace is not None and meta.get("namespace") != request.namespace:
            return False
        if request.name is not None and meta.get("name") != request.name:
            return False
        labels = request.params.get("labelSelector")
        if labels and not _labels_match(meta.get("labels") or {}, labels):
            return False
        fields = request.params.get("fieldSelector")
        return not (fields and not _fields_match(obj, fields))

    # ---- helpers -------------------------------------------------------------------------------

    def _info(self, res: kmock.resource) -> kmock.ResourceInfo:
        if res not in self.resources:
            raise _error(
                404, "NotFound", f"the server could not find the requested resource ({res.plural})"
            )
        return self.resources[res]

    def _stored(self, res: kmock.resource, ns: str | None, name: str) -> dict[str, Any] | None:
        key = (res, ns, name)
        if key not in self._objects:
            return None
        obj = self._objects[key]
        return None if obj.deleted else obj.raw

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _qualified(self, res: kmock.resource) -> str:
        return f"{res.plural}.{res.group}" if res.group else str(res.plural)

    def _not_found(self, res: kmock.resource, name: str) -> ApiError:
        return _error(
            404,
            "NotFound",
            f'{self._qualified(res)} "{name}" not found',
            name=name,
            group=res.group,
            kind=res.plural,
        )

    def _check_rv(
        self, res: kmock.resource, name: str, current: Mapping[str, Any], body: Mapping[str, Any]
    ) -> None:
        """Optimistic concurrency: a write that names a resourceVersion must name the current one."""
        wanted = (body.get("metadata") or {}).get("resourceVersion")
        if wanted and wanted != current["metadata"]["resourceVersion"]:
            raise _error(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {self._qualified(res)} "{name}": the object '
                f"has been modified; please apply your changes to the latest version and try again",
                name=name,
                kind=res.plural,
            )

    @staticmethod
    def _body(request: rendering.Request, *, required: bool = True) -> Any:
        ctype = request.headers.get("Content-Type", "")
        if "protobuf" in ctype or "cbor" in ctype:  # client-go then retries as JSON
            raise _error(415, "UnsupportedMediaType", f"the body type {ctype!r} is not supported")
        text = request.body.decode() if request.body else ""
        if not text.strip():
            if required:
                raise _error(400, "BadRequest", "the request body is empty")
            return None
        try:
            return json.loads(text)
        except ValueError:
            try:
                return yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise _error(400, "BadRequest", f"cannot decode the body: {e}") from None

    @staticmethod
    def _apply_patch(current: Mapping[str, Any], patch: Any, ctype: str) -> Any:
        try:
            if ctype == "application/json-patch+json":
                return jsonpatch.apply_patch(copy.deepcopy(dict(current)), patch)
            if ctype in ("application/merge-patch+json", "application/apply-patch+yaml"):
                return merge_patch(current, patch)
            if ctype == "application/strategic-merge-patch+json":
                return strategic_merge_patch(current, patch)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
            raise _error(422, "Invalid", f"the JSON patch cannot be applied: {e}") from None
        raise _error(415, "UnsupportedMediaType", f"the patch type {ctype!r} is not supported")


class _TlsTestServer(aiohttp.test_utils.RawTestServer):
    """aiohttp's test server on a TLS socket (its constructor takes no SSL context)."""

    def __init__(self, handler: Any, *, ssl_context: ssl.SSLContext, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._tls = ssl_context

    async def start_server(self, loop: Any = None, **kwargs: Any) -> None:
        await super().start_server(loop=loop, ssl=self._tls, **kwargs)


class EmulatorServer:
    """`LumeKubernetesEmulator` served over HTTP on 127.0.0.1 from a background thread.

    Why a thread: tests call blocking things (the kubectl binary, a kopf operator in another
    thread, `time.sleep` polls); an emulator on the test's own event loop would freeze then.

    With ``tls=True`` the same emulator also listens on a second port over HTTPS
    (`https_url`, `https_port`), with a certificate for 127.0.0.1 from a CA made for this
    server (`ca_path`): what a pod's in-cluster config needs (`write_service_account`).
    """

    def __init__(
        self, emulator: LumeKubernetesEmulator | None = None, *, tls: bool = False
    ) -> None:
        self._factory = (lambda: emulator) if emulator is not None else LumeKubernetesEmulator
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stopping: asyncio.Event | None = None
        self._failure: BaseException | None = None
        self.emulator: LumeKubernetesEmulator
        self.url = ""
        self.tls = tls
        self._tls_dir: Path | None = None
        self.ca_path: Path | None = None
        self.https_url = ""
        self.https_port = 0

    def __enter__(self) -> EmulatorServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="k8s-emulator", daemon=True)
        self._thread.start()
        if not self._started.wait(30) or self._failure is not None:
            raise RuntimeError(f"the Kubernetes emulator did not start: {self._failure!r}")

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(30)
        if self._tls_dir is not None:
            shutil.rmtree(self._tls_dir, ignore_errors=True)

    def _main(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve())
        except BaseException as e:  # reported to start(); the thread must not die silently
            self._failure = e
            self._started.set()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        self.emulator = self._factory()
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(self.emulator)
            server = await stack.enter_async_context(kmock.Server(self.emulator))
            self.url = str(server.url).rstrip("/")
            if self.tls:
                self._tls_dir = Path(tempfile.mkdtemp(prefix="emulator-tls-"))
                files = make_server_certificate(self._tls_dir)
                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                context.load_cert_chain(files.cert_path, files.key_path)
                tls_server = functools.partial(_TlsTestServer, ssl_context=context)
                secure = await stack.enter_async_context(
                    kmock.Server(self.emulator, server_cls=tls_server)  # type: ignore[arg-type]
                )
                self.ca_path = files.ca_path
                self.https_port = secure.port
                self.https_url = f"https://127.0.0.1:{secure.port}"
            self._started.set()
            await self._stopping.wait()
            # Close live watch streams first, or the server waits for them on shutdown.
            await self.emulator.close_watches()

    def call(self, fn: Callable[[], Awaitable[T]], timeout: float = 30) -> T:
        """Run a coroutine function on the emulator's loop (to mutate state safely) and wait."""
        assert self._loop is not None
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(fn(), self._loop)
        return future.result(timeout)

    def create(
        self, resource: str, namespace: str | None, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Create an object as cluster-admin, as `kubectl create` would (emits ADDED); an
        existing one is left as it is. For fixtures that set up what a test stands on."""
        return self.create_object(resource, namespace, body, exist_ok=True)

    def write_service_account(
        self, namespace: str, service_account: str, directory: Path
    ) -> dict[str, str]:
        """What the kubelet gives a pod of this ServiceAccount: `token`, `ca.crt` and
        `namespace` written into `directory` (mount it at
        /var/run/secrets/kubernetes.io/serviceaccount), and the environment returned
        (KUBERNETES_SERVICE_HOST and _PORT: this server's HTTPS listener). Needs ``tls=True``.
        Each call issues a new token; `emulator.revoke_token()` of the one in `token` ends it
        when the pod goes. A pod with `automountServiceAccountToken: false` gets none of this.
        """
        if not self.tls or self.ca_path is None:
            raise RuntimeError("write_service_account needs EmulatorServer(tls=True)")
        token = self.emulator.issue_token(namespace, service_account)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "token").write_text(token)
        (directory / "namespace").write_text(namespace)
        shutil.copyfile(self.ca_path, directory / "ca.crt")
        port = str(self.https_port)
        return {
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": port,
            "KUBERNETES_SERVICE_PORT_HTTPS": port,
            "KUBERNETES_PORT": f"tcp://127.0.0.1:{port}",
        }

    def patch_status(
        self, resource: str, namespace: str | None, name: str, status: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Merge into an object's status as a controller would (emits MODIFIED to watchers).

        For what the emulator has no controller for: a Deployment's readyReplicas, a Job's
        completion, a Pod's phase.
        """
        emulator = self.emulator
        res = kmock.resource(resource)

        async def patch() -> dict[str, Any]:
            async with emulator._lock:
                current = emulator._stored(res, namespace, name)
                if current is None:
                    raise emulator._not_found(res, name)
                events: list[tuple[kmock.resource, dict[str, Any]]] = []
                desired = merge_patch(current, {"status": dict(status)})
                new = emulator._update(res, namespace, current, desired, "status", events)
                emulator._publish(events)
                return copy.deepcopy(new)

        return self.call(patch)

    def create_object(
        self,
        resource: str,
        namespace: str | None,
        body: Mapping[str, Any],
        *,
        exist_ok: bool = False,
    ) -> dict[str, Any]:
        """Create as a controller would (admission applies; watchers see ADDED); with
        `exist_ok`, an object of that name is returned as it is."""
        emulator = self.emulator
        res = kmock.resource(resource)

        async def create() -> dict[str, Any]:
            async with emulator._lock:
                name = (body.get("metadata") or {}).get("name", "")
                current = emulator._stored(res, namespace, name) if exist_ok else None
                if current is not None:
                    return copy.deepcopy(current)
                events: list[tuple[kmock.resource, dict[str, Any]]] = []
                new = emulator._create(res, namespace, copy.deepcopy(dict(body)), events)
                emulator._publish(events)
                return copy.deepcopy(new)

        return self.call(create)

    def delete_object(self, resource: str, namespace: str | None, name: str) -> None:
        """Delete as a controller would (owned objects are collected); absent is fine."""
        emulator = self.emulator
        res = kmock.resource(resource)

        async def delete() -> None:
            async with emulator._lock:
                if emulator._stored(res, namespace, name) is None:
                    return
                events: list[tuple[kmock.resource, dict[str, Any]]] = []
                emulator._delete(res, namespace, name, {}, events)
                emulator._publish(events)

        self.call(delete)

    def list_objects(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """Every live object of a resource (deep copies), optionally in one namespace."""
        res = kmock.resource(resource)
        return [
            copy.deepcopy(obj.raw)
            for (r, ns, _), obj in list(self.emulator._objects.items())
            if r == res and not obj.deleted and (namespace is None or ns == namespace)
        ]


def wait_until(predicate: Callable[[], T], timeout: float = 10, interval: float = 0.05) -> T:
    """Poll until `predicate()` is truthy and return it; fail with the last value on timeout.

    Why polling: an operator reacts asynchronously, and a fixed sleep is either flaky or slow.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; last value: {value!r}")
        time.sleep(interval)
