"""LumeFlow decisions: deploy, start runs (OnChange, OnRequest), follow them, delete."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from lume_operator import GROUP, failpoints
from lume_operator.api.backend import SchedulingBackend
from lume_operator.api.flow import LumeFlow, LumeFlowStatus
from lume_operator.api.manifests import parse_resource
from lume_operator.prefect.port import (
    FINAL_STATES,
    FlowRunView,
    PrefectError,
    PrefectPort,
    idempotency_key,
)
from lume_operator.reconcile import conditions
from lume_operator.reconcile.deploy import flow_deployment
from lume_operator.reconcile.flowrun import phase_of, run_outcome, run_status
from lume_operator.reconcile.outcome import (
    TROUBLE,
    Connect,
    Event,
    Found,
    Outcome,
    Waiting,
    invalid,
    parse_object,
    prefect_trouble,
    set_conditions,
)
from lume_operator.settings import OperatorSettings

RUN_REQUEST = f"{GROUP}/run-request"

FlowOutcome = Outcome[LumeFlowStatus]
Publish = Callable[[LumeFlowStatus], Awaitable[None]]


def find_backend(found: Found | None, namespace: str, name: str) -> SchedulingBackend:
    """The named backend, valid and with its work pool ready, or Waiting saying which not."""
    where = f"SchedulingBackend {namespace}/{name}"
    if found is None:
        raise Waiting("BackendNotFound", f"{where} not found; waiting for it")
    backend, _problems = parse_resource(found.body, where)
    if backend is None:
        raise Waiting("BackendInvalid", f"{where} is invalid")
    if not any(
        c.get("type") == "WorkPoolReady" and c.get("status") == "True"
        for c in found.status.get("conditions") or []
    ):
        raise Waiting("BackendNotReady", f"{where}: work pool not ready yet")
    return backend


def _is_whole_number(text: str) -> bool:
    """0, 1, 2, ... in ASCII digits: str.isdigit() alone also takes '²', which int() refuses."""
    return text.isascii() and text.isdigit()


def wanted_run(flow: LumeFlow, status: LumeFlowStatus) -> int | None:
    """The run index to create now, or None: OnChange once per generation, OnRequest per
    new value of the `lume.dev/run-request` annotation (an integer users increase); a
    Schedule's runs come from Prefect's scheduler."""
    policy = flow.spec.run.policy if flow.spec.run else "OnChange"
    last = status.last_run
    generation = flow.metadata.generation
    same_generation = last is not None and last.generation == generation
    if policy == "OnChange":
        return None if same_generation and last is not None and last.index == 0 else 0
    if policy == "OnRequest":
        request = flow.metadata.annotations.get(RUN_REQUEST)
        if request is None or not _is_whole_number(request):
            return None
        index = int(request)
        return None if same_generation and last is not None and last.index == index else index
    return None


def _problem(flow: LumeFlow) -> str | None:
    """What the models cannot see: an OnRequest annotation that is not a number."""
    if flow.spec.run and flow.spec.run.policy == "OnRequest":
        request = flow.metadata.annotations.get(RUN_REQUEST)
        if request is not None and not _is_whole_number(request):
            return f"metadata.annotations.{RUN_REQUEST}: {request!r} is not a whole number"
    return None


def run_started(
    status: LumeFlowStatus, flow_run: FlowRunView, reference: Any
) -> tuple[LumeFlowStatus, Event]:
    """Status and event once a run exists: Running, its reference, no results yet."""
    status.phase, status.last_run, status.results = "Running", reference, None
    set_conditions(status, conditions.progressing("FlowRunning", f"flow run {flow_run.name}"))
    return status, Event("Normal", "FlowRunCreated", f"flow run {flow_run.name} ({flow_run.id})")


async def reconcile_flow(
    body: dict[str, Any],
    status: LumeFlowStatus,
    *,
    backend: Found | None,
    connect: Connect,
    settings: OperatorSettings,
    retry: int = 0,
    publish: Publish | None = None,
) -> FlowOutcome:
    """The deployment in Prefect, and a run when the policy wants one now.

    A first status (Deploying) is published before any Prefect call, so users and GitOps see
    the object taken up even while Prefect is busy with others.
    """
    generation = body["metadata"].get("generation")
    flow, problem = parse_object(body)
    problem = problem or _problem(flow)
    if problem:
        return invalid(status, problem, generation, phase="Failed")
    status.observed_generation = generation
    if conditions.reason_of(status.conditions) == "InvalidSpec":
        status.phase = None  # fixed: start over as a new object would (no run is repeated)
    if not status.phase:
        if publish is not None:
            first = status.model_copy(deep=True)
            first.phase = "Deploying"
            set_conditions(
                first, conditions.progressing("Deploying", "creating the Prefect deployment")
            )
            await publish(first)
        status.phase = "Pending"
    namespace = flow.metadata.namespace
    first_deploy = not status.deployment_id
    try:
        found = find_backend(backend, namespace, flow.spec.backend_ref.name)
        made = flow_deployment(
            flow, found, working_dir=flow.spec.source.path if flow.spec.source else None
        )
        async with connect(found) as prefect:
            deployment_id = await prefect.ensure_deployment(made.spec)
            failpoints.hit("flow-deployment-ensured")
            index = wanted_run(flow, status)
            flow_run = None
            if index is not None:
                flow_run = await prefect.create_flow_run(
                    deployment_id,
                    idempotency_key=idempotency_key(flow.metadata.uid or "", generation, index),
                    tags=made.spec.tags,
                )
                failpoints.hit("flow-run-created")
                reference = run_status(flow_run, index, prefect.ui_url(flow_run.id), generation)
    except (PrefectError, Waiting) as error:
        return prefect_trouble(status, error, retry_in=settings.backoff(retry))
    status.deployment_id = deployment_id
    status.work_pool_name = backend.status.get("workPoolName") if backend else None
    events = []
    if first_deploy:
        events.append(Event("Normal", "Deployed", f"Prefect deployment {deployment_id}"))
        events.extend(Event("Normal", "Note", note) for note in made.notes)
    if flow_run is not None:
        status, event = run_started(status, flow_run, reference)
        return Outcome(status, [*events, event])
    if status.phase in ("Pending", "Deploying"):
        status.phase = "Ready"
    if status.phase in ("Ready", "Completed"):
        updates = conditions.ready("Deployed", f"deployment {deployment_id}")
    elif status.phase == "Running":
        updates = conditions.progressing("FlowRunning", "a flow run is in progress")
    else:
        message = (status.last_run.message if status.last_run else None) or ""
        updates = conditions.failed("FlowRunFailed", message)
    set_conditions(status, updates)
    return Outcome(status, events)


def needs_following(flow: LumeFlow, status: LumeFlowStatus) -> bool:
    """A run to read: one in flight, one whose end is not written yet, or a schedule's."""
    if not status.deployment_id:
        return False
    if flow.spec.run and flow.spec.run.policy == "Schedule":
        return True
    last = status.last_run
    # A run can already be final when its creation is recorded (it ended while the operator
    # was down): it is done only once its phase (and results) are written too.
    done = bool(last and last.state_type in FINAL_STATES) and status.phase in (
        "Completed",
        "Failed",
    )
    return bool(last and last.id) and not done


