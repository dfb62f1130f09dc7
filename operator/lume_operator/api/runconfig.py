"""The run config: how one flow run executes (image, env, resources, volumes, ...).

A `SchedulingBackend` sets defaults, a `LumeFlow` overrides them; each backend type then keeps
the fields that apply to it and renders them as Prefect job variables (see `backends`).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from lume_operator.api.common import (
    DNS_LABEL_PATTERN,
    DNS_SUBDOMAIN_PATTERN,
    Model,
    Quantity,
    require_unique,
)

# An environment variable's name, as Kubernetes accepts it (C identifiers, dots and dashes).
ENV_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
# An extended resource: a domain-prefixed name (`nvidia.com/gpu`) outside kubernetes.io.
EXTENDED_RESOURCE_PATTERN = (
    r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)


class PersistentVolumeClaimSource(Model):
    """A PersistentVolumeClaim to mount."""

    claim_name: str = Field(
        description="Name of the PersistentVolumeClaim (in Docker: the named volume)."
    )


class HostPathSource(Model):
    """A directory of the node (in Docker: of the host)."""

    path: str = Field(description="Absolute path on the node or host.")


class Volume(Model):
    """A volume mounted into the flow run's container; exactly one source."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "[has(self.persistentVolumeClaim), has(self.hostPath), "
                    "has(self.emptyDir)].filter(x, x).size() == 1",
                    "message": "a volume needs exactly one source of persistentVolumeClaim, "
                    "hostPath or emptyDir",
                }
            ]
        }
    )

    name: str = Field(
        description="Name of the volume, unique in the list.", pattern=DNS_LABEL_PATTERN
    )
    mount_path: str = Field(description="Where the volume is mounted in the container.")
    read_only: bool = Field(default=False, description="Mount the volume read-only.")
    persistent_volume_claim: PersistentVolumeClaimSource | None = Field(
        default=None, description="Mount a PersistentVolumeClaim (Docker: a named volume)."
    )
    host_path: HostPathSource | None = Field(
        default=None, description="Mount a directory of the node or host."
    )
    empty_dir: bool | None = Field(
        default=None, description="Mount a fresh empty directory (Kubernetes only)."
    )

    @model_validator(mode="after")
    def _one_source(self) -> Volume:
        given = {
            "persistentVolumeClaim": self.persistent_volume_claim,
            "hostPath": self.host_path,
            "emptyDir": self.empty_dir,
        }
        sources = [alias for alias, value in given.items() if value]
        if len(sources) != 1:
            raise ValueError(
                "a volume needs exactly one source of persistentVolumeClaim, hostPath or "
                f"emptyDir (got {', '.join(sources) or 'none'})"
            )
        return self


class NameRef(Model):
    """A Secret or ConfigMap of the flow run's namespace, by name."""

    name: str = Field(description="Name of the object.", pattern=DNS_SUBDOMAIN_PATTERN)


class EnvFromSource(Model):
    """Every key of one Secret or ConfigMap as environment variables; exactly one source."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.secretRef) != has(self.configMapRef)",
                    "message": "envFrom needs exactly one of secretRef or configMapRef",
                }
            ]
        }
    )

    secret_ref: NameRef | None = Field(default=None, description="A Secret, by name.")
    config_map_ref: NameRef | None = Field(default=None, description="A ConfigMap, by name.")
    prefix: str | None = Field(
        default=None, description="Prefix of every variable's name.", pattern=ENV_NAME_PATTERN
    )

    @model_validator(mode="after")
    def _one_source(self) -> EnvFromSource:
        if (self.secret_ref is None) == (self.config_map_ref is None):
            raise ValueError("envFrom needs exactly one of secretRef or configMapRef")
        return self


class KeyRef(Model):
    """One key of a Secret or ConfigMap of the flow run's namespace."""

    name: str = Field(description="Name of the object.", pattern=DNS_SUBDOMAIN_PATTERN)
    key: str = Field(description="Key in its data.", pattern=r"^[-._a-zA-Z0-9]+$")
    optional: bool | None = Field(
        default=None, description="Start the run even when the object or key is missing."
    )


