"""`SchedulingBackend`: where and how flows run (a Prefect work pool, its workers, run defaults)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

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


class SchedulingBackendSpec(Model):
    """Where flows run: the backend type, its Prefect work pool and agent, and run defaults."""

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
    deletion_policy: Literal["Delete", "Orphan"] | None = Field(
        default=None,
        description="On deletion (default Delete): Delete removes the work pool it created (the finalizer holds "
        "until Prefect confirms); Orphan leaves it.",
    )


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