async def follow_run(
    flow: LumeFlow, status: LumeFlowStatus, prefect: PrefectPort, *, schedule: bool | None = None
) -> FlowOutcome | None:
    """Read the current (or a schedule's latest) run into status; at its end, its outcome and
    result locations. None when nothing changed. `schedule` False: the run in `lastRun`
    even under a Schedule policy (the local runner starts its own)."""
    last = status.last_run
    if schedule is None:
        schedule = bool(flow.spec.run and flow.spec.run.policy == "Schedule")
    if schedule:
        if not status.deployment_id:
            return None
        flow_run = await prefect.latest_run(status.deployment_id)
        if flow_run is None or (
            last is not None and flow_run.id == last.id and last.state_type in FINAL_STATES
        ):
            return None
    else:
        assert last is not None and last.id
        flow_run = await prefect.read_flow_run(last.id)
    reference = run_status(
        flow_run,
        (last.index if last else None) or 0,
        prefect.ui_url(flow_run.id),
        last.generation if last else None,
    )
    changed = last is None or last.id != reference.id or last.state != reference.state
    was_trouble = conditions.reason_of(status.conditions) in TROUBLE
    status.last_run, status.phase = reference, phase_of(reference.state_type)
    if not flow_run.final:
        if not changed and not was_trouble:
            return None
        message = f"flow run {flow_run.name} is {reference.state}"
        set_conditions(status, conditions.progressing("FlowRunning", message))
        return Outcome(status)
    failpoints.hit("flow-follow-final")
    outcome = await run_outcome(prefect, flow_run, flow.spec.results)
    status.phase = outcome.phase
    if outcome.error is None:
        status.results = outcome.results or []
        message = f"flow run {flow_run.name} completed"
        set_conditions(status, conditions.ready(outcome.reason, message))
        return Outcome(status, [Event("Normal", outcome.reason, message)])
    set_conditions(status, conditions.failed(outcome.reason, outcome.error))
    return Outcome(status, [Event("Warning", outcome.reason, outcome.error)])


