"""RBAC as a cluster enforces it, in the emulated API (issue 11, item 3).

The real kubectl, with a ServiceAccount's token over HTTPS, is allowed what the account's Roles
grant and refused (403, with the API server's message, in the emulator's log) everything else:
other verbs, other namespaces, subresources, other names; a ClusterRole bound by a RoleBinding
grants in that namespace only; discovery is open to every authenticated user. A pod's
in-cluster config (token, CA, KUBERNETES_SERVICE_HOST/PORT) works for the kubernetes client and
for the operator's kopf login alike.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import kmock
import kopf
import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config import incluster_config

from lume_operator.handlers.operator import login
from tests.k8s import rbac
from tests.k8s.conftest import (
    OPERATOR,
    RELEASE,
    RELEASE_NAMESPACE,
    ROOT,
    KopfOperator,
    Kubectl,
    write_kubeconfig,
)
from tests.k8s.emulator import EmulatorServer, wait_until
from tests.k8s.kubelet import KubeletStandIn
from tests.k8s.tools import kubectl_path

READER = "system:serviceaccount:team-a:reader"

SETUP = """
apiVersion: v1
kind: Namespace
metadata: {name: team-a}
---
apiVersion: v1
kind: Namespace
metadata: {name: team-b}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: reader, namespace: team-a}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: reader, namespace: team-a}
rules:
  - apiGroups: [""]
    resources: [pods]
    verbs: [get, list, watch]
  - apiGroups: [""]
    resources: [pods/log]
    verbs: [get]
  - apiGroups: [""]
    resources: [configmaps]
    resourceNames: [allowed]
    verbs: [get, patch]
  - apiGroups: [lume.dev]
    resources: [lumeflows/status]
    verbs: [get, patch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: reader, namespace: team-a}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: reader}
subjects: [{kind: ServiceAccount, name: reader, namespace: team-a}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: secret-reader}
rules:
  - apiGroups: [""]
    resources: [secrets]
    verbs: [get, list]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: secret-reader, namespace: team-a}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: secret-reader}
subjects: [{kind: ServiceAccount, name: reader}]
"""

OBJECTS = """
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: team-a}
spec: {containers: [{name: c, image: busybox}]}
---
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: team-b}
spec: {containers: [{name: c, image: busybox}]}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: allowed, namespace: team-a}
data: {a: "1"}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: other, namespace: team-a}
data: {a: "1"}
---
apiVersion: v1
kind: Secret
metadata: {name: s, namespace: team-a}
stringData: {k: v}
---
apiVersion: v1
kind: Secret
metadata: {name: s, namespace: team-b}
stringData: {k: v}
"""


def forbidden(verb: str, resource: str, where: str, group: str = "") -> str:
    """The API server's words for a refusal, after `User "..." cannot`."""
    return f'User "{READER}" cannot {verb} resource "{resource}" in API group "{group}" {where}'


@pytest.fixture
def as_reader(k8s_emulator: EmulatorServer, kubectl: Kubectl, tmp_path: Path) -> Kubectl:
    """kubectl with the `reader` ServiceAccount's token (namespace team-a), over HTTPS."""
    kubectl("apply", "--validate=false", "-f", "-", input=SETUP)
    kubectl("apply", "--validate=false", "-f", "-", input=OBJECTS)
    token = k8s_emulator.emulator.issue_token("team-a", "reader")
    config_path = write_kubeconfig(k8s_emulator, tmp_path / "reader.yaml", token, "team-a")
    return kubectl_as(config_path, tmp_path / "reader-cache")


def kubectl_as(config_path: Path, cache: Path) -> Kubectl:
    def run(
        *args: str, input: str | None = None, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(kubectl_path()), f"--kubeconfig={config_path}", f"--cache-dir={cache}"]
        proc = subprocess.run(
            [*cmd, *args], input=input, capture_output=True, text=True, timeout=timeout, cwd=ROOT
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}"
            )
        return proc

    return run


def message_of(error: ApiException) -> str:
    return str(json.loads(error.body)["message"])


def refused(kubectl: Kubectl, *args: str) -> str:
    proc = kubectl(*args, check=False)
    assert proc.returncode != 0, f"kubectl {' '.join(args)} was allowed:\n{proc.stdout}"
    assert "Error from server (Forbidden)" in proc.stderr, proc.stderr
    return proc.stderr


