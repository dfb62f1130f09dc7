"""A composition's parent run and its child runs, as per-step status: one reading for both the
CLI and the operator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from lume_operator.api.flow import FlowRunStatus, LumeFlow, ResultStatus
from lume_operator.flows.composition import OUTCOME_DESCRIPTION, step_of
from lume_operator.reconcile.flowrun import FINAL_STATES, phase_of, run_outcome, run_status


@dataclass
class StepObservation:
    """How one step stands: its phase, its run, its results or its error."""

    name: str
    phase: str = "Pending"
    run: FlowRunStatus | None = None
    results: list[ResultStatus] | None = None
    error: str | None = None
    note: str | None = None  # why a step was skipped

    @property
    def final(self) -> bool:
        return self.phase in ("Completed", "Failed", "Skipped")


@dataclass
class CompositionObservation:
    parent: Any
    steps: dict[str, StepObservation]

    @property
    def final(self) -> bool:
        state = self.parent.state
        return bool(state and state.type.value in FINAL_STATES)

    @property
    def phase(self) -> str:
        if not self.final:
            return "Running"
        if phase_of(self.parent.state.type.value) == "Completed" and not self.errors:
            return "Completed"
        return "Failed"

    @property
    def errors(self) -> dict[str, str]:
        return {name: step.error for name, step in self.steps.items() if step.error}

    @property
    def message(self) -> str:
        failed = "; ".join(f"step {name!r}: {error}" for name, error in self.errors.items())
        state = self.parent.state
        return failed or (state.message if state and state.message else "")


async def observe_composition(
    gateway: Any,
    parent_id: UUID,
    flows: dict[str, LumeFlow],
    known: dict[str, StepObservation] | None = None,
) -> CompositionObservation:
    """Read the parent run and its children; steps already final in `known` are not re-read.

    A completed step's result locations are read (and checked) once, when it completes.
    Steps that never got a run are told apart by the parent's outcome table: skipped because
    a parent step failed, or failed before starting (a mapping that did not resolve).
    """
    known = dict(known or {})
    steps = {name: known.get(name) or StepObservation(name) for name in flows}
    parent = await gateway.read_flow_run(parent_id)
    for child in await gateway.child_runs(parent.id):
        name = step_of(child.tags)
        if name not in steps or (steps[name].final and steps[name].run):
            continue
        step = steps[name]
        step.run = run_status(child, 0, gateway.ui_url(child.id))
        state_type = step.run.state_type
        if state_type not in FINAL_STATES:
            step.phase = "Running"
        else:
            outcome = await run_outcome(gateway, child, flows[name].spec.results)
            step.phase, step.results, step.error = outcome.phase, outcome.results, outcome.error
    observation = CompositionObservation(parent, steps)
    if observation.final:
        rows = await gateway.table_artifact(parent.id, OUTCOME_DESCRIPTION) or []
        outcome = {row.get("step"): row for row in rows}
        for name, step in steps.items():
            if step.final:
                continue
            row = outcome.get(name, {})
            if row.get("state") == "SKIPPED":
                step.phase, step.note = "Skipped", row.get("message") or "skipped"
            else:
                step.phase = "Failed"
                step.error = row.get("message") or "the composition ended before this step ran"
    return observation