async def follow_flow(
    body: dict[str, Any],
    status: LumeFlowStatus,
    *,
    backend: Found | None,
    connect: Connect,
) -> FlowOutcome | None:
    """The operator's periodic read of a LumeFlow's run; None when nothing changed."""
    flow, problem = parse_object(body)
    if problem or not needs_following(flow, status):
        return None
    try:
        found = find_backend(backend, flow.metadata.namespace, flow.spec.backend_ref.name)
    except Waiting:
        return None
    try:
        async with connect(found) as prefect:
            return await follow_run(flow, status, prefect)
    except PrefectError as error:
        if conditions.reason_of(status.conditions) == error.reason:
            return None
        return prefect_trouble(status, error, retry_in=None)


def _default_backend(flow: LumeFlow) -> SchedulingBackend:
    """A stand-in for a backend already deleted: the operator's default Prefect API."""
    return SchedulingBackend.model_validate(
        {
            "metadata": {"name": flow.spec.backend_ref.name, "namespace": flow.metadata.namespace},
            "spec": {"type": "process"},
        }
    )


async def delete_flow(
    body: dict[str, Any],
    status: LumeFlowStatus,
    *,
    backend: Found | None,
    connect: Connect,
    settings: OperatorSettings,
    retry: int = 0,
) -> FlowOutcome:
    """Remove the Prefect deployment; the finalizer holds (a retry) until Prefect confirms."""
    flow, problem = parse_object(body)
    if problem or not status.deployment_id:
        return Outcome(status)
    where = f"SchedulingBackend {flow.metadata.namespace}/{flow.spec.backend_ref.name}"
    found, _problems = parse_resource(backend.body, where) if backend else (None, [])
    if found is None:
        # Its backend is gone already (deleted first, or with it): the deployment may still
        # be there, in the operator's default Prefect API if it has one.
        if not settings.default_api_url:
            return Outcome(status)
        found = _default_backend(flow)
    try:
        async with connect(found) as prefect:
            await prefect.delete_deployment(flow.metadata.name, flow.metadata.namespace)
    except PrefectError as error:
        # The finalizer holds, and status says why (a missing Secret, an outage).
        message = f"waiting to delete the Prefect deployment of {flow.key}: {error}"
        set_conditions(status, conditions.progressing(error.reason, message))
        return Outcome(status, retry_in=settings.backoff(retry), retry_message=message)
    return Outcome(status)