def test_rbac_is_enforced(k8s_emulator: EmulatorServer, as_reader: Kubectl):
    emulator = k8s_emulator.emulator
    # Inside the Role: its verbs on pods, in its namespace, and discovery.
    assert as_reader("get", "pods", "-o", "name").stdout.split() == ["pod/p"]
    assert as_reader("get", "pod", "p", "-o", "jsonpath={.metadata.name}").stdout == "p"
    assert "lumeflows" in as_reader("api-resources", "-o", "name").stdout
    assert as_reader("version", "-o", "json").returncode == 0
    assert emulator.refusals(READER) == []

    # Outside it: another verb, another namespace, the whole cluster.
    assert forbidden("delete", "pods", 'in the namespace "team-a"') in refused(
        as_reader, "delete", "pod", "p", "--wait=false"
    )
    team_b = forbidden("list", "pods", 'in the namespace "team-b"')
    assert f"pods is forbidden: {team_b}" in refused(as_reader, "get", "pods", "-n", "team-b")
    assert forbidden("list", "pods", "at the cluster scope") in refused(
        as_reader, "get", "pods", "-A"
    )
    assert forbidden("list", "deployments", 'in the namespace "team-a"', "apps") in refused(
        as_reader, "get", "deployments"
    )

    # Subresources are their own resource: pods/log is granted, pods/status is not.
    log = as_reader("get", "--raw", "/api/v1/namespaces/team-a/pods/p/log", check=False)
    assert "Forbidden" not in log.stderr  # allowed; the emulator serves no logs (404)
    assert forbidden("get", "pods/status", 'in the namespace "team-a"') in refused(
        as_reader, "get", "--raw", "/api/v1/namespaces/team-a/pods/p/status"
    )
    assert forbidden("get", "lumeflows", 'in the namespace "team-a"', "lume.dev") in refused(
        as_reader, "get", "lumeflow", "x"
    )
    patch = ("patch", "lumeflow", "x", "--type=merge", "-p", '{"status": {}}')
    status = as_reader(*patch, "--subresource=status", check=False)
    assert "NotFound" in status.stderr, status.stderr  # allowed; there is no such LumeFlow

    # resourceNames: that name only, and never a list.
    assert as_reader("get", "configmap", "allowed", "-o", "name").stdout.strip() == (
        "configmap/allowed"
    )
    assert 'configmaps "other" is forbidden' in refused(as_reader, "get", "configmap", "other")
    assert forbidden("list", "configmaps", 'in the namespace "team-a"') in refused(
        as_reader, "get", "configmaps"
    )
    as_reader("label", "configmap", "allowed", "seen=yes")  # get, then patch
    assert 'configmaps "other" is forbidden' in refused(
        as_reader, "label", "configmap", "other", "seen=yes"
    )

    # A ClusterRole bound by a RoleBinding grants in the binding's namespace only.
    assert as_reader("get", "secrets", "-o", "name").stdout.split() == ["secret/s"]
    assert forbidden("list", "secrets", 'in the namespace "team-b"') in refused(
        as_reader, "get", "secrets", "-n", "team-b"
    )

    # Every refusal is in the emulator's request log, with who asked and the message sent.
    refusals = emulator.refusals(READER)
    assert {(e.method, e.path, e.refused) for e in refusals} >= {
        ("DELETE", "/api/v1/namespaces/team-a/pods/p", 403),
        ("GET", "/api/v1/namespaces/team-b/pods", 403),
        ("GET", "/api/v1/pods", 403),
        ("GET", "/api/v1/namespaces/team-a/pods/p/status", 403),
        ("GET", "/api/v1/namespaces/team-b/secrets", 403),
    }
    assert all(e.user == READER and "forbidden" in (e.refusal or "") for e in refusals)
    # The admin's own requests were never refused.
    assert all(e.user == READER for e in emulator.refusals())


