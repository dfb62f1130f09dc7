"""Kubernetes RBAC, as the API server's RBAC authorizer decides it, for the emulator.

Why: a namespaced Role that misses a verb, a subresource or a namespace shows only when
something refuses the call. These are the rules of `k8s.io/kubernetes/plugin/pkg/auth/
authorizer/rbac` and `pkg/registry/rbac/validation` over plain dicts (the stored Roles,
ClusterRoles and bindings), so `emulator.py` can answer 403 where a cluster would.

Modelled: users and groups (service accounts as `system:serviceaccount:<ns>:<name>`), rules
matched on apiGroups, resources (`pods/log`, `*/status`, `*`), verbs, resourceNames and
nonResourceURLs; RoleBindings granting in their own namespace only (to a Role there or a
ClusterRole); the escalation check on writing Roles and bindings (`escalate`, `bind`).
Not modelled: aggregated ClusterRoles (`aggregationRule` is ignored: only `rules` count),
impersonation, other authorizers (Node, webhook, ABAC).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

RBAC_GROUP = "rbac.authorization.k8s.io"
MASTERS = "system:masters"  # the privileged group: never asked about (as in a real server)
AUTHENTICATED = "system:authenticated"
Rule = Mapping[str, Any]


@dataclass(frozen=True)
class UserInfo:
    """Who made a request, as an authenticator reports it."""

    name: str
    groups: tuple[str, ...] = ()

    @classmethod
    def service_account(cls, namespace: str, name: str) -> UserInfo:
        """The identity a ServiceAccount token carries."""
        return cls(
            f"system:serviceaccount:{namespace}:{name}",
            ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", AUTHENTICATED),
        )


ADMIN = UserInfo("kubernetes-admin", (MASTERS, AUTHENTICATED))
ANONYMOUS = UserInfo("system:anonymous", ("system:unauthenticated",))


@dataclass(frozen=True)
class Attributes:
    """What a request asks to do, in the authorizer's terms (`authorizer.Attributes`)."""

    verb: str
    resource_request: bool = True
    namespace: str = ""
    api_group: str = ""
    resource: str = ""
    subresource: str = ""
    name: str = ""
    path: str = ""  # non-resource requests only

    @property
    def full_resource(self) -> str:
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource


def resource_verb(method: str, name: str | None, query: Mapping[str, str]) -> str:
    """The RBAC verb of a resource request (`RequestInfoFactory.NewRequestInfo`)."""
    method = method.upper()
    if method in ("GET", "HEAD"):
        if query.get("watch") in ("true", "1"):
            return "watch"
        return "get" if name else "list"
    if method == "DELETE":
        return "delete" if name else "deletecollection"
    return {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, method.lower())


def name_of(verb: str, name: str | None, query: Mapping[str, str]) -> str:
    """A list or watch selecting one object by `metadata.name` is about that name, as in
    the API server (so resourceNames can allow `kubectl get x -w`)."""
    if name or verb not in ("list", "watch"):
        return name or ""
    for term in (query.get("fieldSelector") or "").split(","):
        if "!=" in term:
            continue
        key, _, value = term.replace("==", "=").partition("=")
        if key.strip() == "metadata.name":
            return value.strip()
    return ""


# ---- matching ---------------------------------------------------------------------------------


def _has(items: Iterable[str] | None, value: str, wildcard: str = "*") -> bool:
    items = list(items or [])
    return wildcard in items or value in items


def _resource_matches(rule: Rule, resource: str, subresource: str) -> bool:
    combined = f"{resource}/{subresource}" if subresource else resource
    for granted in rule.get("resources") or []:
        if granted in ("*", combined):
            return True
        if subresource and granted == f"*/{subresource}":
            return True
    return False


def _url_matches(rule: Rule, path: str) -> bool:
    for granted in rule.get("nonResourceURLs") or []:
        if granted in ("*", path):
            return True
        if granted.endswith("*") and path.startswith(granted.rstrip("*")):
            return True
    return False


def rule_allows(rule: Rule, attrs: Attributes) -> bool:
    """One PolicyRule against one request (`RuleAllows`)."""
    if not _has(rule.get("verbs"), attrs.verb):
        return False
    if not attrs.resource_request:
        return _url_matches(rule, attrs.path)
    names = rule.get("resourceNames") or []
    return (
        _has(rule.get("apiGroups"), attrs.api_group)
        and _resource_matches(rule, attrs.resource, attrs.subresource)
        and (not names or attrs.name in names)
    )


