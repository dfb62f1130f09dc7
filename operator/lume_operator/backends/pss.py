"""The Pod Security Standards' `restricted` profile (with all of `baseline`), checked field by field.

Why our own checker: a `jobTemplatePatch` is merged into a work pool's Job template long before
any Pod reaches admission, and a Job whose pods admission refuses never starts and says so only
in Events. The operator checks the merged template here and refuses the patch in status instead.
The tests' cluster (`tests/k8s/node.py`) uses the same checks as its Pod Security admission, and
the chart's tests on every pod template it renders.

This follows the list at kubernetes.io/docs/concepts/security/pod-security-standards (policy
version 1.33) control by control, so a failure names the control and the field path, the way
admission's own message does. Windows-only exemptions (`spec.os.name: windows`) are not
modelled: our pods are Linux pods.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

# Baseline "Capabilities": what may be added at all.
BASELINE_CAPABILITIES = frozenset(
    {
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    }
)
# Restricted "Capabilities": drop ALL, add back at most this one.
RESTRICTED_ADD_CAPABILITIES = frozenset({"NET_BIND_SERVICE"})
# Restricted "Volume Types": the only volume sources allowed.
RESTRICTED_VOLUME_TYPES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)
# Baseline "Sysctls": the safe set.
SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)
# Baseline "SELinux": allowed types (user and role must be unset).
SELINUX_TYPES = frozenset(
    {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
)
APPARMOR_TYPES = frozenset({"RuntimeDefault", "Localhost"})
APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"
SECCOMP_TYPES = frozenset({"RuntimeDefault", "Localhost"})
CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")


def _containers(pod_spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for field in CONTAINER_LISTS:
        for index, container in enumerate(pod_spec.get(field) or []):
            yield f"spec.{field}[{index}]", container


def pss_restricted_problems(
    pod_spec: dict[str, Any], annotations: dict[str, str] | None = None
) -> list[str]:
    """Every violation of PSS `restricted` in a pod spec, as 'control: field.path: why'.

    `pod_spec` is a PodSpec (a pod's or a template's `spec`); `annotations` are the pod's, for
    the deprecated AppArmor annotation. An empty list means the pod passes.
    """
    problems: list[str] = []

    def bad(control: str, path: str, why: str) -> None:
        problems.append(f"{control}: {path}: {why}")

    pod_sc: dict[str, Any] = pod_spec.get("securityContext") or {}
    containers = list(_containers(pod_spec))

    # --- baseline ---
    # HostProcess
    if (pod_sc.get("windowsOptions") or {}).get("hostProcess"):
        bad("HostProcess", "spec.securityContext.windowsOptions.hostProcess", "must be unset/false")
    for path, c in containers:
        if ((c.get("securityContext") or {}).get("windowsOptions") or {}).get("hostProcess"):
            bad(
                "HostProcess",
                f"{path}.securityContext.windowsOptions.hostProcess",
                "must be unset/false",
            )
    # Host Namespaces
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(field):
            bad("Host Namespaces", f"spec.{field}", "must be unset/false")
    # Privileged Containers
    for path, c in containers:
        if (c.get("securityContext") or {}).get("privileged"):
            bad("Privileged Containers", f"{path}.securityContext.privileged", "must be false")
    # Capabilities (baseline): only the default set may be added
    for path, c in containers:
        added = ((c.get("securityContext") or {}).get("capabilities") or {}).get("add") or []
        for cap in added:
            if cap not in BASELINE_CAPABILITIES:
                bad(
                    "Capabilities", f"{path}.securityContext.capabilities.add", f"{cap} not allowed"
                )
    # HostPath Volumes
    for index, volume in enumerate(pod_spec.get("volumes") or []):
        if "hostPath" in volume:
            bad("HostPath Volumes", f"spec.volumes[{index}].hostPath", "not allowed")
    # Host Ports
    for path, c in containers:
        for index, port in enumerate(c.get("ports") or []):
            if port.get("hostPort"):
                bad("Host Ports", f"{path}.ports[{index}].hostPort", "must be unset or 0")
    # AppArmor
    for path, sc in [("spec.securityContext", pod_sc)] + [
        (f"{p}.securityContext", c.get("securityContext") or {}) for p, c in containers
    ]:
        profile = (sc.get("appArmorProfile") or {}).get("type")
        if profile is not None and profile not in APPARMOR_TYPES:
            bad("AppArmor", f"{path}.appArmorProfile.type", f"{profile} not allowed")
    for key, value in (annotations or {}).items():
        if key.startswith(APPARMOR_ANNOTATION) and not (
            value == "runtime/default" or value.startswith("localhost/")
        ):
            bad("AppArmor", f"metadata.annotations[{key}]", f"{value} not allowed")
    # SELinux
    for path, sc in [("spec.securityContext", pod_sc)] + [
        (f"{p}.securityContext", c.get("securityContext") or {}) for p, c in containers
    ]:
        options = sc.get("seLinuxOptions") or {}
        if options.get("type", "") not in SELINUX_TYPES:
            bad("SELinux", f"{path}.seLinuxOptions.type", f"{options['type']} not allowed")
        for field in ("user", "role"):
            if options.get(field):
                bad("SELinux", f"{path}.seLinuxOptions.{field}", "must be unset")
    # /proc Mount Type
    for path, c in containers:
        proc_mount = (c.get("securityContext") or {}).get("procMount")
        if proc_mount not in (None, "Default"):
            bad("/proc Mount Type", f"{path}.securityContext.procMount", "must be Default")
    # Sysctls
    for index, sysctl in enumerate(pod_sc.get("sysctls") or []):
        if sysctl.get("name") not in SAFE_SYSCTLS:
            bad(
                "Sysctls",
                f"spec.securityContext.sysctls[{index}].name",
                f"{sysctl.get('name')} not allowed",
            )

    # --- restricted ---
    # Volume Types
    for index, volume in enumerate(pod_spec.get("volumes") or []):
        sources = [k for k in volume if k != "name"]
        for source in sources:
            if source not in RESTRICTED_VOLUME_TYPES:
                bad("Volume Types", f"spec.volumes[{index}].{source}", "not allowed")
    # Privilege Escalation: explicitly false on every container
    for path, c in containers:
        if (c.get("securityContext") or {}).get("allowPrivilegeEscalation") is not False:
            bad(
                "Privilege Escalation",
                f"{path}.securityContext.allowPrivilegeEscalation",
                "must be false",
            )
    # Running as Non-root: true on the pod (no container false), or true on every container
    pod_non_root = pod_sc.get("runAsNonRoot")
    for path, c in containers:
        own = (c.get("securityContext") or {}).get("runAsNonRoot")
        if own is False or (own is None and pod_non_root is not True):
            bad("Running as Non-root", f"{path}.securityContext.runAsNonRoot", "must be true")
    if pod_non_root is False:
        bad("Running as Non-root", "spec.securityContext.runAsNonRoot", "must be true")
    # Running as Non-root user: no uid 0 anywhere
    if pod_sc.get("runAsUser") == 0:
        bad("Running as Non-root user", "spec.securityContext.runAsUser", "must not be 0")
    for path, c in containers:
        if (c.get("securityContext") or {}).get("runAsUser") == 0:
            bad("Running as Non-root user", f"{path}.securityContext.runAsUser", "must not be 0")
    # Seccomp: RuntimeDefault or Localhost on the pod, or on every container; never Unconfined
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    if pod_seccomp is not None and pod_seccomp not in SECCOMP_TYPES:
        bad("Seccomp", "spec.securityContext.seccompProfile.type", f"{pod_seccomp} not allowed")
    for path, c in containers:
        own = ((c.get("securityContext") or {}).get("seccompProfile") or {}).get("type")
        if own is not None and own not in SECCOMP_TYPES:
            bad("Seccomp", f"{path}.securityContext.seccompProfile.type", f"{own} not allowed")
        elif own is None and pod_seccomp not in SECCOMP_TYPES:
            bad(
                "Seccomp",
                f"{path}.securityContext.seccompProfile.type",
                "must be RuntimeDefault or Localhost (here or on the pod)",
            )
    # Capabilities (restricted): drop ALL, add nothing but NET_BIND_SERVICE
    for path, c in containers:
        caps = (c.get("securityContext") or {}).get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            bad("Capabilities", f"{path}.securityContext.capabilities.drop", "must include ALL")
        for cap in caps.get("add") or []:
            if cap in BASELINE_CAPABILITIES and cap not in RESTRICTED_ADD_CAPABILITIES:
                bad(
                    "Capabilities",
                    f"{path}.securityContext.capabilities.add",
                    f"{cap} not allowed (only NET_BIND_SERVICE)",
                )
    return problems


def pod_templates(obj: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(pod spec, pod metadata) of a Pod or of any workload object's pod template."""
    kind = obj.get("kind")
    spec = obj.get("spec") or {}
    if kind == "Pod":
        yield spec, obj.get("metadata") or {}
    elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        template = spec.get("template") or {}
        yield template.get("spec") or {}, template.get("metadata") or {}
    elif kind == "CronJob":
        template = ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}
        yield template.get("spec") or {}, template.get("metadata") or {}
