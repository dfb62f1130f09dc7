"""`SchedulingBackend`: where and how flows run (a Prefect work pool, its workers, run defaults)."""

from __future__ import annotations

import hashlib
import posixpath
import re
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from lume_operator.api.common import (
    DNS_SUBDOMAIN_PATTERN,
    AuthStringSecretRef,
    Condition,
    Label,
    Model,
    Quantity,
    Resource,
    SecretKeyRef,
)
from lume_operator.api.runconfig import PullPolicy, RunConfig

BackendType = Literal["kubernetes", "docker", "process"]


class PrefectAPI(Model):
    """The Prefect API that this backend's work pool lives in."""

    api_url: str | None = Field(
        default=None,
        description="Prefect API URL, e.g. http://prefect-server:4200/api. Default: the operator's. "
        "No user or password in it: the key goes in apiKeySecretRef.",
        pattern=r"^https?://[^/@]+(/.*)?$",
    )
    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret holding the Prefect API key; never given inline."
    )
    auth_string_secret_ref: AuthStringSecretRef | None = Field(
        default=None,
        description="Secret holding the basic-auth string (user:password) of a Prefect server "
        "run with PREFECT_SERVER_API_AUTH_STRING, such as the chart's bundled one (its Secret, "
        "copied into this namespace). Given to the workers, and by them to flow-run Jobs, only "
        "as a reference.",
    )

    @field_validator("api_url", mode="before")
    @classmethod
    def _no_credentials(cls, value: object) -> object:
        # Before the pattern: its generic message would not say why, and the value (with its
        # password) is never repeated back.
        if isinstance(value, str) and "@" in value.partition("://")[2].partition("/")[0]:
            raise ValueError(
                "must not carry a user or password (user:password@...): put the API key in a "
                "Secret and name it in apiKeySecretRef"
            )
        return value


class WorkPool(Model):
    """The Prefect work pool the backend creates, or adopts when it already exists."""

    name: str | None = Field(
        default=None, description="Work pool name. Default: <namespace>-<backend name>."
    )
    adopt: bool = Field(
        default=False,
        description="Use an existing pool as it is: never change or delete it.",
    )
    concurrency_limit: int | None = Field(
        default=None, ge=0, description="Most flow runs of this pool running at once."
    )


class Resources(Model):
    """CPU and memory of a container."""

    cpu_request: Quantity | None = Field(default=None, description="CPU request, e.g. '100m'.")
    cpu_limit: Quantity | None = Field(default=None, description="CPU limit, e.g. '1'.")
    memory_request: Quantity | None = Field(
        default=None, description="Memory request, e.g. '256Mi'."
    )
    memory_limit: Quantity | None = Field(default=None, description="Memory limit, e.g. '1Gi'.")


class Agent(Model):
    """The Prefect workers that the operator runs in the cluster for this backend."""

    replicas: int = Field(default=1, ge=0, le=20, description="How many workers to run.")
    image: str | None = Field(
        default=None,
        description="Worker image; must contain Prefect and the worker for the backend type.",
    )
    image_pull_policy: PullPolicy | None = Field(
        default=None, description="When to pull the worker image."
    )
    resources: Resources | None = Field(default=None, description="Worker container resources.")
    service_account_name: str | None = Field(
        default=None,
        description="ServiceAccount of the workers. Default: one the operator creates.",
    )
    env: dict[str, str] | None = Field(
        default=None, description="Extra environment of the workers."
    )
    warm_starts: bool | None = Field(
        default=None,
        description="process backends: start each flow run forked from a warm fork server "
        "(`lume-operator worker`; the image must contain lume-operator, the operator's own image "
        "by default) instead of a new interpreter. Default true; false runs Prefect's "
        "`prefect worker start --type process`.",
    )


class ResultStoreConfig(Model):
    """Where DB results go: the store's URL, with its credentials, only from a Secret."""

    secret_name: str = Field(
        description="Secret in the backend's namespace whose key LUME_RESULT_STORE_URL holds the "
        "store URL (e.g. postgresql+psycopg://user:pass@host/db); given to the workers and to "
        "kubernetes flow-run Jobs as environment.",
        pattern=DNS_SUBDOMAIN_PATTERN,
    )


DOCKER_NO_SECRET = (
    "resultStorage.objectStore.credentialsSecretRef: a docker backend cannot give a Secret to "
    "its flow-run containers (Docker has no secretKeyRef, and a value in job variables would "
    "be readable by every Prefect user): use resultStorage.volume, or an object store with "
    "ambient credentials (no credentialsSecretRef)"
)
# An S3 bucket name (3 to 63 lowercase letters, digits, dots and hyphens), then a key prefix.
S3_URL_PATTERN = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?$"
_SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"


