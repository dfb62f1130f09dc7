"""The `docker` backend: flow runs are containers started by a Prefect docker worker."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from lume_operator.api.backend import ResultStorage
from lume_operator.api.common import quantity_to_bytes, quantity_to_nano_cpus
from lume_operator.api.runconfig import Volume
from lume_operator.backends.base import Backend, TypedRunConfig
from lume_operator.backends.templates import vendored_template

# What Pod Security `restricted` asks of a pod, in Docker's terms: a uid that is not root (the
# stock Prefect images run as root; 1000 as in the kubernetes backend's Jobs), no capabilities
# and no privilege escalation.
CONTAINER_SECURITY: dict[str, Any] = {
    "user": "1000:1000",
    "cap_drop": ["ALL"],
    "security_opt": ["no-new-privileges"],
}
# The one writable place of a read-only container, private to it (as a pod's emptyDir).
PRIVATE_TMP = {"/tmp": "rw,nosuid,nodev,mode=1777"}


class DockerRunConfig(TypedRunConfig):
    """A flow run as a Docker container."""

    image: str | None = Field(default=None, description="Image of the container.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        default=None, description="When to pull the image."
    )
    cpu_limit: str | None = Field(default=None, description="CPU limit (Kubernetes quantity).")
    memory_limit: str | None = Field(
        default=None, description="Memory limit (Kubernetes quantity)."
    )
    volumes: list[Volume] = Field(
        default_factory=list, description="Bind mounts and named volumes."
    )
    network_mode: str | None = Field(default=None, description="Docker network mode.")
    read_only_root_filesystem: bool | None = Field(
        default=None, description="A read-only root filesystem with a private /tmp."
    )


def docker_volume(volume: Volume) -> str:
    """A volume in Docker's `source:target:mode` form (a claim name is a named volume)."""
    if volume.host_path:
        source = volume.host_path.path
    elif volume.persistent_volume_claim:
        source = volume.persistent_volume_claim.claim_name
    else:
        raise ValueError(f"volume {volume.name!r}: emptyDir has no Docker equivalent")
    return f"{source}:{volume.mount_path}:{'ro' if volume.read_only else 'rw'}"


class DockerBackend(Backend):
    type = "docker"
    run_config_model = DockerRunConfig

    def job_variables(self, config: TypedRunConfig) -> dict[str, Any]:
        assert isinstance(config, DockerRunConfig)
        variables: dict[str, Any] = {"stream_output": config.stream_output}
        if config.image:
            variables["image"] = config.image
        if config.image_pull_policy:
            variables["image_pull_policy"] = config.image_pull_policy
        # Writable places for a uid without a home directory; the run config's env wins.
        variables["env"] = {"HOME": "/tmp", "PREFECT_HOME": "/tmp/prefect", **config.env}
        if config.labels:
            variables["labels"] = dict(config.labels)
        if config.memory_limit:
            variables["mem_limit"] = str(quantity_to_bytes(config.memory_limit))
        if config.volumes:
            variables["volumes"] = [docker_volume(v) for v in config.volumes]
        if config.network_mode:
            variables["network_mode"] = config.network_mode
        create_kwargs: dict[str, Any] = dict(CONTAINER_SECURITY)
        if config.read_only_root_filesystem:
            create_kwargs["read_only"] = True
            create_kwargs["tmpfs"] = dict(PRIVATE_TMP)
        if config.cpu_limit:
            create_kwargs["nano_cpus"] = quantity_to_nano_cpus(config.cpu_limit)
        if config.working_dir:
            create_kwargs["working_dir"] = config.working_dir
        variables["container_create_kwargs"] = create_kwargs
        return variables

    def storage_variables(self, storage: ResultStorage) -> dict[str, Any]:
        """The claim name as a Docker named volume at the mount path. An object store needs
        nothing here: a container has only ambient credentials (a Secret cannot reach it, so
        the API refuses credentialsSecretRef on docker backends)."""
        if storage.volume:
            return {"volumes": [f"{storage.volume.claim_name}:{storage.volume.mount_path}:rw"]}
        return {}

    def base_job_template(self) -> dict[str, Any]:
        """The docker worker's template, its `container_create_kwargs` and `privileged` held by
        schema to what lume-operator renders: any Prefect user may set job variables on one
        run, and the server checks them against this schema, so none can run a container as
        root, with capabilities or privileged."""
        template = vendored_template("docker")
        properties = template["variables"]["properties"]
        properties["container_create_kwargs"] = {
            **properties["container_create_kwargs"],
            "anyOf": None,
            "type": "object",
            "properties": {
                **{key: {"const": value} for key, value in CONTAINER_SECURITY.items()},
                "read_only": {"type": "boolean"},
                "tmpfs": {"const": PRIVATE_TMP},
                "nano_cpus": {"type": "integer", "minimum": 1},
                "working_dir": {"type": "string"},
            },
            "required": sorted(CONTAINER_SECURITY),
            "additionalProperties": False,
            "default": dict(CONTAINER_SECURITY),
        }
        del properties["container_create_kwargs"]["anyOf"]
        properties["privileged"] = {**properties["privileged"], "const": False}
        return template
