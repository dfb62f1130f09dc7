"""FlowOfFlows decisions: deploy the parent flow, start it once per generation, and read it
step by step into status.

The DAG itself is driven by the parent flow in the backend's runtime (see docs/architecture.md);
the operator only creates the parent run (idempotently) and reads what happened.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from lume_operator import failpoints
from lume_operator.api.backend import SchedulingBackend
from lume_operator.api.flow import FlowRunStatus, LumeFlow, ResultStatus
from lume_operator.api.flowofflows import FlowOfFlows, FlowOfFlowsStatus, StepStatus
from lume_operator.api.manifests import parse_resource
from lume_operator.flows.composition import OUTCOME_DESCRIPTION, step_of
from lume_operator.flows.plan import plan_steps, step_flows, steps_with_mapped_tasks
from lume_operator.flows.validation import composition_problems
from lume_operator.prefect.port import (
    FlowRunView,
    PrefectError,
    PrefectPort,
    idempotency_key,
)
from lume_operator.reconcile import conditions
from lume_operator.reconcile.deploy import composition_deployment, flow_deployment
from lume_operator.reconcile.flowrun import (
    OpenStorage,
    Results,
    phase_of,
    results_condition,
    run_outcome,
    run_status,
    storage_for,
)
from lume_operator.reconcile.lumeflow import backend_for_deletion, find_backend
from lume_operator.reconcile.outcome import (
    TROUBLE,
    Connect,
    Event,
    Found,
    Outcome,
    Waiting,
    held,
    invalid,
    orphaned,
    parse_object,
    prefect_trouble,
    set_conditions,
)
from lume_operator.settings import OperatorSettings

CompositionOutcome = Outcome[FlowOfFlowsStatus]


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
    parent: FlowRunView
    steps: dict[str, StepObservation]

    @property
    def final(self) -> bool:
        return self.parent.final

    @property
    def phase(self) -> str:
        if not self.final:
            return "Running"
        state = self.parent.state
        if state and phase_of(state.type) == "Completed" and not self.errors:
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
    prefect: PrefectPort,
    parent_id: str,
    flows: dict[str, LumeFlow],
    known: dict[str, StepObservation] | None = None,
    results: Callable[[LumeFlow], Awaitable[Results]] | None = None,
) -> CompositionObservation:
    """Read the parent run and its children; steps already final in `known` are not re-read.

    A completed step's result locations are read (and checked) once, when it completes, where
    its flow's backend keeps them (`results`; None: through Prefect, its local default).
    Steps that never got a run are told apart by the parent's outcome table: skipped because
    a parent step failed, or failed before starting (a mapping that did not resolve).
    """
    known = dict(known or {})
    steps = {name: known.get(name) or StepObservation(name) for name in flows}
    parent = await prefect.read_flow_run(parent_id)
    latest: dict[str, FlowRunView] = {}  # a step's newest attempt
    for child in await prefect.child_runs(parent.id):
        name = step_of(child.tags)
        if name in steps and (
            name not in latest or (child.created_time or "") > (latest[name].created_time or "")
        ):
            latest[name] = child
    for name, child in latest.items():
        step = steps[name]
        if step.final and step.run and step.run.id == child.id:
            continue
        step.error = step.note = step.results = None  # a new attempt: the last one's end is past
        step.run = run_status(child, 0, prefect.ui_url(child.id))
        if not child.final:
            step.phase = "Running"
        else:
            flow = flows[name]
            storage = await results(flow) if results is not None else None
            outcome = await run_outcome(prefect, child, flow.spec.results, storage)
            step.phase, step.results, step.error = outcome.phase, outcome.results, outcome.error
    observation = CompositionObservation(parent, steps)
    if observation.final:
        rows = await prefect.table_artifact(parent.id, OUTCOME_DESCRIPTION) or []
        outcome_rows = {row.get("step"): row for row in rows}
        for name, step in steps.items():
            if step.final:
                continue
            row = outcome_rows.get(name, {})
            if row.get("state") == "SKIPPED":
                step.phase, step.note = "Skipped", row.get("message") or "skipped"
            else:
                step.phase = "Failed"
                step.error = row.get("message") or "the composition ended before this step ran"
    return observation


def step_statuses(fof: FlowOfFlows, seen: CompositionObservation) -> list[StepStatus]:
    """One status entry per step, in the order the spec lists them."""
    statuses = []
    for step in fof.spec.steps:
        observed = seen.steps[step.name]
        statuses.append(
            StepStatus(
                name=step.name,
                phase=observed.phase,
                run=observed.run,
                results=observed.results or None,
                message=observed.error or observed.note,
            )
        )
    return statuses


def apply_observation(
    fof: FlowOfFlows, status: FlowOfFlowsStatus, seen: CompositionObservation, url: str
) -> CompositionOutcome | None:
    """Status from what was read: per-step phases, the parent's state, and at the end the
    composition's phase and why. None while nothing changed."""
    run = status.run
    reference = run_status(seen.parent, 0, url, run.generation if run else None)
    steps = step_statuses(fof, seen)
    changed = (
        steps != (status.steps or [])
        or reference.state != (run.state if run else None)
        or conditions.reason_of(status.conditions) in TROUBLE
    )
    status.run, status.steps, status.phase = reference, steps, seen.phase
    if not seen.final:
        if not changed:
            return None
        set_conditions(status, conditions.progressing("FlowRunning", "steps running"))
        return Outcome(status)
    if seen.phase == "Completed":
        message = "every step completed"
        set_conditions(status, conditions.ready("FlowRunCompleted", message))
        return Outcome(status, [Event("Normal", "FlowRunCompleted", message)])
    message = seen.message or f"ended {seen.parent.state.name if seen.parent.state else ''}"
    set_conditions(status, conditions.failed("StepFailed", message))
    return Outcome(status, [Event("Warning", "StepFailed", message)])