class ObjectStoreCredentialsRef(Model):
    """The Secret (in the backend's namespace) that holds the object store's access keys."""

    name: str = Field(description="Name of the Secret.", pattern=DNS_SUBDOMAIN_PATTERN)
    access_key_id_key: str = Field(
        default="AWS_ACCESS_KEY_ID",
        description="Key of the Secret holding the access key id.",
        pattern=_SECRET_KEY_PATTERN,
    )
    secret_access_key_key: str = Field(
        default="AWS_SECRET_ACCESS_KEY",
        description="Key of the Secret holding the secret access key.",
        pattern=_SECRET_KEY_PATTERN,
    )


class ObjectStore(Model):
    """An S3-protocol object store (AWS S3, MinIO, Ceph): flow runs write results under `url`
    and the operator reads them there; credentials only by Secret reference."""

    url: str = Field(
        description="Where results go: s3://bucket or s3://bucket/prefix. Each run's files go "
        "under <url>/<flow run id>/, Prefect's result records under <url>/prefect/.",
        pattern=S3_URL_PATTERN,
        max_length=1024,
    )
    endpoint_url: str | None = Field(
        default=None,
        description="Endpoint of an S3-compatible store (MinIO, Ceph), e.g. "
        "http://minio.storage:9000. Default: AWS S3. No user or password in it.",
        pattern=r"^https?://[^/@\s]+(/[^\s]*)?$",
    )
    region: str | None = Field(
        default=None, description="Region of the bucket, e.g. eu-west-1.", pattern=r"^[a-z0-9-]+$"
    )
    credentials_secret_ref: ObjectStoreCredentialsRef | None = Field(
        default=None,
        description="Secret with the access key id and secret access key, given to flow runs "
        "only as secretKeyRef and read by the operator itself. None: the pods' ambient "
        "credentials (IRSA, instance profile), and the operator's own.",
    )

    @field_validator("url", mode="before")
    @classmethod
    def _s3_url(cls, value: object) -> object:
        if isinstance(value, str) and not value.startswith("s3://"):
            raise ValueError(
                f"{value!r} is not s3://bucket or s3://bucket/prefix (MinIO and Ceph are "
                "reached with s3:// URLs too, through endpointUrl)"
            )
        return value

    @field_validator("url")
    @classmethod
    def _clean_url(cls, value: str) -> str:
        path = value.removeprefix("s3://").partition("/")[2]
        if any(part in (".", "..") for part in path.split("/")) or "//" in path.rstrip("/"):
            raise ValueError(f"{value!r}: the prefix may not contain '.', '..' or '//'")
        return value.rstrip("/")

    @field_validator("endpoint_url", mode="before")
    @classmethod
    def _no_credentials(cls, value: object) -> object:
        # Before the pattern: a password is never repeated back in a message.
        if isinstance(value, str) and "@" in value.partition("://")[2].partition("/")[0]:
            raise ValueError(
                "must not carry a user or password (user:password@...): name a Secret in "
                "credentialsSecretRef"
            )
        return value


class SharedVolume(Model):
    """A PersistentVolumeClaim mounted at one path in every flow run (a Docker volume of that
    name on docker backends), and in the operator pod by the chart's `resultVolumes`."""

    claim_name: str = Field(
        description="The PersistentVolumeClaim (docker: the named volume). ReadWriteMany when "
        "runs on several nodes write to it.",
        pattern=DNS_SUBDOMAIN_PATTERN,
        max_length=253,
    )
    mount_path: str = Field(
        description="Where flow runs see the volume, e.g. /results (an absolute path). Each "
        "run's files go under <mountPath>/<flow run id>/, Prefect's records under "
        "<mountPath>/prefect/.",
        pattern=r"^/[^:\s]*[^/:\s]$",
    )

    @field_validator("mount_path")
    @classmethod
    def _clean_path(cls, value: str) -> str:
        if posixpath.normpath(value) != value:
            raise ValueError(f"{value!r} must be a normalized absolute path (no '.', '..', '//')")
        return value


class ResultStorage(Model):
    """Where flow runs put results so that the operator and users can read them: an object
    store, or a shared volume. Exactly one."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.objectStore) != has(self.volume)",
                    "message": "resultStorage needs exactly one of objectStore or volume",
                }
            ]
        }
    )

    object_store: ObjectStore | None = Field(
        default=None, description="An S3-protocol object store (AWS S3, MinIO, Ceph)."
    )
    volume: SharedVolume | None = Field(
        default=None, description="A shared volume (a PersistentVolumeClaim)."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> ResultStorage:
        if (self.object_store is None) == (self.volume is None):
            given = "both" if self.object_store else "neither"
            raise ValueError(f"resultStorage needs exactly one of objectStore or volume ({given})")
        return self

    @property
    def identifier(self) -> str:
        """The filesystem identifier File descriptions on this storage carry: it names the
        storage (not the backend), so backends that share one read each other's files."""
        if self.object_store:
            return self.object_store.url
        assert self.volume is not None
        return f"pvc/{self.volume.claim_name}"

    @property
    def root(self) -> str:
        """Where results are, as flow runs see it: the object store URL or the mount path."""
        if self.object_store:
            return self.object_store.url
        assert self.volume is not None
        return self.volume.mount_path


