"""The PSS `restricted` checker itself: a compliant pod passes, and each control catches its case.

Why: the chart's and the operator's pods are judged by this checker, so a checker that passed
everything would prove nothing. Each case breaks one field of a compliant pod and expects the
control's name and the field's path in the message.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from lume_operator.backends.pss import pod_templates, pss_restricted_problems

pytestmark = pytest.mark.unit


def good_pod() -> dict[str, Any]:
    """A pod spec that passes `restricted`, with each kind of container and allowed volumes."""
    restricted = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    return {
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
            "sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}],
        },
        "initContainers": [{"name": "init", "image": "x", "securityContext": dict(restricted)}],
        "containers": [
            {
                "name": "main",
                "image": "x",
                "ports": [{"containerPort": 8080}],
                "securityContext": {
                    **copy.deepcopy(restricted),
                    "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]},
                    "seLinuxOptions": {"type": "container_t"},
                    "appArmorProfile": {"type": "RuntimeDefault"},
                    "procMount": "Default",
                },
            }
        ],
        "volumes": [
            {"name": "tmp", "emptyDir": {}},
            {"name": "data", "persistentVolumeClaim": {"claimName": "d"}},
            {"name": "cfg", "configMap": {"name": "c"}},
            {"name": "token", "projected": {"sources": []}},
        ],
    }


def _main(pod: dict[str, Any]) -> dict[str, Any]:
    return pod["containers"][0]["securityContext"]


CASES: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("hostNetwork", lambda p: p.update(hostNetwork=True), "Host Namespaces: spec.hostNetwork"),
    ("hostPID", lambda p: p.update(hostPID=True), "Host Namespaces: spec.hostPID"),
    ("hostIPC", lambda p: p.update(hostIPC=True), "Host Namespaces: spec.hostIPC"),
    (
        "hostProcess",
        lambda p: _main(p).update(windowsOptions={"hostProcess": True}),
        "HostProcess: spec.containers[0].securityContext.windowsOptions.hostProcess",
    ),
    (
        "privileged",
        lambda p: _main(p).update(privileged=True),
        "Privileged Containers: spec.containers[0].securityContext.privileged",
    ),
    (
        "capability outside baseline",
        lambda p: _main(p)["capabilities"].update(add=["SYS_ADMIN"]),
        "Capabilities: spec.containers[0].securityContext.capabilities.add: SYS_ADMIN",
    ),
    (
        "baseline capability beyond NET_BIND_SERVICE",
        lambda p: _main(p)["capabilities"].update(add=["CHOWN"]),
        "Capabilities: spec.containers[0].securityContext.capabilities.add: CHOWN",
    ),
    (
        "drop without ALL",
        lambda p: _main(p).update(capabilities={"drop": ["NET_RAW"]}),
        "Capabilities: spec.containers[0].securityContext.capabilities.drop: must include ALL",
    ),
    (
        "no capabilities on an init container",
        lambda p: p["initContainers"][0]["securityContext"].pop("capabilities"),
        "Capabilities: spec.initContainers[0].securityContext.capabilities.drop",
    ),
    (
        "hostPath volume",
        lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        "HostPath Volumes: spec.volumes[4].hostPath",
    ),
    (
        "volume type outside the list",
        lambda p: p["volumes"].append({"name": "n", "nfs": {"server": "s", "path": "/"}}),
        "Volume Types: spec.volumes[4].nfs",
    ),
    (
        "hostPort",
        lambda p: p["containers"][0]["ports"][0].update(hostPort=80),
        "Host Ports: spec.containers[0].ports[0].hostPort",
    ),
    (
        "AppArmor Unconfined",
        lambda p: _main(p).update(appArmorProfile={"type": "Unconfined"}),
        "AppArmor: spec.containers[0].securityContext.appArmorProfile.type: Unconfined",
    ),
    (
        "SELinux type",
        lambda p: _main(p).update(seLinuxOptions={"type": "spc_t"}),
        "SELinux: spec.containers[0].securityContext.seLinuxOptions.type: spc_t",
    ),
    (
        "SELinux user",
        lambda p: p["securityContext"].update(seLinuxOptions={"user": "root"}),
        "SELinux: spec.securityContext.seLinuxOptions.user",
    ),
    (
        "procMount Unmasked",
        lambda p: _main(p).update(procMount="Unmasked"),
        "/proc Mount Type: spec.containers[0].securityContext.procMount",
    ),
    (
        "unsafe sysctl",
        lambda p: p["securityContext"]["sysctls"].append({"name": "kernel.msgmax", "value": "1"}),
        "Sysctls: spec.securityContext.sysctls[1].name: kernel.msgmax",
    ),
    (
        "seccomp Unconfined on a container",
        lambda p: _main(p).update(seccompProfile={"type": "Unconfined"}),
        "Seccomp: spec.containers[0].securityContext.seccompProfile.type: Unconfined",
    ),
    (
        "seccomp unset everywhere",
        lambda p: p["securityContext"].pop("seccompProfile"),
        "Seccomp: spec.containers[0].securityContext.seccompProfile.type: must be",
    ),
    (
        "allowPrivilegeEscalation unset",
        lambda p: _main(p).pop("allowPrivilegeEscalation"),
        "Privilege Escalation: spec.containers[0].securityContext.allowPrivilegeEscalation",
    ),
    (
        "allowPrivilegeEscalation true",
        lambda p: p["initContainers"][0]["securityContext"].update(allowPrivilegeEscalation=True),
        "Privilege Escalation: spec.initContainers[0].securityContext.allowPrivilegeEscalation",
    ),
    (
        "runAsNonRoot unset",
        lambda p: p["securityContext"].pop("runAsNonRoot"),
        "Running as Non-root: spec.containers[0].securityContext.runAsNonRoot",
    ),
    (
        "runAsNonRoot false on a container",
        lambda p: _main(p).update(runAsNonRoot=False),
        "Running as Non-root: spec.containers[0].securityContext.runAsNonRoot",
    ),
    (
        "runAsUser 0 on the pod",
        lambda p: p["securityContext"].update(runAsUser=0),
        "Running as Non-root user: spec.securityContext.runAsUser",
    ),
    (
        "runAsUser 0 on a container",
        lambda p: _main(p).update(runAsUser=0),
        "Running as Non-root user: spec.containers[0].securityContext.runAsUser",
    ),
    (
        "ephemeral container without a security context",
        lambda p: p.update(ephemeralContainers=[{"name": "debug", "image": "x"}]),
        "Privilege Escalation: spec.ephemeralContainers[0].securityContext",
    ),
]


def test_compliant_pod_passes():
    assert pss_restricted_problems(good_pod()) == []


def test_per_container_settings_stand_in_for_the_pods():
    """runAsNonRoot and seccomp may be set on every container instead of the pod."""
    pod = good_pod()
    pod["securityContext"] = {}
    for field in ("initContainers", "containers"):
        for container in pod[field]:
            container["securityContext"]["runAsNonRoot"] = True
            container["securityContext"]["seccompProfile"] = {"type": "Localhost"}
    assert pss_restricted_problems(pod) == []


@pytest.mark.parametrize(("case", "breaks", "expected"), CASES, ids=[c[0] for c in CASES])
def test_each_control_catches_its_violation(case, breaks, expected):
    pod = good_pod()
    breaks(pod)
    problems = pss_restricted_problems(pod)
    assert any(p.startswith(expected) for p in problems), problems


def test_apparmor_annotation():
    key = "container.apparmor.security.beta.kubernetes.io/main"
    assert pss_restricted_problems(good_pod(), {key: "localhost/my-profile"}) == []
    problems = pss_restricted_problems(good_pod(), {key: "unconfined"})
    assert problems == [f"AppArmor: metadata.annotations[{key}]: unconfined not allowed"]


def test_an_empty_pod_fails_every_required_field():
    problems = pss_restricted_problems({"containers": [{"name": "c", "image": "x"}]})
    controls = {p.split(":")[0] for p in problems}
    assert controls == {"Privilege Escalation", "Running as Non-root", "Seccomp", "Capabilities"}


def test_pod_templates_of_workloads():
    pod = good_pod()
    deployment = {"kind": "Deployment", "spec": {"template": {"spec": pod}}}
    cronjob = {"kind": "CronJob", "spec": {"jobTemplate": {"spec": {"template": {"spec": pod}}}}}
    assert [s for s, _ in pod_templates(deployment)] == [pod]
    assert [s for s, _ in pod_templates(cronjob)] == [pod]
    assert list(pod_templates({"kind": "ConfigMap"})) == []
