"""The `kubernetes` backend: flow runs are Jobs created by a Prefect kubernetes worker."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any, Literal

from prefect.utilities.templating import apply_values
from pydantic import Field

from lume_operator.api.backend import ResultStorage
from lume_operator.api.runconfig import (
    Affinity,
    EnvFromSource,
    EnvVarSource,
    Toleration,
    Volume,
)
from lume_operator.backends.base import STORAGE_VOLUME, Backend, TypedRunConfig
from lume_operator.backends.patch import strategic_merge
from lume_operator.backends.pss import pss_restricted_problems
from lume_operator.backends.templates import vendored_template

_NAME = {"type": "string", "minLength": 1}
_NAME_REF = {
    "type": "object",
    "properties": {"name": _NAME},
    "required": ["name"],
    "additionalProperties": False,
}
_KEY_REF = {
    "type": "object",
    "properties": {"name": _NAME, "key": _NAME, "optional": {"type": "boolean"}},
    "required": ["name", "key"],
    "additionalProperties": False,
}
_QUANTITIES = {"type": "object", "additionalProperties": {"type": "string"}}


def _one_of(*shapes: dict[str, Any], common: dict[str, Any]) -> dict[str, Any]:
    """Objects of exactly one of the shapes (each `{field: schema}`), with the common fields."""
    return {
        "oneOf": [
            {
                "type": "object",
                "properties": {**common, **shape},
                "required": [*[k for k in common if k == "name"], *shape],
                "additionalProperties": False,
            }
            for shape in shapes
        ]
    }


# What lume-operator adds to the kubernetes worker's variables; each is used in the Job below.
# Any Prefect user may set job variables per run, so each is held by its schema to the shapes
# lume-operator itself produces: no hostPath or other node-level volume, no mount propagation,
# Secrets and ConfigMaps only by reference. (The worker's own variables are its own schemas.)
_EXTRA_VARIABLES: dict[str, Any] = {
    "image_pull_secrets": {
        "title": "Image Pull Secrets",
        "description": "Secrets with registry credentials, as [{name: ...}].",
        "type": "array",
        "items": _NAME_REF,
        "default": [],
    },
    "volumes": {
        "title": "Volumes",
        "description": "Pod volumes: persistentVolumeClaim, emptyDir, configMap or secret only.",
        "type": "array",
        "items": _one_of(
            {
                "persistentVolumeClaim": {
                    "type": "object",
                    "properties": {"claimName": _NAME, "readOnly": {"type": "boolean"}},
                    "required": ["claimName"],
                    "additionalProperties": False,
                }
            },
            {
                "emptyDir": {
                    "type": "object",
                    "properties": {
                        "medium": {"enum": ["", "Memory"]},
                        "sizeLimit": {"type": "string"},
                    },
                    "additionalProperties": False,
                }
            },
            {
                "configMap": {
                    "type": "object",
                    "properties": {"name": _NAME, "optional": {"type": "boolean"}},
                    "required": ["name"],
                    "additionalProperties": False,
                }
            },
            {
                "secret": {
                    "type": "object",
                    "properties": {"secretName": _NAME, "optional": {"type": "boolean"}},
                    "required": ["secretName"],
                    "additionalProperties": False,
                }
            },
            common={"name": _NAME},
        ),
        "default": [],
    },
    "volume_mounts": {
        "title": "Volume Mounts",
        "description": "Mounts of the flow-run container, as [{name, mountPath, readOnly}].",
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "name": _NAME,
                "mountPath": _NAME,
                "readOnly": {"type": "boolean"},
                "subPath": {"type": "string"},
            },
            "required": ["name", "mountPath"],
            "additionalProperties": False,
        },
        "default": [],
    },
    "env_from": {
        "title": "Environment From",
        "description": "Secrets or ConfigMaps whose keys become environment variables, as "
        "[{secretRef: {name}}] or [{configMapRef: {name}}].",
        "type": "array",
        "items": _one_of(
            {"secretRef": _NAME_REF},
            {"configMapRef": _NAME_REF},
            common={"prefix": {"type": "string"}},
        ),
        "default": [],
    },
    "env_refs": {
        "title": "Environment From Keys",
        "description": "Environment variables whose value is a key of a Secret or ConfigMap, "
        "as [{name, valueFrom: {secretKeyRef: {name, key}}}].",
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "name": _NAME,
                "valueFrom": _one_of(
                    {"secretKeyRef": _KEY_REF}, {"configMapKeyRef": _KEY_REF}, common={}
                ),
            },
            "required": ["name", "valueFrom"],
            "additionalProperties": False,
        },
        "default": [],
    },
    "working_dir": {
        "title": "Working Directory",
        "description": "Working directory of the flow-run container. Default: the image's.",
        "anyOf": [{"type": "string"}, {"type": "null"}],
        "default": None,
    },
    "resources": {
        "title": "Resources",
        "description": "Requests and limits of the flow-run container (cpu, memory, extended "
        "resources such as nvidia.com/gpu). Takes the place of cpu_request, cpu_limit, "
        "memory_request and memory_limit, which lume-operator folds into it.",
        "type": "object",
        "properties": {"requests": _QUANTITIES, "limits": _QUANTITIES},
        "additionalProperties": False,
        "default": {"requests": {"cpu": "100m", "memory": "256Mi"}},
    },
    "node_selector": {
        "title": "Node Selector",
        "description": "Node labels the flow-run pod must land on.",
        "type": "object",
        "additionalProperties": {"type": "string"},
        "default": {},
    },
    "tolerations": {
        "title": "Tolerations",
        "description": "Taints the flow-run pod tolerates (Kubernetes Tolerations).",
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "key": {"type": "string"},
                "operator": {"enum": ["Exists", "Equal"]},
                "value": {"type": "string"},
                "effect": {"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
                "tolerationSeconds": {"type": "integer"},
            },
            "additionalProperties": False,
        },
        "default": [],
    },
    "affinity": {
        "title": "Affinity",
        "description": "Node and pod affinity of the flow-run pod (a Kubernetes Affinity).",
        "type": "object",
        "properties": {
            "nodeAffinity": {"type": "object"},
            "podAffinity": {"type": "object"},
            "podAntiAffinity": {"type": "object"},
        },
        "additionalProperties": False,
        "default": {},
    },
}
# Requests every flow-run container gets unless its run config sets them: the scheduler places
# pods by requests, and a pod without any is the first to go under node pressure.
DEFAULT_REQUESTS = {"cpu": "100m", "memory": "256Mi"}

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
    # Nothing but /tmp (an emptyDir, private to the run) and declared volumes is writable.
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}


TMP_VOLUME: dict[str, Any] = {"name": "tmp", "emptyDir": {}}
TMP_MOUNT: dict[str, Any] = {"name": "tmp", "mountPath": "/tmp"}


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
    env_from: list[EnvFromSource] = Field(default_factory=list, description="envFrom sources.")
    env_value_from: dict[str, EnvVarSource] = Field(
        default_factory=dict, description="Variables from Secret or ConfigMap keys."
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node selector.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Tolerations.")
    affinity: Affinity | None = Field(default=None, description="Affinity.")
    extended_resources: dict[str, str] = Field(
        default_factory=dict, description="Extended resources (limits and requests)."
    )


def pod_volume(volume: Volume) -> dict[str, Any]:
    if volume.host_path:
        # Pod Security `restricted` refuses hostPath: the Job would never start.
        raise ValueError(
            f"runConfig.volumes[{volume.name}].hostPath: not allowed for kubernetes backends (Pod "
            "Security Standard restricted forbids hostPath volumes): use a persistentVolumeClaim"
        )
    if volume.persistent_volume_claim:
        source = {"persistentVolumeClaim": {"claimName": volume.persistent_volume_claim.claim_name}}
    else:
        source = {"emptyDir": {}}
    return {"name": volume.name, **source}


def resources(config: KubernetesRunConfig) -> dict[str, Any]:
    """Requests (default 100m / 256Mi) and limits; an extended resource is both, as Kubernetes
    requires requests of extended resources to equal their limits."""
    requests = dict(DEFAULT_REQUESTS)
    limits: dict[str, str] = {}
    for target, key, value in (
        (requests, "cpu", config.cpu_request),
        (requests, "memory", config.memory_request),
        (limits, "cpu", config.cpu_limit),
        (limits, "memory", config.memory_limit),
    ):
        if value is not None:
            target[key] = value
    for name, value in sorted(config.extended_resources.items()):
        requests[name] = limits[name] = value
    return {"requests": requests, "limits": limits} if limits else {"requests": requests}


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
        # The root filesystem is read-only: HOME, PREFECT_HOME and scratch live in /tmp.
        variables["volumes"] = [TMP_VOLUME, *(pod_volume(v) for v in config.volumes)]
        variables["volume_mounts"] = [TMP_MOUNT, *(volume_mount(v) for v in config.volumes)]
        variables["resources"] = resources(config)
        if config.env_from:
            variables["env_from"] = [item.to_wire() for item in config.env_from]
        if config.env_value_from:
            variables["env_refs"] = [
                {"name": name, "valueFrom": source.to_wire()}
                for name, source in sorted(config.env_value_from.items())
            ]
        if config.node_selector:
            variables["node_selector"] = dict(config.node_selector)
        if config.tolerations:
            variables["tolerations"] = [item.to_wire() for item in config.tolerations]
        if config.affinity:
            variables["affinity"] = config.affinity.to_wire()
        return variables

    def storage_variables(self, storage: ResultStorage) -> dict[str, Any]:
        """The claim as a pod volume mounted at its path; an object store's keys only as
        secretKeyRef (never a value in job variables, which every Prefect user can read)."""
        if storage.volume:
            return {
                "volumes": [
                    {
                        "name": STORAGE_VOLUME,
                        "persistentVolumeClaim": {"claimName": storage.volume.claim_name},
                    }
                ],
                "volume_mounts": [{"name": STORAGE_VOLUME, "mountPath": storage.volume.mount_path}],
            }
        ref = storage.object_store.credentials_secret_ref if storage.object_store else None
        if ref is None:
            return {}  # the pod's ambient credentials (IRSA, instance profile)
        return {
            "env_refs": [
                {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": key}}}
                for name, key in (
                    ("AWS_ACCESS_KEY_ID", ref.access_key_id_key),
                    ("AWS_SECRET_ACCESS_KEY", ref.secret_access_key_key),
                )
            ]
        }

    def base_job_template(self) -> dict[str, Any]:
        template = vendored_template("kubernetes")
        template["variables"]["properties"].update(_EXTRA_VARIABLES)
        pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
        pod["securityContext"] = dict(POD_SECURITY_CONTEXT)
        # The flow's code never calls the Kubernetes API: no token in its pod.
        pod["automountServiceAccountToken"] = False
        pod["imagePullSecrets"] = "{{ image_pull_secrets }}"
        pod["volumes"] = "{{ volumes }}"
        pod["nodeSelector"] = "{{ node_selector }}"
        pod["tolerations"] = "{{ tolerations }}"
        pod["affinity"] = "{{ affinity }}"
        container = pod["containers"][0]
        container["securityContext"] = dict(CONTAINER_SECURITY_CONTEXT)
        container["resources"] = "{{ resources }}"
        # Variables from Secret and ConfigMap keys; the worker puts the run's own env first.
        container["env"] = "{{ env_refs }}"
        container["volumeMounts"] = "{{ volume_mounts }}"
        container["envFrom"] = "{{ env_from }}"
        container["workingDir"] = "{{ working_dir }}"
        return template


PATCH_FIELD = "spec.jobTemplatePatch"


def patch_job_template(template: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """The pool's base job template with a backend's `jobTemplatePatch` merged into its Job.

    Refused (ValueError naming the field) when the patch templates anything itself, stops the
    manifest being a Job, or would make its pods fail Pod Security `restricted`: admission
    would refuse each pod, and the run would wait for a pod that never comes.
    """
    for path, value in _strings(patch, PATCH_FIELD):
        if "{{" in value:
            raise ValueError(
                f"{path}: Prefect placeholders ({{{{ ... }}}}) are not allowed in a patch; "
                "per-run values belong in runConfig"
            )
    job_configuration = template["job_configuration"]
    try:
        manifest = strategic_merge(job_configuration["job_manifest"], patch)
    except ValueError as error:
        raise ValueError(f"{PATCH_FIELD}: {error}") from None
    if (manifest.get("apiVersion"), manifest.get("kind")) != ("batch/v1", "Job"):
        raise ValueError(f"{PATCH_FIELD}: the manifest must stay a batch/v1 Job")
    defaults = {
        name: schema.get("default") for name, schema in template["variables"]["properties"].items()
    }
    rendered = apply_values(manifest, defaults)
    pod = (rendered.get("spec") or {}).get("template") or {}
    problems = pss_restricted_problems(
        pod.get("spec") or {}, (pod.get("metadata") or {}).get("annotations")
    )
    if problems:
        raise ValueError(
            f"{PATCH_FIELD}: the Job's pods would fail Pod Security restricted: "
            + "; ".join(problems)
        )
    patched = copy.deepcopy(template)
    patched["job_configuration"]["job_manifest"] = manifest
    return patched


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, f"{path}[{index}]")
