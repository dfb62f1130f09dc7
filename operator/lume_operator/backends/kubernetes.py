"""The `kubernetes` backend: flow runs are Jobs created by a Prefect kubernetes worker."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from lume_operator.api.runconfig import Volume
from lume_operator.backends.base import Backend, TypedRunConfig
from lume_operator.backends.templates import vendored_template

# What lume-operator adds to the kubernetes worker's variables; each is used in the Job below.
_EXTRA_VARIABLES: dict[str, Any] = {
    "image_pull_secrets": {
        "title": "Image Pull Secrets",
        "description": "Secrets with registry credentials, as [{name: ...}].",
        "type": "array",
        "items": {"type": "object", "properties": {"name": {"type": "string"}}},
        "default": [],
    },
    "volumes": {
        "title": "Volumes",
        "description": "Pod volumes (Kubernetes Volume objects).",
        "type": "array",
        "items": {"type": "object"},
        "default": [],
    },
    "volume_mounts": {
        "title": "Volume Mounts",
        "description": "Mounts of the flow-run container (Kubernetes VolumeMount objects).",
        "type": "array",
        "items": {"type": "object"},
        "default": [],
    },
    "env_from": {
        "title": "Environment From",
        "description": "Secrets whose keys become environment variables, as [{secretRef: {name: ...}}].",
        "type": "array",
        "items": {"type": "object"},
        "default": [],
    },
    "working_dir": {
        "title": "Working Directory",
        "description": "Working directory of the flow-run container. Default: the image's.",
        "anyOf": [{"type": "string"}, {"type": "null"}],
        "default": None,
    },
}

# Pod Security Standard "restricted". A uid is set because the stock Prefect images run as root
# (runAsNonRoot alone would refuse to start them); images with their own non-root USER may
# override it through a custom work pool template.
POD_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 1000,
    "fsGroup": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}


class KubernetesRunConfig(TypedRunConfig):
    """A flow run as a Kubernetes Job."""

    image: str | None = Field(default=None, description="Image of the flow-run container.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        default=None, description="When to pull the image."
    )
    image_pull_secrets: list[str] = Field(default_factory=list, description="Registry Secrets.")
    cpu_request: str | None = Field(default=None, description="CPU request.")
    cpu_limit: str | None = Field(default=None, description="CPU limit.")
    memory_request: str | None = Field(default=None, description="Memory request.")
    memory_limit: str | None = Field(default=None, description="Memory limit.")
    service_account_name: str | None = Field(default=None, description="Pod ServiceAccount.")
    namespace: str | None = Field(default=None, description="Namespace of the Jobs.")
    volumes: list[Volume] = Field(default_factory=list, description="Pod volumes.")
    finished_job_ttl: int | None = Field(default=None, description="Seconds to keep finished Jobs.")


def pod_volume(volume: Volume) -> dict[str, Any]:
    if volume.persistent_volume_claim:
        source = {"persistentVolumeClaim": {"claimName": volume.persistent_volume_claim.claim_name}}
    elif volume.host_path:
        source = {"hostPath": {"path": volume.host_path.path}}
    else:
        source = {"emptyDir": {}}
    return {"name": volume.name, **source}


def volume_mount(volume: Volume) -> dict[str, Any]:
    return {"name": volume.name, "mountPath": volume.mount_path, "readOnly": volume.read_only}


class KubernetesBackend(Backend):
    type = "kubernetes"
    run_config_model = KubernetesRunConfig

    def job_variables(self, config: TypedRunConfig) -> dict[str, Any]:
        assert isinstance(config, KubernetesRunConfig)
        variables: dict[str, Any] = {"stream_output": config.stream_output}
        plain = (
            "image",
            "image_pull_policy",
            "cpu_request",
            "cpu_limit",
            "memory_request",
            "memory_limit",
            "service_account_name",
            "namespace",
            "working_dir",
            "finished_job_ttl",
        )
        for name in plain:
            value = getattr(config, name)
            if value is not None:
                variables[name] = value
        # Writable places for a uid without a home directory; the run config's env wins.
        variables["env"] = {"HOME": "/tmp", "PREFECT_HOME": "/tmp/prefect", **config.env}
        if config.labels:
            variables["labels"] = dict(config.labels)
        if config.image_pull_secrets:
            variables["image_pull_secrets"] = [{"name": n} for n in config.image_pull_secrets]
        if config.volumes:
            variables["volumes"] = [pod_volume(v) for v in config.volumes]
            variables["volume_mounts"] = [volume_mount(v) for v in config.volumes]
        return variables

    def base_job_template(self) -> dict[str, Any]:
        template = vendored_template("kubernetes")
        template["variables"]["properties"].update(_EXTRA_VARIABLES)
        pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
        pod["securityContext"] = dict(POD_SECURITY_CONTEXT)
        pod["imagePullSecrets"] = "{{ image_pull_secrets }}"
        pod["volumes"] = "{{ volumes }}"
        container = pod["containers"][0]
        container["securityContext"] = dict(CONTAINER_SECURITY_CONTEXT)
        container["volumeMounts"] = "{{ volume_mounts }}"
        container["envFrom"] = "{{ env_from }}"
        container["workingDir"] = "{{ working_dir }}"
        return template