def test_unknown_tokens_and_anonymous_requests(
    k8s_emulator: EmulatorServer, kubectl: Kubectl, as_reader: Kubectl, tmp_path: Path
):
    """A token nobody issued is 401, and so is one whose ServiceAccount is gone; over HTTPS
    no token at all is system:anonymous, which may read /version and nothing else."""
    forged = write_kubeconfig(k8s_emulator, tmp_path / "forged.yaml", "sa.forged", "team-a")
    proc = kubectl_as(forged, tmp_path / "forged-cache")("get", "pods", check=False)
    assert proc.returncode != 0 and "You must be logged in" in proc.stderr, proc.stderr

    kubectl("delete", "serviceaccount", "reader", "-n", "team-a")
    proc = as_reader("get", "pods", check=False)
    assert proc.returncode != 0 and "You must be logged in" in proc.stderr, proc.stderr
    assert {e.refused for e in k8s_emulator.emulator.refusals()} == {401}
    assert all(e.user is None for e in k8s_emulator.emulator.refusals())

    anonymous = client.Configuration(host=k8s_emulator.https_url)
    anonymous.ssl_ca_cert = str(k8s_emulator.ca_path)
    api = client.ApiClient(anonymous)
    assert client.VersionApi(api).get_code().major
    with pytest.raises(ApiException) as error:
        client.CoreV1Api(api).list_namespaced_pod("team-a")
    assert error.value.status == 403
    assert 'User "system:anonymous" cannot list resource "pods"' in message_of(error.value)


ESCALATION = """
apiVersion: v1
kind: ServiceAccount
metadata: {name: deployer, namespace: team-a}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: deployer, namespace: team-a}
rules:
  - apiGroups: [rbac.authorization.k8s.io]
    resources: [roles, rolebindings]
    verbs: [get, create, patch]
  - apiGroups: [""]
    resources: [pods]
    verbs: [get, list]
  # May bind this one ClusterRole without holding what it grants.
  - apiGroups: [rbac.authorization.k8s.io]
    resources: [clusterroles]
    resourceNames: [secret-reader]
    verbs: [bind]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: deployer, namespace: team-a}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: deployer}
subjects: [{kind: ServiceAccount, name: deployer, namespace: team-a}]
"""


def role(name: str, verbs: str) -> str:
    return f"""
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: {name}, namespace: team-a}}
rules: [{{apiGroups: [""], resources: [pods], verbs: [{verbs}]}}]
"""


def binding(name: str, kind: str, role_name: str) -> str:
    return f"""
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: {name}, namespace: team-a}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: {kind}, name: {role_name}}}
subjects: [{{kind: ServiceAccount, name: reader, namespace: team-a}}]
"""