def subject_applies(subject: Mapping[str, Any], user: UserInfo, binding_namespace: str) -> bool:
    """A binding's subject names this user (`appliesToUser`); a ServiceAccount subject without
    a namespace means one in the binding's own namespace."""
    kind, name = subject.get("kind"), subject.get("name")
    if kind == "User":
        return name == user.name
    if kind == "Group":
        return name in user.groups
    if kind == "ServiceAccount":
        namespace = subject.get("namespace") or binding_namespace
        return bool(namespace) and user.name == f"system:serviceaccount:{namespace}:{name}"
    return False


@dataclass
class Policy:
    """The RBAC objects of a cluster, by where a binding looks its role up."""

    roles: dict[tuple[str, str], list[Rule]] = field(default_factory=dict)
    cluster_roles: dict[str, list[Rule]] = field(default_factory=dict)
    role_bindings: list[Mapping[str, Any]] = field(default_factory=list)
    cluster_role_bindings: list[Mapping[str, Any]] = field(default_factory=list)

    @classmethod
    def of(cls, objects: Iterable[Mapping[str, Any]]) -> Policy:
        policy = cls()
        for obj in objects:
            meta = obj.get("metadata") or {}
            kind = obj.get("kind")
            if kind == "Role":
                policy.roles[meta.get("namespace", ""), meta["name"]] = obj.get("rules") or []
            elif kind == "ClusterRole":
                policy.cluster_roles[meta["name"]] = obj.get("rules") or []
            elif kind == "RoleBinding":
                policy.role_bindings.append(obj)
            elif kind == "ClusterRoleBinding":
                policy.cluster_role_bindings.append(obj)
        return policy

    def role_rules(self, ref: Mapping[str, Any], namespace: str) -> list[Rule] | None:
        """The rules a roleRef names; None when that role does not exist."""
        if ref.get("kind") == "ClusterRole":
            return self.cluster_roles.get(ref.get("name", ""))
        if ref.get("kind") == "Role" and namespace:
            return self.roles.get((namespace, ref.get("name", "")))
        return None

    def rules_for(self, user: UserInfo, namespace: str) -> list[Rule]:
        """Every rule the user holds in a namespace ("" = at the cluster scope): those of
        ClusterRoleBindings everywhere, those of the namespace's RoleBindings there only."""
        rules: list[Rule] = []
        for binding in self.cluster_role_bindings:
            if any(subject_applies(s, user, "") for s in binding.get("subjects") or []):
                rules += self.role_rules(binding.get("roleRef") or {}, "") or []
        if namespace:
            for binding in self.role_bindings:
                if binding["metadata"].get("namespace") != namespace:
                    continue
                if any(subject_applies(s, user, namespace) for s in binding.get("subjects") or []):
                    rules += self.role_rules(binding.get("roleRef") or {}, namespace) or []
        return rules

    def allows(self, user: UserInfo, attrs: Attributes) -> bool:
        if MASTERS in user.groups:
            return True
        return any(rule_allows(rule, attrs) for rule in self.rules_for(user, attrs.namespace))


# ---- refusals ---------------------------------------------------------------------------------


def forbidden_message(user: UserInfo, attrs: Attributes) -> str:
    """The message of the API server's 403 (`responsewriters.forbiddenMessage`, wrapped by
    `errors.NewForbidden`)."""
    if not attrs.resource_request:
        return f'forbidden: User "{user.name}" cannot {attrs.verb} path "{attrs.path}"'
    qualified = f"{attrs.resource}.{attrs.api_group}" if attrs.api_group else attrs.resource
    what = f'{qualified} "{attrs.name}"' if attrs.name else qualified
    scope = f'in the namespace "{attrs.namespace}"' if attrs.namespace else "at the cluster scope"
    return (
        f'{what} is forbidden: User "{user.name}" cannot {attrs.verb} resource '
        f'"{attrs.full_resource}" in API group "{attrs.api_group}" {scope}'
    )


# ---- escalation -------------------------------------------------------------------------------


def _atoms(rule: Rule) -> list[dict[str, list[str]]]:
    """A rule broken into one verb on one thing each (`BreakdownRule`)."""
    out: list[dict[str, list[str]]] = []
    verbs = rule.get("verbs") or []
    for group in rule.get("apiGroups") or []:
        for resource in rule.get("resources") or []:
            for verb in verbs:
                names: Sequence[str] = rule.get("resourceNames") or []
                for name in names or [None]:
                    atom = {"apiGroups": [group], "resources": [resource]}
                    if name is not None:
                        atom["resourceNames"] = [name]
                    out.append({**atom, "verbs": [verb]})
    for url in rule.get("nonResourceURLs") or []:
        for verb in verbs:
            out.append({"nonResourceURLs": [url], "verbs": [verb]})
    return out


