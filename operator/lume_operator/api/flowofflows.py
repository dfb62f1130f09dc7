"""`FlowOfFlows`: flows chained into a DAG, outputs of parents mapped onto parameters of children."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from lume_operator.api.common import (
    DNS_LABEL_PATTERN,
    Condition,
    Label,
    Model,
    Resource,
    require_unique,
)
from lume_operator.api.flow import FlowRunStatus, LumeFlowSpec, ObjectRef, Phase, ResultStatus


class MappedParameter(Model):
    """Where a parameter's value comes from: a parent step's output."""

    parent_flow: str = Field(description="Name of the parent step.")
    parent_task: str | None = Field(
        default=None,
        description="Task of the parent whose result to use. Default: the flow's return value.",
    )
    map_type: Literal["raw", "file", "db"] = Field(
        default="raw",
        description="raw: the value; file: a File description loaded by the child; db: a stored document.",
    )
    attribute_index: list[str | int] | None = Field(
        default=None,
        description="Keys (or list indices) into the value, applied in order.",
        json_schema_extra={"items": {"x-kubernetes-int-or-string": True}},
    )


class Step(Model):
    """One flow of the composition."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.flowRef) != has(self.flow)",
                    "message": "a step needs exactly one of flowRef or flow",
                }
            ]
        }
    )

    name: str = Field(
        description="Step name, unique in the composition.", pattern=DNS_LABEL_PATTERN
    )
    flow_ref: ObjectRef | None = Field(
        default=None, description="A LumeFlow in the same namespace."
    )
    flow: LumeFlowSpec | None = Field(
        default=None, description="An inline flow, instead of flowRef."
    )
    parameters: dict[str, object] | None = Field(
        default=None, description="Parameters set directly."
    )
    mapped_parameters: dict[str, MappedParameter] | None = Field(
        default=None, description="Parameters taken from parent steps' outputs, by parameter name."
    )
    timeout_seconds: int | None = Field(
        default=None,
        ge=1,
        description="Deadline of the step's run. Default: its flow's run.timeoutSeconds, else "
        "the composition's stepTimeoutSeconds.",
    )
    retries: int | None = Field(
        default=None, ge=0, le=100, description="Retries of the step. Default: its flow's."
    )
    retry_delay_seconds: int | None = Field(
        default=None, ge=0, le=86400, description="Seconds before a retry. Default: its flow's."
    )

    @model_validator(mode="after")
    def _one_flow(self) -> Step:
        if (self.flow_ref is None) == (self.flow is None):
            raise ValueError("a step needs exactly one of flowRef or flow")
        return self


class FlowOfFlowsSpec(Model):
    """A composition of flows run as a DAG."""

    steps: list[Step] = Field(
        description="The steps; order does not matter, dependencies come from mappedParameters.",
        min_length=1,
        max_length=100,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    backend_ref: ObjectRef | None = Field(
        default=None,
        description="Backend of the composition's parent run. Default: the first step's.",
    )
    labels: list[Label] | None = Field(default=None, description="Labels, as on a LumeFlow.")
    step_timeout_seconds: int | None = Field(
        default=None,
        ge=1,
        description="Longest wait for any step whose flow and step set no timeoutSeconds "
        "(default 86400, a day): the parent run never waits without bound.",
    )
    deletion_policy: Literal["Delete", "Orphan"] | None = Field(
        default=None,
        description="On deletion (default Delete): Delete cancels the parent run and its steps' runs and removes "
        "the Prefect deployments it made; Orphan leaves them.",
    )

    @field_validator("steps")
    @classmethod
    def _unique_steps(cls, items: list | None) -> list | None:
        require_unique("step", [item.name for item in items or []])
        return items


class StepStatus(Model):
    """One step's run, by reference."""

    name: str = Field(description="Step name.")
    phase: Literal["Pending", "Running", "Completed", "Failed", "Skipped"] | None = Field(
        default=None, description="Pending, Running, Completed, Failed or Skipped."
    )
    run: FlowRunStatus | None = Field(default=None, description="The step's flow run.")
    results: list[ResultStatus] | None = Field(
        default=None, description="The step's result locations."
    )
    message: str | None = Field(default=None, description="Why the step failed or was skipped.")


class FlowOfFlowsStatus(Model):
    """What the operator observed."""

    phase: Phase | None = Field(default=None, description="Overall phase.")
    observed_generation: int | None = Field(
        default=None, description="The spec generation last acted on."
    )
    conditions: list[Condition] | None = Field(
        default=None, description="Ready, Reconciling, Stalled."
    )
    deployment_id: str | None = Field(
        default=None, description="The Prefect deployment of the composition's parent flow."
    )
    run: FlowRunStatus | None = Field(
        default=None, description="The composition's parent flow run."
    )
    steps: list[StepStatus] | None = Field(default=None, description="One entry per step.")


class FlowOfFlows(Resource):
    """Flows composed into a DAG; outputs of one flow become parameters of the next."""

    kind: Literal["FlowOfFlows"] = Field(default="FlowOfFlows", description="FlowOfFlows.")
    spec: FlowOfFlowsSpec = Field(description="Desired state.")
    status: FlowOfFlowsStatus | None = Field(default=None, description="Observed state.")