def test_escalation_is_refused(
    k8s_emulator: EmulatorServer, kubectl: Kubectl, as_reader: Kubectl, tmp_path: Path
):
    """A ServiceAccount may write a Role, or bind one, only with what it grants in hand (or
    `bind` on that very role), as the API server's RBAC storage checks."""
    kubectl("apply", "--validate=false", "-f", "-", input=ESCALATION)
    token = k8s_emulator.emulator.issue_token("team-a", "deployer")
    config_path = write_kubeconfig(k8s_emulator, tmp_path / "deployer.yaml", token, "team-a")
    deployer = kubectl_as(config_path, tmp_path / "deployer-cache")

    def apply(manifest: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return deployer("apply", "--validate=false", "-f", "-", input=manifest, check=check)

    apply(role("pod-getter", "get, list"))
    apply(role("pod-getter", "get"))  # an update: still held
    proc = apply(role("pod-deleter", "get, delete"), check=False)
    assert proc.returncode != 0
    assert (
        'roles.rbac.authorization.k8s.io "pod-deleter" is forbidden: user '
        '"system:serviceaccount:team-a:deployer"' in proc.stderr
    ), proc.stderr
    assert "attempting to grant RBAC permissions not currently held:" in proc.stderr
    assert '{APIGroups:[""], Resources:["pods"], Verbs:["delete"]}' in proc.stderr
    assert 'Verbs:["get"]' not in proc.stderr  # what it holds is not listed
    proc = apply(role("pod-getter", "get, delete"), check=False)  # nor by an update
    assert "not currently held" in proc.stderr
    assert (
        k8s_emulator.emulator.get_object(
            "rbac.authorization.k8s.io/v1/roles", "team-a", "pod-deleter"
        )
        is None
    )

    apply(binding("gets-pods", "Role", "pod-getter"))  # what it holds itself
    apply(binding("reads-secrets", "ClusterRole", "secret-reader"))  # `bind` on that one
    proc = apply(binding("admin", "ClusterRole", "cluster-admin"), check=False)
    assert 'rolebindings.rbac.authorization.k8s.io "admin" is forbidden' in proc.stderr
    proc = apply(binding("missing", "Role", "no-such-role"), check=False)
    assert 'roles.rbac.authorization.k8s.io "no-such-role" not found' in proc.stderr

    # The binding made by the deployer takes effect for the reader.
    assert as_reader("get", "secrets", "-o", "name").stdout.split() == ["secret/s"]
    # A binding's roleRef never changes, not even for cluster-admin.
    proc = kubectl(
        "apply", "--validate=false", "-f", "-",
        input=binding("gets-pods", "Role", "reader"), check=False,
    )  # fmt: skip
    assert "cannot change roleRef" in proc.stderr, proc.stderr


def test_in_cluster_credentials(
    k8s_emulator: EmulatorServer,
    kubectl: Kubectl,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    run_kopf_operator: Any,
):
    """What the kubelet gives a pod (token, CA and namespace files; KUBERNETES_SERVICE_HOST and
    _PORT) is a working in-cluster config: the kubernetes client lists what the Role allows
    and gets 403 on the rest, and the operator's kopf login reaches the same server as the
    same ServiceAccount."""
    kubectl("apply", "--validate=false", "-f", "-", input=SETUP)
    kubectl("apply", "--validate=false", "-f", "-", input=OBJECTS)
    mount = tmp_path / "serviceaccount"
    env = k8s_emulator.write_service_account("team-a", "reader", mount)
    assert sorted(p.name for p in mount.iterdir()) == ["ca.crt", "namespace", "token"]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(mount / "token"))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(mount / "ca.crt"))

    configuration = client.Configuration()
    config.load_incluster_config(client_configuration=configuration)
    assert configuration.host == k8s_emulator.https_url
    core = client.CoreV1Api(client.ApiClient(configuration))
    assert [p.metadata.name for p in core.list_namespaced_pod("team-a").items] == ["p"]
    with pytest.raises(ApiException) as error:
        core.list_namespaced_pod("team-b")
    assert error.value.status == 403
    assert forbidden("list", "pods", 'in the namespace "team-b"') in message_of(error.value)

    # kopf, logged in by lume-operator's login handler, watches pods as the same account.
    seen: list[str] = []
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(login)
    kopf.on.event("v1", "pods", registry=registry)(
        lambda name, **_: seen.append(name)  # type: ignore[misc]
    )
    settings = kopf.OperatorSettings()
    settings.scanning.disabled = True  # the account may not list CRDs
    operator: KopfOperator = run_kopf_operator(registry, namespaces=["team-a"], settings=settings)
    wait_until(lambda: seen == ["p"], timeout=20)
    watches = [e for e in k8s_emulator.emulator.log if e.action == "watch"]
    assert watches and {e.user for e in watches} == {READER}
    assert {e.path for e in watches} == {"/api/v1/namespaces/team-a/pods"}
    # The one refusal is the client's list in team-b, above.
    assert [e.path for e in k8s_emulator.emulator.refusals()] == ["/api/v1/namespaces/team-b/pods"]
    assert operator.alive


OPERATOR_USER = f"system:serviceaccount:{RELEASE_NAMESPACE}:{RELEASE}-lume-operator"
SB = "lume.dev/v1alpha1/schedulingbackends"


def kubernetes_backend(name: str, namespace: str, extra: str = "") -> str:
    return f"""
apiVersion: lume.dev/v1alpha1
kind: SchedulingBackend
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  type: kubernetes
  agent:
    replicas: 1
    env: {{PREFECT_WORKER_QUERY_SECONDS: "1", PREFECT_WORKER_PREFETCH_SECONDS: "1"}}
{extra}"""


def reason_of(server: EmulatorServer, namespace: str, name: str) -> str | None:
    obj = server.emulator.get_object(SB, namespace, name) or {}
    ready = [c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == "Ready"]
    return ready[0]["reason"] if ready else None