def _flows(flows: dict[str, Found], namespace: str) -> dict[str, tuple[LumeFlow, dict[str, Any]]]:
    """Valid LumeFlows of the namespace by name, with their status."""
    found: dict[str, tuple[LumeFlow, dict[str, Any]]] = {}
    for name, entry in flows.items():
        flow, _problems = parse_resource(entry.body, f"LumeFlow {namespace}/{name}")
        if flow is not None:
            found[name] = (flow, entry.status)
    return found


def _backend_name(fof: FlowOfFlows, by_step: dict[str, LumeFlow]) -> str | None:
    if fof.spec.backend_ref:
        return fof.spec.backend_ref.name
    first = by_step.get(fof.spec.steps[0].name)
    return first.spec.backend_ref.name if first else None


def _results_condition(
    backend: SchedulingBackend,
    by_step: dict[str, LumeFlow],
    backends: dict[str, Found],
    namespace: str,
) -> dict[str, Any]:
    """`ResultsAvailable` of a composition: its own backend's (where the parent reads the
    steps' values), unless a step runs on a backend whose results nobody can read."""
    names = sorted(
        {flow.spec.backend_ref.name for flow in by_step.values()} - {backend.metadata.name}
    )
    for name in [backend.metadata.name, *names]:
        found = backends.get(name)
        parsed = (
            parse_resource(found.body, f"SchedulingBackend {namespace}/{name}")[0]
            if found
            else None
        )
        if parsed is not None:
            condition = results_condition(parsed)
            if condition["status"] == "False":
                return condition
    return results_condition(backend)