class SchedulingBackendSpec(Model):
    """Where flows run: the backend type, its Prefect work pool and agent, and run defaults."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.type != 'docker' || !has(self.resultStorage) || "
                    "!has(self.resultStorage.objectStore) || "
                    "!has(self.resultStorage.objectStore.credentialsSecretRef)",
                    "message": DOCKER_NO_SECRET,
                }
            ]
        }
    )

    type: BackendType = Field(
        description="Kind of infrastructure flow runs get: kubernetes Jobs, docker containers or "
        "local processes. Immutable.",
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "self == oldSelf", "message": "type is immutable"}
            ]
        },
    )
    prefect: PrefectAPI | None = Field(default=None, description="The Prefect API to use.")
    work_pool: WorkPool | None = Field(
        default=None, description="The work pool to create or adopt."
    )
    labels: list[Label] | None = Field(
        default=None,
        description="Labels flows can select: each becomes a work queue of the pool and a tag.",
    )
    agent: Agent | None = Field(default=None, description="The in-cluster Prefect workers.")
    run_config: RunConfig | None = Field(
        default=None, description="Defaults for every flow run on this backend."
    )
    result_store: ResultStoreConfig | None = Field(
        default=None,
        description="The DB result store of flows on this backend. Default: a SQLite file in each "
        "run's results directory.",
    )
    result_storage: ResultStorage | None = Field(
        default=None,
        description="Where flow runs keep their results (Prefect's persisted return values and "
        "File results) so that the operator and users can read them. Required for kubernetes "
        "and docker backends to list results (a run's pod or container disk is its own). "
        "Default: each run's local disk, read where the operator shares it (process backends).",
    )
    job_template_patch: dict[str, Any] | None = Field(
        default=None,
        description="kubernetes only: a strategic merge patch of the Job every flow run gets "
        "(the work pool's base job template), for what runConfig does not cover: annotations, "
        "priorityClassName, runtimeClassName, a sidecar... Literal values only (no Prefect "
        "{{ placeholders }}); the patched Job's pods must pass Pod Security restricted.",
    )
    deletion_policy: Literal["Delete", "Orphan"] | None = Field(
        default=None,
        description="On deletion (default Delete): Delete removes the work pool it created (the finalizer holds "
        "until Prefect confirms); Orphan leaves it.",
    )

    @model_validator(mode="after")
    def _job_template_patch(self) -> SchedulingBackendSpec:
        if self.job_template_patch is not None and self.type != "kubernetes":
            raise ValueError(
                f"jobTemplatePatch: only kubernetes backends run flows as Jobs (this one is "
                f"{self.type})"
            )
        return self

    @model_validator(mode="after")
    def _docker_storage(self) -> SchedulingBackendSpec:
        store = self.result_storage.object_store if self.result_storage else None
        if self.type == "docker" and store and store.credentials_secret_ref:
            raise ValueError(DOCKER_NO_SECRET)
        return self


class SchedulingBackendStatus(Model):
    """What the operator observed; references only."""

    observed_generation: int | None = Field(
        default=None, description="The spec generation last acted on."
    )
    conditions: list[Condition] | None = Field(
        default=None, description="Ready, WorkPoolReady, AgentReady, Reconciling, Stalled."
    )
    work_pool_name: str | None = Field(default=None, description="Name of the Prefect work pool.")
    work_pool_id: str | None = Field(default=None, description="Id of the Prefect work pool.")
    agent_deployment: str | None = Field(
        default=None, description="Name of the agent's Deployment."
    )
    agent_ready_replicas: int | None = Field(
        default=None, description="Ready replicas of the agent Deployment."
    )
    result_storage_block: str | None = Field(
        default=None,
        description="The Prefect block (remote-file-system/<name>) that points the runs' "
        "persisted results at the object store; it holds no credential.",
    )


class SchedulingBackend(Resource):
    """Where and how flows run; yields a Prefect run config and runs Prefect workers."""

    kind: Literal["SchedulingBackend"] = Field(
        default="SchedulingBackend", description="SchedulingBackend."
    )
    spec: SchedulingBackendSpec = Field(description="Desired state.")
    status: SchedulingBackendStatus | None = Field(default=None, description="Observed state.")

    @property
    def work_pool_name(self) -> str:
        """The pool's name: given, or derived so two namespaces never share one by accident."""
        if self.spec.work_pool and self.spec.work_pool.name:
            return self.spec.work_pool.name
        return f"{self.metadata.namespace}-{self.metadata.name}"

    @property
    def result_block_name(self) -> str:
        """The Prefect block (remote-file-system) the operator keeps for an object-store
        backend: readable, and with a hash so that `a.b` and `a-b` never share one."""
        key = f"{self.metadata.namespace}/{self.metadata.name}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:8]
        readable = re.sub(r"[^a-z0-9-]", "-", f"{self.metadata.namespace}-{self.metadata.name}")
        return f"lume-results-{readable[:80]}-{digest}"
