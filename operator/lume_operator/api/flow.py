"""`LumeFlow`: one Prefect flow packaged with a project, and when and how it runs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from lume_operator.api.common import (
    DNS_SUBDOMAIN_PATTERN,
    Condition,
    Label,
    Model,
    Resource,
    require_unique,
)
from lume_operator.api.runconfig import RunConfig

ENTRYPOINT_PATTERN = r"^[^:\s]+:[A-Za-z_][A-Za-z0-9_]*$"

Phase = Literal["Pending", "Deploying", "Ready", "Running", "Completed", "Failed"]


class ObjectRef(Model):
    """A reference to another object in the same namespace."""

    name: str = Field(description="Name of the referenced object.", pattern=DNS_SUBDOMAIN_PATTERN)


class Source(Model):
    """Where the flow's code is."""

    path: str | None = Field(
        default=None,
        description="Project directory the entrypoint is relative to: for local runs relative to "
        "the manifest's file; in a container, a path inside the image (default: its workdir).",
    )
    image: str | None = Field(
        default=None, description="Image the code is baked into; overrides runConfig.image."
    )


class RunPolicy(Model):
    """When flow runs are created."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.policy != 'Schedule' || has(self.cron)",
                    "message": "cron is required when policy is Schedule",
                }
            ]
        }
    )

    policy: Literal["OnChange", "Schedule", "OnRequest"] = Field(
        default="OnChange",
        description="OnChange: a run per new spec generation; Schedule: on the cron schedule; "
        "OnRequest: only when the lume.dev/run-request annotation changes.",
    )
    cron: str | None = Field(
        default=None, description="Cron expression (5 fields), required for policy Schedule."
    )
    timezone: str = Field(default="UTC", description="IANA time zone of the cron schedule.")
    concurrency_policy: Literal["Allow", "Forbid", "Replace"] | None = Field(
        default=None,
        description="A new run while one is in flight (CronJob semantics): Allow runs both, "
        "Forbid skips the new one, Replace cancels the old one first. Default: Replace for "
        "OnChange (a new spec supersedes the old), Allow for Schedule and OnRequest.",
    )
    timeout_seconds: int | None = Field(
        default=None,
        ge=1,
        description="Deadline of each run from its start: past it the run is cancelled and ends "
        "Failed with reason DeadlineExceeded (not retried).",
    )
    retries: int = Field(
        default=0, ge=0, le=100, description="New runs after a run ends Failed or Crashed."
    )
    retry_delay_seconds: int = Field(
        default=0, ge=0, le=86400, description="Seconds before each retry starts."
    )
    history_limit: int = Field(
        default=10, ge=1, le=100, description="How many runs status.runs keeps, newest first."
    )

    @property
    def concurrency(self) -> str:
        """The concurrency policy in force, the policy's default when unset."""
        if self.concurrency_policy:
            return self.concurrency_policy
        return "Replace" if self.policy == "OnChange" else "Allow"

    @model_validator(mode="after")
    def _cron_when_scheduled(self) -> RunPolicy:
        if self.policy == "Schedule" and not self.cron:
            raise ValueError("cron is required when policy is Schedule")
        if self.cron is not None:
            # Prefect's own cron check, loaded only for a cron: the API models stay light.
            from prefect.client.schemas.schedules import CronSchedule

            try:
                CronSchedule(cron=self.cron, timezone=self.timezone)
            except ValueError as error:
                raise ValueError(
                    f"invalid cron schedule {self.cron!r}: {_first_line(error)}"
                ) from None
        return self


def _first_line(error: Exception) -> str:
    """The reason itself: a pydantic error's message, not its documentation link."""
    errors = getattr(error, "errors", None)
    if callable(errors):
        return str(errors()[0]["msg"]).removeprefix("Value error, ")
    return str(error).splitlines()[-1].strip()


class ResultSpec(Model):
    """A result the flow returns: a File description (or value) under a key of its return value."""

    name: str = Field(
        description="Key path in the flow's return value ('summary', 'outputs.0'); also the name "
        "shown in status."
    )
    type: str | None = Field(
        default=None,
        description="Expected file type (HDF5File, TextFile, File[module:Serializer]); checked "
        "after the run. Unset: any File, or a plain value.",
    )