async def reconcile_composition(
    body: dict[str, Any],
    status: FlowOfFlowsStatus,
    *,
    flows: dict[str, Found],
    backends: dict[str, Found],
    connect: Connect,
    settings: OperatorSettings,
    retry: int = 0,
) -> CompositionOutcome:
    """Deploy inline steps and the parent flow, then start the parent run once per generation.

    `flows` and `backends` are the LumeFlows and SchedulingBackends of the composition's
    namespace, by name.
    """
    generation = body["metadata"].get("generation")
    fof, problem = parse_object(body)
    if not problem:
        known = _flows(flows, fof.metadata.namespace)
        problems = [
            (path, message)
            for path, message in composition_problems(fof, {n: f for n, (f, _) in known.items()})
            if not path.endswith(".flowRef.name")  # a LumeFlow not applied yet: waited for
        ]
        problem = "; ".join(f"{path}: {message}" for path, message in problems) or None
    if problem:
        return invalid(status, problem, generation, phase="Failed")
    status.observed_generation = generation
    namespace = fof.metadata.namespace
    try:
        for step in fof.spec.steps:
            if step.flow_ref is None:
                continue
            entry = known.get(step.flow_ref.name)
            if entry is None:
                raise Waiting(
                    "FlowNotFound", f"LumeFlow {step.flow_ref.name!r} not found; waiting for it"
                )
            if not entry[1].get("deploymentId"):
                raise Waiting(
                    "FlowNotDeployed", f"LumeFlow {step.flow_ref.name!r} is not deployed yet"
                )
        by_step = step_flows(fof, {name: flow for name, (flow, _) in known.items()})
        backend_name = _backend_name(fof, by_step) or ""
        backend = find_backend(backends.get(backend_name), namespace, backend_name)
        available = _results_condition(backend, by_step, backends, namespace)
        set_conditions(status, [available])
        async with connect(backend) as prefect:
            for step in fof.spec.steps:
                if step.flow is None:
                    continue  # LumeFlows deploy themselves
                inline = by_step[step.name]
                name = inline.spec.backend_ref.name
                made = flow_deployment(
                    inline,
                    find_backend(backends.get(name), namespace, name),
                    working_dir=inline.spec.source.path if inline.spec.source else None,
                )
                await prefect.ensure_deployment(made.spec)
            spec = composition_deployment(fof, backend)
            deployment_id = await prefect.ensure_deployment(spec)
            status.deployment_id = deployment_id  # deletion finds it even if the run fails
            flow_run = None
            if not (status.run and status.run.generation == generation and status.run.id):
                uid = fof.metadata.uid or ""
                key = idempotency_key(uid, generation, 0)
                # A new generation supersedes the old: its parent run and steps are cancelled.
                for old in await prefect.active_runs(deployment_id):
                    if old.idempotency_key != key:
                        for run in [old, *await prefect.child_runs(old.id)]:
                            await prefect.cancel_flow_run(run.id)
                flow_run = await prefect.create_flow_run(
                    deployment_id,
                    idempotency_key=key,
                    parameters={
                        "steps": plan_steps(
                            fof,
                            by_step,
                            uid,
                            job_variables=_task_persisting(fof, by_step, backends, namespace),
                        ),
                        "poll_interval": settings.step_poll_interval,
                    },
                    tags=spec.tags,
                )
                failpoints.hit("composition-run-created")
                reference = run_status(flow_run, 0, prefect.ui_url(flow_run.id), generation)
    except (PrefectError, Waiting) as error:
        return prefect_trouble(status, error, retry_in=settings.backoff(retry))
    status.deployment_id = deployment_id
    if flow_run is None:
        if conditions.reason_of(status.conditions) in TROUBLE and status.phase == "Running":
            set_conditions(status, conditions.progressing("FlowRunning", "steps running"))
        return Outcome(status)
    status.phase, status.run = "Running", reference
    status.steps = [StepStatus(name=step.name, phase="Pending") for step in fof.spec.steps]
    set_conditions(status, conditions.progressing("FlowRunning", f"flow run {flow_run.name}"))
    return Outcome(status, [Event("Normal", "FlowRunCreated", f"flow run {flow_run.name}")])


async def follow_composition(
    body: dict[str, Any],
    status: FlowOfFlowsStatus,
    *,
    flows: dict[str, Found],
    backends: dict[str, Found],
    connect: Connect,
    memory: dict[str, dict[str, StepObservation]],
    open_storage: OpenStorage | None = None,
) -> CompositionOutcome | None:
    """Per-step phases, runs and results until the parent run ends; None when unchanged.

    `memory` keeps the steps already seen final per parent run, so their results are read
    from Prefect once; an entry is dropped when its run ends. Each step's results are read
    where its flow's backend keeps them (`open_storage`).
    """
    fof, problem = parse_object(body)
    run = status.run
    if problem or not (run and run.id) or status.phase in ("Completed", "Failed"):
        return None
    namespace = fof.metadata.namespace
    known = _flows(flows, namespace)
    by_step = step_flows(fof, {name: flow for name, (flow, _) in known.items()})
    backend_name = _backend_name(fof, by_step)
    if backend_name is None:
        return None
    key = f"{body['metadata'].get('uid')}/{run.id}"

    async def results(flow: LumeFlow) -> Results:
        name = flow.spec.backend_ref.name
        return await storage_for(find_backend(backends.get(name), namespace, name), open_storage)

    try:
        backend = find_backend(backends.get(backend_name), namespace, backend_name)
        async with connect(backend) as prefect:
            seen = await observe_composition(prefect, run.id, by_step, memory.get(key), results)
            url = prefect.ui_url(seen.parent.id)
    except Waiting:
        return None
    except PrefectError as error:
        if conditions.reason_of(status.conditions) == error.reason:
            return None
        return prefect_trouble(status, error, retry_in=None)
    memory[key] = seen.steps
    if seen.final:
        memory.pop(key, None)
    return apply_observation(fof, status, seen, url)