def _covers(owner: Rule, atom: Mapping[str, list[str]]) -> bool:
    """Whether one held rule covers one atomic rule (`ruleCovers`)."""
    if not all(_has(owner.get("verbs"), v) for v in atom["verbs"]):
        return False
    if not all(_has(owner.get("apiGroups"), g) for g in atom.get("apiGroups", [])):
        return False
    held = owner.get("resources") or []
    for resource in atom.get("resources", []):
        sub = resource.partition("/")[2]
        if not ("*" in held or resource in held or (sub and f"*/{sub}" in held)):
            return False
    urls = owner.get("nonResourceURLs") or []
    for url in atom.get("nonResourceURLs", []):
        if not any(u == url or (u.endswith("*") and url.startswith(u.rstrip("*"))) for u in urls):
            return False
    owner_names = owner.get("resourceNames") or []
    wanted = atom.get("resourceNames") or []
    if not wanted:
        return not owner_names
    return not owner_names or all(n in owner_names for n in wanted)


def not_held(held: Sequence[Rule], wanted: Iterable[Rule]) -> list[dict[str, list[str]]]:
    """The atoms of `wanted` that no rule of `held` covers (`validation.Covers`)."""
    return [
        atom
        for rule in wanted
        for atom in _atoms(rule)
        if not any(_covers(owner, atom) for owner in held)
    ]


_COMPACT_KEYS = {
    "apiGroups": "APIGroups",
    "resources": "Resources",
    "resourceNames": "ResourceNames",
    "nonResourceURLs": "NonResourceURLs",
    "verbs": "Verbs",
}


def escalation_message(user: UserInfo, missing: Sequence[Mapping[str, list[str]]]) -> str:
    """`ConfirmNoEscalation`'s words, with each missing rule in its compact form."""

    def compact(atom: Mapping[str, list[str]]) -> str:
        parts = [
            f"{_COMPACT_KEYS[key]}:[{', '.join(json.dumps(v) for v in values)}]"
            for key, values in atom.items()
        ]
        return "{" + ", ".join(parts) + "}"

    groups = ", ".join(f'"{g}"' for g in user.groups)
    return (
        f'user "{user.name}" (groups=[{groups}]) is attempting to grant RBAC permissions not '
        "currently held:\n" + "\n".join(compact(a) for a in missing)
    )


# ---- the bootstrap policy ---------------------------------------------------------------------


def _bootstrap_role(name: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    labels = {"kubernetes.io/bootstrapping": "rbac-defaults"}
    return {"metadata": {"name": name, "labels": labels}, "rules": rules}


def _bootstrap_binding(name: str, groups: Iterable[str]) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
        "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": name},
        "subjects": [{"apiGroup": RBAC_GROUP, "kind": "Group", "name": g} for g in groups],
    }


_DISCOVERY = ["/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/openapi",
              "/openapi/*", "/readyz", "/version", "/version/"]  # fmt: skip
_PUBLIC_INFO = ["/healthz", "/livez", "/readyz", "/version", "/version/"]

# What every cluster starts with (a subset of `bootstrappolicy`): cluster-admin for
# system:masters; discovery, public info and self-reviews for every authenticated user.
BOOTSTRAP_CLUSTER_ROLES = [
    _bootstrap_role(
        "cluster-admin",
        [
            {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
            {"nonResourceURLs": ["*"], "verbs": ["*"]},
        ],
    ),
    _bootstrap_role("system:discovery", [{"nonResourceURLs": _DISCOVERY, "verbs": ["get"]}]),
    _bootstrap_role(
        "system:public-info-viewer", [{"nonResourceURLs": _PUBLIC_INFO, "verbs": ["get"]}]
    ),
    _bootstrap_role(
        "system:basic-user",
        [
            {
                "apiGroups": ["authorization.k8s.io"],
                "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"],
                "verbs": ["create"],
            }
        ],
    ),
]
BOOTSTRAP_CLUSTER_ROLE_BINDINGS = [
    _bootstrap_binding("cluster-admin", [MASTERS]),
    _bootstrap_binding("system:discovery", [AUTHENTICATED]),
    _bootstrap_binding("system:public-info-viewer", [AUTHENTICATED, "system:unauthenticated"]),
    _bootstrap_binding("system:basic-user", [AUTHENTICATED]),
]