class LumeFlowSpec(Model):
    """A flow packaged with a project: its entrypoint, parameters and how it runs."""

    backend_ref: ObjectRef = Field(description="The SchedulingBackend this flow runs on.")
    entrypoint: str = Field(
        description="The flow function: 'path/to/flow.py:function' or 'module.path:function'.",
        pattern=ENTRYPOINT_PATTERN,
    )
    source: Source | None = Field(default=None, description="Where the flow's code is.")
    parameters: dict[str, Any] | None = Field(
        default=None, description="Parameters of the flow run (JSON values)."
    )
    run_config: RunConfig | None = Field(
        default=None, description="Overrides of the backend's run-config defaults."
    )
    labels: list[Label] | None = Field(
        default=None,
        description="Backend labels to run under: the first picks the work queue; all become tags.",
    )
    results: list[ResultSpec] | None = Field(
        default=None,
        description="Results to record in status. Unset: every File the flow returns.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    run: RunPolicy | None = Field(default=None, description="When flow runs are created.")
    deletion_policy: Literal["Delete", "Orphan"] | None = Field(
        default=None,
        description="On deletion (default Delete): Delete cancels runs in flight and removes the Prefect "
        "deployment (the finalizer holds until Prefect confirms); Orphan leaves both.",
    )

    @field_validator("results")
    @classmethod
    def _unique_results(cls, items: list | None) -> list | None:
        require_unique("result", [item.name for item in items or []])
        return items


class ResultStatus(Model):
    """Where one result is; never its content."""

    name: str = Field(description="Result name (key path in the return value).")
    type: str = Field(description="File type (HDF5File, TextFile, ...) or 'value'.")
    filesystem: str | None = Field(default=None, description="Filesystem identifier of a file.")
    location: str = Field(description="File name on that filesystem, or the Prefect result key.")


class FlowRunStatus(Model):
    """One Prefect flow run, by reference."""

    id: str | None = Field(default=None, description="Prefect flow run id.")
    name: str | None = Field(default=None, description="Prefect flow run name.")
    index: int | None = Field(default=None, description="Run index for this generation.")
    generation: int | None = Field(
        default=None, description="The spec generation the run was made for."
    )
    state: str | None = Field(default=None, description="Prefect state name, e.g. Completed.")
    state_type: str | None = Field(default=None, description="Prefect state type, e.g. COMPLETED.")
    start_time: str | None = Field(default=None, description="When the run started (RFC 3339).")
    end_time: str | None = Field(default=None, description="When the run ended (RFC 3339).")
    url: str | None = Field(default=None, description="The run in the Prefect UI.")
    message: str | None = Field(default=None, description="The state's message, e.g. the error.")
    created_time: str | None = Field(
        default=None, description="When the run was created (RFC 3339)."
    )
    attempt: int | None = Field(
        default=None, description="0 for a first run, 1, 2, ... for its retries."
    )
    reason: str | None = Field(
        default=None,
        description="Why lume-operator ended or skipped it: DeadlineExceeded, Replaced, "
        "ConcurrencyForbid.",
    )
    results: list[ResultStatus] | None = Field(
        default=None, description="Its result locations, once it completed."
    )


class LumeFlowStatus(Model):
    """What the operator observed."""

    phase: Phase | None = Field(
        default=None, description="Pending, Deploying, Ready, Running, Completed or Failed."
    )
    observed_generation: int | None = Field(
        default=None, description="The spec generation last acted on."
    )
    conditions: list[Condition] | None = Field(
        default=None, description="Ready, Reconciling, Stalled."
    )
    work_pool_name: str | None = Field(default=None, description="The Prefect work pool.")
    deployment_id: str | None = Field(default=None, description="The Prefect deployment id.")
    runs: list[FlowRunStatus] | None = Field(
        default=None,
        description="The last spec.run.historyLimit runs, newest first (skipped ones too).",
    )
    last_request: int | None = Field(
        default=None,
        description="The highest lume.dev/run-request value handled (OnRequest).",
    )
    last_run: FlowRunStatus | None = Field(
        default=None, description="The last or current flow run."
    )
    results: list[ResultStatus] | None = Field(
        default=None, description="Result locations of the last completed run."
    )


class LumeFlow(Resource):
    """One Prefect flow packaged with a project; deployed to Prefect and run by policy."""

    kind: Literal["LumeFlow"] = Field(default="LumeFlow", description="LumeFlow.")
    spec: LumeFlowSpec = Field(description="Desired state.")
    status: LumeFlowStatus | None = Field(default=None, description="Observed state.")