async def delete_composition(
    body: dict[str, Any],
    status: FlowOfFlowsStatus,
    *,
    flows: dict[str, Found],
    backends: dict[str, Found],
    connect: Connect,
    settings: OperatorSettings,
    retry: int = 0,
    waited: float = 0.0,
) -> CompositionOutcome:
    """Cancel the parent run and its steps' runs, then delete the parent deployment and the
    inline steps' deployments; the finalizer holds (a retry) until Prefect confirms. Runs
    their workers have not stopped after `settings.cancel_grace` s are cancelled by force."""
    fof, problem = parse_object(body)
    if problem or not status.deployment_id:
        return Outcome(status)
    if fof.spec.deletion_policy == "Orphan":
        return orphaned(status, f"deployment {status.deployment_id} and its runs")
    namespace = fof.metadata.namespace
    by_step = step_flows(fof, {n: f for n, (f, _) in _flows(flows, namespace).items()})
    name = _backend_name(fof, by_step) or ""
    backend = backend_for_deletion(backends.get(name), namespace, name, settings)
    if backend is None:
        return Outcome(status)
    force = waited >= settings.cancel_grace
    try:
        async with connect(backend) as prefect:
            parents = await prefect.active_runs(status.deployment_id)
            known = [status.run.id] if status.run and status.run.id else []
            parents += [
                run
                for run in await prefect.read_flow_runs(known)  # a run Prefect lost: skipped
                if run.id not in {p.id for p in parents}
            ]
            runs = list(parents)
            for parent in parents:
                runs += await prefect.child_runs(parent.id)
            for run in runs:
                if not run.final:
                    await prefect.cancel_flow_run(run.id, force=force)
            failpoints.hit("composition-runs-cancelled")
            still = [
                r.name for r in await prefect.read_flow_runs([r.id for r in runs]) if not r.final
            ]
            if still:
                message = f"waiting for {', '.join(still)} to stop before deleting"
                set_conditions(status, conditions.progressing("CancellingRuns", message))
                return Outcome(status, retry_in=2.0, retry_message=message)
            for step in fof.spec.steps:
                if step.flow is not None:
                    inline = by_step[step.name]
                    await prefect.delete_deployment(inline.metadata.name, inline.metadata.namespace)
            spec = composition_deployment(fof, backend)
            await prefect.delete_deployment(spec.flow_name, spec.name)
    except PrefectError as error:
        return held(status, error, f"the Prefect deployments of {fof.key}", settings, retry)
    return Outcome(status)


def _task_persisting(
    fof: FlowOfFlows,
    by_step: dict[str, LumeFlow],
    backends: dict[str, Found],
    namespace: str,
) -> dict[str, dict[str, Any]]:
    """Job variables of the steps whose task results a later step maps: they persist task
    results. A run's `env` replaces its deployment's whole, so it carries the deployment's."""
    variables: dict[str, dict[str, Any]] = {}
    for name in sorted(steps_with_mapped_tasks(fof)):
        flow = by_step[name]
        backend_name = flow.spec.backend_ref.name
        made = flow_deployment(
            flow, find_backend(backends.get(backend_name), namespace, backend_name)
        )
        variables[name] = {"env": {**made.env, "PREFECT_TASKS_DEFAULT_PERSIST_RESULT": "true"}}
    return variables