@pytest.fixture
def prefect_env(shared_prefect_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("PREFECT_API_URL", shared_prefect_server.api_url)
    monkeypatch.setenv("LUME_OPERATOR_FOLLOW_INTERVAL", "1")
    return shared_prefect_server


@pytest.mark.prefect
def test_operator_holds_only_the_charts_rbac(
    prefect_env: Any, k8s_emulator: EmulatorServer, kubectl: Kubectl, run_kopf_operator: Any
):
    """The operator runs as the chart's ServiceAccount (cluster-wide, Secrets readable in
    `default` only): it creates a kubernetes backend's agent, Role and RoleBinding included
    (allowed only because it holds what the Role grants), and a backend whose API-key Secret
    lies in a namespace it may not read gets `SecretForbidden` in status."""
    run_kopf_operator(OPERATOR, allow_refusals=True)
    kubectl(
        "apply", "--validate=false", "-f", "-",
        input=kubernetes_backend("k8s", "default") + "---\n" + SECRET_ELSEWHERE,
    )  # fmt: skip
    wait_until(lambda: reason_of(k8s_emulator, "team-a", "keyed") == "SecretForbidden", 30)
    obj = k8s_emulator.emulator.get_object(SB, "team-a", "keyed") or {}
    (ready,) = [c for c in obj["status"]["conditions"] if c["type"] == "Ready"]
    assert "rbac.secretNamespaces" in ready["message"] and ready["status"] == "False"
    roles = "rbac.authorization.k8s.io/v1/roles"
    wait_until(lambda: k8s_emulator.emulator.get_object(roles, "default", "k8s-agent"), 30)
    wait_until(lambda: reason_of(k8s_emulator, "default", "k8s") == "AgentNotReady", 30)

    log = k8s_emulator.emulator.log
    writes = {(e.method, e.path) for e in log if e.user == OPERATOR_USER and e.method == "POST"}
    assert {
        ("POST", "/apis/rbac.authorization.k8s.io/v1/namespaces/default/roles"),
        ("POST", "/apis/rbac.authorization.k8s.io/v1/namespaces/default/rolebindings"),
        ("POST", "/apis/apps/v1/namespaces/default/deployments"),
    } <= writes
    assert {e.user for e in log if e.action == "watch"} == {OPERATOR_USER}
    # Its one refusal: the Secret it may not read (retried with backoff, never a list).
    refused = {(e.method, e.path, e.refused) for e in k8s_emulator.emulator.refusals()}
    assert refused == {("GET", "/api/v1/namespaces/team-a/secrets/prefect-key", 403)}


@pytest.mark.prefect
@pytest.mark.parametrize("namespaced", [True, False], ids=["namespaced", "cluster-wide"])
def test_operator_with_peering_under_the_charts_rbac(
    namespaced: bool,
    prefect_env: Any,
    k8s_emulator: EmulatorServer,
    kubectl: Kubectl,
    run_kopf_operator: Any,
):
    """The chart's two modes as installed: watching one namespace (a Role there, a KopfPeering
    there) or the cluster (a ClusterRole, a ClusterKopfPeering), kopf peering on; the operator
    builds a kubernetes backend's agent with no request refused (checked at teardown)."""
    kubectl("apply", "--validate=false", "-f", "-", input=TEAM_A)
    namespaces = ["team-a"] if namespaced else None
    run_kopf_operator(OPERATOR, namespaces=namespaces, peering="lume-operator")
    kubectl("apply", "--validate=false", "-f", "-", input=kubernetes_backend("k8s", "team-a"))
    wait_until(lambda: reason_of(k8s_emulator, "team-a", "k8s") == "AgentNotReady", 30)
    peering = (
        ("kopf.dev/v1/kopfpeerings", "team-a")
        if namespaced
        else ("kopf.dev/v1/clusterkopfpeerings", None)
    )
    heartbeat = k8s_emulator.emulator.get_object(*peering, "lume-operator") or {}
    assert heartbeat.get("status"), "kopf wrote no heartbeat into the chart's peering object"
    assert k8s_emulator.emulator.get_object(
        "rbac.authorization.k8s.io/v1/rolebindings", "team-a", "k8s-agent"
    )


TEAM_A = """
apiVersion: v1
kind: Namespace
metadata: {name: team-a}
"""


LUMEFLOW_ON_K8S = """
apiVersion: lume.dev/v1alpha1
kind: LumeFlow
metadata: {name: on-k8s, namespace: default}
spec:
  backendRef: {name: k8s}
  entrypoint: flows/beam.py:beam_stats
  source: {image: lume-example:dev}
  run: {policy: OnChange}
"""


@pytest.mark.prefect
def test_kubernetes_worker_needs_only_its_role(
    prefect_env: Any,
    k8s_emulator: EmulatorServer,
    kubectl: Kubectl,
    run_kopf_operator: Any,
    tmp_path: Path,
):
    """The real prefect-kubernetes worker, as its agent's ServiceAccount, does all it does
    within the Role the operator gives it (backends.agent.WORKER_RULES): creates the flow
    run's Job; watches Jobs and Pods in its namespace only; and when the Job fails before the
    flow started, reads the failed Pod's log, lists the run's Jobs and marks the run Crashed."""
    run_kopf_operator(OPERATOR)
    kubectl("apply", "--validate=false", "-f", "-", input=kubernetes_backend("k8s", "default"))
    emulator = k8s_emulator.emulator
    deployment = wait_until(
        lambda: emulator.get_object("apps/v1/deployments", "default", "k8s-agent"), 30
    )
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    token = emulator.issue_token("default", account)
    worker_config = write_kubeconfig(k8s_emulator, tmp_path / "agent.yaml", token)
    agent = f"system:serviceaccount:default:{account}"
    kubelet = KubeletStandIn(
        k8s_emulator, "default", "k8s-agent", tmp_path, {"KUBECONFIG": str(worker_config)}
    )
    kubelet.start()
    try:
        kubectl("apply", "--validate=false", "-f", "-", input=LUMEFLOW_ON_K8S)

        def job() -> dict[str, Any] | None:
            found = [o for (r, _, _), o in emulator.objects.items()
                     if r == kmock.resource("batch/v1/jobs") and not o.deleted]  # fmt: skip
            return found[0].raw if found else None

        try:
            created = wait_until(job, timeout=60)
        except AssertionError:
            calls = [(e.method, e.path, e.refused) for e in emulator.log if e.user == agent]
            raise AssertionError(
                f"no Job; the agent's calls: {calls}\nworker log:\n{kubelet.log.read_text()}"
            ) from None
        # What the job controller and kubelet would write: its pod, failed; the Job, failed.
        name = created["metadata"]["name"]
        template = created["spec"]["template"]
        labels = {**created["metadata"].get("labels", {}), **template["metadata"]["labels"]}
        pod = {
            "metadata": {"name": f"{name}-x1", "labels": {**labels, "job-name": name}},
            "spec": template["spec"],
        }
        k8s_emulator.create("v1/pods", "default", pod)
        k8s_emulator.patch_status("v1/pods", "default", f"{name}-x1", {"phase": "Failed"})
        failed = int(created["spec"].get("backoffLimit", 0)) + 1
        k8s_emulator.patch_status(
            "batch/v1/jobs", "default", name,
            {"failed": failed, "conditions": [{"type": "Failed", "status": "True"}]},
        )  # fmt: skip

        def last_state() -> str | None:
            flow = emulator.get_object("lume.dev/v1alpha1/lumeflows", "default", "on-k8s") or {}
            return ((flow.get("status") or {}).get("lastRun") or {}).get("state")

        wait_until(lambda: last_state() == "Crashed", timeout=90)
    finally:
        kubelet.stop()

    calls = {(e.method, e.path, e.action) for e in emulator.log if e.user == agent}
    print("the kubernetes worker's calls:", *sorted(map(str, calls)), sep="\n  ")
    assert emulator.refusals(agent) == []
    pods, jobs = "/api/v1/namespaces/default/pods", "/apis/batch/v1/namespaces/default/jobs"
    assert {
        ("POST", jobs, "create"),  # the worker: the flow run's Job
        ("GET", jobs, "watch"),  # the observer (kopf): Jobs and Pods of flow runs
        ("GET", pods, "watch"),
        ("GET", jobs, "list"),  # the observer, on the failed Job: other Jobs of the run,
        ("GET", pods, "list"),  # its pods,
        ("GET", f"{pods}/{name}-x1/log", "fetch"),  # and their logs
    } <= calls
    # Nothing across namespaces: the observer is held to the backend's namespace.
    across = re.compile(r"/api/v1/[^/]+|/apis/[^/]+/[^/]+/[^/]+")  # a list of all namespaces
    assert not [c for c in calls if across.fullmatch(c[1])]


SECRET_ELSEWHERE = """
apiVersion: v1
kind: Namespace
metadata: {name: team-a}
---
apiVersion: v1
kind: Secret
metadata: {name: prefect-key, namespace: team-a}
stringData: {key: not-a-real-key}
---
apiVersion: lume.dev/v1alpha1
kind: SchedulingBackend
metadata: {name: keyed, namespace: team-a}
spec:
  type: process
  prefect:
    apiKeySecretRef: {name: prefect-key, key: key}
"""


# ---- the rules themselves, without a server -----------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("rule", "attrs", "allowed"),
    [
        ({"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}, ("get", "", "pods", ""), True),
        ({"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}, ("get", "", "pods", "log"), False),
        ({"apiGroups": [""], "resources": ["*"], "verbs": ["get"]}, ("get", "", "pods", "log"), True),
        ({"apiGroups": [""], "resources": ["*/status"], "verbs": ["patch"]}, ("patch", "", "pods", "status"), True),
        ({"apiGroups": [""], "resources": ["*/status"], "verbs": ["patch"]}, ("patch", "", "pods", ""), False),
        ({"apiGroups": ["*"], "resources": ["jobs"], "verbs": ["*"]}, ("delete", "batch", "jobs", ""), True),
        ({"apiGroups": ["apps"], "resources": ["jobs"], "verbs": ["*"]}, ("delete", "batch", "jobs", ""), False),
    ],
)  # fmt: skip
def test_rule_matching(rule: dict[str, Any], attrs: tuple[str, ...], allowed: bool):
    verb, group, resource, sub = attrs
    asked = rbac.Attributes(verb, True, "ns", group, resource, sub, "x")
    assert rbac.rule_allows(rule, asked) is allowed


@pytest.mark.unit
def test_resource_names_and_urls():
    named = {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["a"], "verbs": ["*"]}
    assert rbac.rule_allows(named, rbac.Attributes("get", True, "ns", "", "configmaps", name="a"))
    assert not rbac.rule_allows(named, rbac.Attributes("list", True, "ns", "", "configmaps"))
    assert rbac.name_of("watch", None, {"fieldSelector": "metadata.name=a"}) == "a"
    urls = {"nonResourceURLs": ["/apis/*", "/version"], "verbs": ["get"]}
    assert rbac.rule_allows(urls, rbac.Attributes("get", False, path="/apis/lume.dev"))
    assert not rbac.rule_allows(urls, rbac.Attributes("get", False, path="/api"))
    assert not rbac.rule_allows(urls, rbac.Attributes("post", False, path="/version"))


@pytest.mark.unit
def test_bindings_grant_where_they_live():
    policy = rbac.Policy.of(
        [
            {"kind": "ClusterRole", "metadata": {"name": "read"},
             "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]},
            {"kind": "RoleBinding", "metadata": {"name": "b", "namespace": "a"},
             "roleRef": {"kind": "ClusterRole", "name": "read"},
             "subjects": [{"kind": "ServiceAccount", "name": "sa"}]},
            {"kind": "ClusterRoleBinding", "metadata": {"name": "g"},
             "roleRef": {"kind": "ClusterRole", "name": "read"},
             "subjects": [{"kind": "Group", "name": "system:serviceaccounts:c"}]},
        ]
    )  # fmt: skip
    sa = rbac.UserInfo.service_account("a", "sa")
    assert policy.allows(sa, rbac.Attributes("list", True, "a", "", "pods"))
    assert not policy.allows(sa, rbac.Attributes("list", True, "b", "", "pods"))
    assert not policy.allows(sa, rbac.Attributes("list", True, "", "", "pods"))
    other = rbac.UserInfo.service_account("b", "sa")  # same name, another namespace
    assert not policy.allows(other, rbac.Attributes("list", True, "a", "", "pods"))
    grouped = rbac.UserInfo.service_account("c", "anyone")
    assert policy.allows(grouped, rbac.Attributes("list", True, "", "", "pods"))


@pytest.mark.unit
def test_escalation_coverage():
    held = [
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "create"]},
        {"apiGroups": [""], "resources": ["*/log"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["a"], "verbs": ["get"]},
    ]
    assert (
        rbac.not_held(held, [{"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get"]}])
        == []
    )
    assert (
        rbac.not_held(held, [{"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]}])
        == []
    )
    named = {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}
    assert rbac.not_held(held, [{**named, "resourceNames": ["a"]}]) == []
    assert rbac.not_held(held, [named]) == [named]  # every name is more than one
    wild = {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["*"]}
    assert rbac.not_held(held, [wild]) == [wild]  # a wildcard is held only as a wildcard
    assert rbac.not_held(held, [{"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "delete"]}]) == [
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["delete"]}
    ]  # fmt: skip
