"""The run config: how one flow run executes (image, env, resources, volumes, ...).

A `SchedulingBackend` sets defaults, a `LumeFlow` overrides them; each backend type then keeps
the fields that apply to it and renders them as Prefect job variables (see `backends`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from lume_operator.api.common import DNS_LABEL_PATTERN, Model, Quantity, require_unique


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

    @field_validator("volumes")
    @classmethod
    def _unique_volume_names(cls, items: list | None) -> list | None:
        require_unique("volume", [item.name for item in items or []])
        return items

    def merged_over(self, defaults: RunConfig) -> RunConfig:
        """These overrides on top of `defaults`: maps merge by key, volumes by name."""
        merged = defaults.model_dump(exclude_none=True)
        for name, value in self.model_dump(exclude_none=True).items():
            if name in ("env", "labels"):
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