class EnvVarSource(Model):
    """Where one environment variable's value comes from; exactly one source."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.secretKeyRef) != has(self.configMapKeyRef)",
                    "message": "needs exactly one of secretKeyRef or configMapKeyRef",
                }
            ]
        }
    )

    secret_key_ref: KeyRef | None = Field(default=None, description="A key of a Secret.")
    config_map_key_ref: KeyRef | None = Field(default=None, description="A key of a ConfigMap.")

    @model_validator(mode="after")
    def _one_source(self) -> EnvVarSource:
        if (self.secret_key_ref is None) == (self.config_map_key_ref is None):
            raise ValueError("needs exactly one of secretKeyRef or configMapKeyRef")
        return self


class Toleration(Model):
    """A taint the flow-run pod tolerates (Kubernetes' Toleration)."""

    key: str | None = Field(default=None, description="Taint key; empty with Exists: every taint.")
    operator: Literal["Exists", "Equal"] | None = Field(
        default=None, description="Exists or Equal (default Equal)."
    )
    value: str | None = Field(default=None, description="Taint value, for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty: every effect."
    )
    toleration_seconds: int | None = Field(
        default=None, description="How long a NoExecute taint is tolerated."
    )


class Affinity(Model):
    """Scheduling constraints of the flow-run pod, as Kubernetes' Affinity (checked by the API
    server when the Job is created)."""

    node_affinity: dict[str, Any] | None = Field(default=None, description="A NodeAffinity.")
    pod_affinity: dict[str, Any] | None = Field(default=None, description="A PodAffinity.")
    pod_anti_affinity: dict[str, Any] | None = Field(default=None, description="A PodAntiAffinity.")


# Which run-config fields each backend type understands (camelCase, as users write them).
APPLICABLE_FIELDS: dict[str, frozenset[str]] = {
    "process": frozenset({"env", "workingDir", "labels", "streamOutput"}),
    "docker": frozenset(
        {
            "image",
            "imagePullPolicy",
            "env",
            "cpuLimit",
            "memoryLimit",
            "workingDir",
            "volumes",
            "labels",
            "streamOutput",
            "networkMode",
            "readOnlyRootFilesystem",
        }
    ),
    "kubernetes": frozenset(
        {
            "image",
            "imagePullPolicy",
            "imagePullSecrets",
            "env",
            "cpuRequest",
            "cpuLimit",
            "memoryRequest",
            "memoryLimit",
            "serviceAccountName",
            "namespace",
            "workingDir",
            "volumes",
            "labels",
            "streamOutput",
            "finishedJobTtl",
            "envFrom",
            "envValueFrom",
            "nodeSelector",
            "tolerations",
            "affinity",
            "extendedResources",
        }
    ),
}

PullPolicy = Literal["Always", "IfNotPresent", "Never"]


class RunConfig(Model):
    """Every run-config field any backend understands; each backend keeps those that apply."""

    image: str | None = Field(default=None, description="Container image with the flow's code.")
    image_pull_policy: PullPolicy | None = Field(
        default=None, description="When to pull the image: Always, IfNotPresent or Never."
    )
    image_pull_secrets: list[str] | None = Field(
        default=None, description="Names of Secrets with registry credentials (Kubernetes)."
    )
    env: dict[str, str] | None = Field(
        default=None, description="Environment variables of the flow run; merged key by key."
    )
    cpu_request: Quantity | None = Field(default=None, description="CPU request, e.g. '500m'.")
    cpu_limit: Quantity | None = Field(default=None, description="CPU limit, e.g. '2'.")
    memory_request: Quantity | None = Field(default=None, description="Memory request, e.g. '1Gi'.")
    memory_limit: Quantity | None = Field(default=None, description="Memory limit, e.g. '2Gi'.")
    service_account_name: str | None = Field(
        default=None,
        description="ServiceAccount the flow-run pod runs as (Kubernetes).",
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
    )
    namespace: str | None = Field(
        default=None,
        description="Namespace of the flow-run Jobs (Kubernetes); default: the backend's.",
        pattern=DNS_LABEL_PATTERN,
    )
    working_dir: str | None = Field(
        default=None, description="Working directory of the flow run's process or container."
    )
    volumes: list[Volume] | None = Field(
        default=None, description="Volumes to mount; merged by name."
    )
    labels: dict[str, str] | None = Field(
        default=None,
        description="Labels put on the infrastructure of a run (Job, container); merged key by key.",
    )
    stream_output: bool | None = Field(
        default=None, description="Stream the run's output to the worker's log."
    )
    finished_job_ttl: int | None = Field(
        default=None, ge=0, description="Seconds a finished Job is kept (Kubernetes)."
    )
    env_from: list[EnvFromSource] | None = Field(
        default=None,
        description="Secrets and ConfigMaps whose every key becomes an environment variable "
        "(Kubernetes); by reference, never copied.",
    )
    env_value_from: dict[str, EnvVarSource] | None = Field(
        default=None,
        description="Environment variables whose value is a key of a Secret or ConfigMap "
        "(Kubernetes), by name, e.g. {DB_PASSWORD: {secretKeyRef: {name: db, key: password}}}; "
        "merged key by key.",
    )
    node_selector: dict[str, str] | None = Field(
        default=None, description="Node labels the flow-run pod must land on (Kubernetes)."
    )
    tolerations: list[Toleration] | None = Field(
        default=None, description="Taints the flow-run pod tolerates (Kubernetes)."
    )
    affinity: Affinity | None = Field(
        default=None, description="Node and pod affinity of the flow-run pod (Kubernetes)."
    )
    extended_resources: dict[str, Quantity] | None = Field(
        default=None,
        description="Extended resources as limits (and requests, which Kubernetes requires to "
        "be equal), e.g. {nvidia.com/gpu: '1'} (Kubernetes).",
    )
    network_mode: str | None = Field(
        default=None,
        description="Network of the run's container (Docker): host, bridge, none, a network's "
        "name, or container:<name>. Unset: the worker's choice (host when Prefect's API is on "
        "localhost).",
        pattern=r"^(container:)?[a-zA-Z0-9][a-zA-Z0-9_.-]*$",
    )
    read_only_root_filesystem: bool | None = Field(
        default=None,
        description="Run the container with a read-only root filesystem and a private "
        "writable /tmp (Docker).",
    )

    @field_validator("volumes")
    @classmethod
    def _unique_volume_names(cls, items: list | None) -> list | None:
        require_unique("volume", [item.name for item in items or []])
        return items

    @field_validator("env_value_from")
    @classmethod
    def _env_names(cls, items: dict | None) -> dict | None:
        for name in items or {}:
            if not re.match(ENV_NAME_PATTERN, name):
                raise ValueError(f"{name!r} is not an environment variable name")
        return items

    @field_validator("extended_resources")
    @classmethod
    def _extended_names(cls, items: dict | None) -> dict | None:
        for name in items or {}:
            if not re.match(EXTENDED_RESOURCE_PATTERN, name) or name.startswith(
                ("kubernetes.io/", "requests.")
            ):
                raise ValueError(
                    f"{name!r} is not an extended resource (a domain-prefixed name such as "
                    "nvidia.com/gpu; cpu and memory have their own fields)"
                )
        return items

    def merged_over(self, defaults: RunConfig) -> RunConfig:
        """These overrides on top of `defaults`: maps merge by key, volumes by name."""
        merged = defaults.model_dump(exclude_none=True)
        for name, value in self.model_dump(exclude_none=True).items():
            if name in ("env", "labels", "env_value_from", "node_selector", "extended_resources"):
                merged[name] = {**merged.get(name, {}), **value}
            elif name == "volumes":
                by_name = {v["name"]: v for v in merged.get("volumes", [])}
                by_name.update({v["name"]: v for v in value})
                merged[name] = list(by_name.values())
            else:
                merged[name] = value
        return RunConfig.model_validate(merged)

    def set_fields(self) -> list[str]:
        """camelCase names of the fields this config sets, as users wrote them."""
        return [
            type(self).model_fields[name].alias or name
            for name in type(self).model_fields
            if getattr(self, name) is not None
        ]
