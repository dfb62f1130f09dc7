"""A FlowOfFlows as the plain-JSON plan its parent flow runs: the same for the CLI and operator."""

from __future__ import annotations

from typing import Any

from lume_operator.api.flow import LumeFlow
from lume_operator.api.flowofflows import FlowOfFlows, Step
from lume_operator.prefect.port import idempotency_key


def step_flows(fof: FlowOfFlows, flows: dict[str, LumeFlow]) -> dict[str, LumeFlow]:
    """The LumeFlow each step runs; inline flows become LumeFlows named `<composition>-<step>`.

    `flows` are the LumeFlows of the composition's namespace by name; unknown references are
    left out (validation reports them first).
    """
    resolved: dict[str, LumeFlow] = {}
    for step in fof.spec.steps:
        if step.flow_ref is not None:
            if step.flow_ref.name in flows:
                resolved[step.name] = flows[step.flow_ref.name]
        elif step.flow is not None:
            resolved[step.name] = LumeFlow(
                metadata={
                    "name": f"{fof.metadata.name}-{step.name}",
                    "namespace": fof.metadata.namespace,
                    "uid": fof.metadata.uid,
                    "generation": fof.metadata.generation,
                },
                spec=step.flow,
            )
    return resolved


def steps_with_mapped_tasks(fof: FlowOfFlows) -> set[str]:
    """Steps whose task results some child reads: their runs must persist task results."""
    return {
        mapping.parent_flow
        for step in fof.spec.steps
        for mapping in (step.mapped_parameters or {}).values()
        if mapping.parent_task
    }


# A day: the longest a FlowOfFlows parent waits for a step that sets no deadline.
DEFAULT_STEP_TIMEOUT = 86400


def _run_limits(fof: FlowOfFlows, step: Step, flow: LumeFlow) -> dict[str, Any]:
    """A step's deadline and retries: its own, else its flow's; the deadline is never unset
    (the composition's stepTimeoutSeconds), so the parent never waits without bound."""
    run = flow.spec.run
    timeout = step.timeout_seconds or (run.timeout_seconds if run else None)
    retries = step.retries if step.retries is not None else (run.retries if run else 0)
    delay = (
        step.retry_delay_seconds
        if step.retry_delay_seconds is not None
        else (run.retry_delay_seconds if run else 0)
    )
    return {
        "timeout": timeout or fof.spec.step_timeout_seconds or DEFAULT_STEP_TIMEOUT,
        "retries": retries,
        "retryDelay": delay,
    }


def plan_steps(
    fof: FlowOfFlows,
    flows: dict[str, LumeFlow],
    uid: str,
    *,
    job_variables: dict[str, dict[str, Any]] | None = None,
    run_index: int = 0,
) -> list[dict[str, Any]]:
    """The `steps` parameter of the composition's parent flow run.

    Each step names its deployment as `<flow name>/<deployment name>` (the LumeFlow's name and
    namespace) and carries its idempotency key from (uid, generation, run index, step), so a
    retried parent never starts a step twice.
    """
    planned = []
    for step in fof.spec.steps:
        flow = flows[step.name]
        item: dict[str, Any] = {
            "name": step.name,
            "deployment": f"{flow.metadata.name}/{flow.metadata.namespace}",
            "parameters": dict(step.parameters or {}),
            "mapped": {
                param: {
                    "parent": mapping.parent_flow,
                    "task": mapping.parent_task,
                    "type": mapping.map_type,
                    "index": list(mapping.attribute_index or []),
                }
                for param, mapping in (step.mapped_parameters or {}).items()
            },
            "key": idempotency_key(uid, fof.metadata.generation, run_index, step.name),
            "tags": [f"lume.dev/flowofflows={fof.metadata.name}"],
            **_run_limits(fof, step, flow),
        }
        if job_variables and step.name in job_variables:
            item["jobVariables"] = job_variables[step.name]
        planned.append(item)
    return planned
