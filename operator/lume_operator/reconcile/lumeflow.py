"""LumeFlow decisions: deploy, start runs (OnChange, OnRequest) under a concurrency policy,
follow them (deadlines, retries, history), cancel and delete."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any

from lume_operator import GROUP, failpoints
from lume_operator.api.backend import SchedulingBackend
from lume_operator.api.flow import FlowRunStatus, LumeFlow, LumeFlowStatus, RunPolicy
from lume_operator.api.manifests import parse_resource
from lume_operator.backends import tags
from lume_operator.prefect.port import (
    FINAL_STATES,
    FlowRunView,
    PrefectError,
    PrefectPort,
    idempotency_key,
)
from lume_operator.reconcile import conditions
from lume_operator.reconcile.deploy import flow_deployment
from lume_operator.reconcile.flowrun import (
    NoStorage,
    OpenStorage,
    Results,
    phase_of,
    results_condition,
    run_outcome,
    run_status,
    storage_for,
)
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
    status_of,
)
from lume_operator.settings import OperatorSettings

RUN_REQUEST = f"{GROUP}/run-request"
RUN_PARAMETERS = f"{GROUP}/run-parameters"

FlowOutcome = Outcome[LumeFlowStatus]
Publish = Callable[[LumeFlowStatus], Awaitable[None]]
# Starts attempt n of a failed run, `delay` seconds from now.
Retry = Callable[[FlowRunView, int, float], Awaitable[FlowRunView]]

# Why a run ended, by Prefect state type, when it did not complete.
END_REASONS = {
    "FAILED": "FlowRunFailed",
    "CRASHED": "FlowRunCrashed",
    "CANCELLED": "FlowRunCancelled",
}
RETRIED_STATES = frozenset({"FAILED", "CRASHED"})


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


def policy_of(flow: LumeFlow) -> RunPolicy:
    return flow.spec.run or RunPolicy()


def _is_whole_number(text: str) -> bool:
    """0, 1, 2, ... in ASCII digits: str.isdigit() alone also takes '²', which int() refuses."""
    return text.isascii() and text.isdigit()


def history(status: LumeFlowStatus) -> list[FlowRunStatus]:
    """Every run status knows of, newest first (lastRun included, also from older versions
    that kept only lastRun)."""
    runs = list(status.runs or [])
    last = status.last_run
    if last is not None and not any(_same(last, run) for run in runs):
        runs.insert(0, last)
    return runs


def _same(a: FlowRunStatus, b: FlowRunStatus) -> bool:
    if a.id or b.id:
        return a.id == b.id
    return (a.generation, a.index, a.attempt) == (b.generation, b.index, b.attempt)


def record(status: LumeFlowStatus, run: FlowRunStatus, limit: int) -> None:
    """`run` as the newest entry of the history (and lastRun, unless it was skipped)."""
    rest = [entry for entry in history(status) if not _same(entry, run)]
    status.runs = [run, *rest][:limit]
    if run.id:
        status.last_run = run


def last_request(status: LumeFlowStatus) -> int | None:
    if status.last_request is not None:
        return status.last_request
    last = status.last_run  # written before lastRequest existed
    return last.index if last is not None and last.index else None


def wanted_run(flow: LumeFlow, status: LumeFlowStatus) -> int | None:
    """The run index to create now, or None.

    OnChange: once per generation (a run, or a skip, recorded for it counts). OnRequest: for
    each `lume.dev/run-request` value greater than the last one handled; a spec change alone
    starts none. Schedule: Prefect's scheduler starts the runs.
    """
    policy = policy_of(flow).policy
    generation = flow.metadata.generation
    if policy == "OnChange":
        done = any(r.generation == generation and r.index == 0 for r in history(status))
        return None if done else 0
    if policy == "OnRequest":
        request = flow.metadata.annotations.get(RUN_REQUEST)
        if request is None or not _is_whole_number(request):
            return None
        handled = last_request(status)
        return int(request) if handled is None or int(request) > handled else None
    return None


def _problem(flow: LumeFlow) -> str | None:
    """What the models cannot see: an OnRequest annotation that is not a number."""
    if policy_of(flow).policy == "OnRequest":
        request = flow.metadata.annotations.get(RUN_REQUEST)
        if request is not None and not _is_whole_number(request):
            return f"metadata.annotations.{RUN_REQUEST}: {request!r} is not a whole number"
    return None


def run_parameters(flow: LumeFlow) -> dict[str, Any] | None:
    """Parameters of an OnRequest run from `lume.dev/run-parameters` (a JSON object), over
    spec.parameters; ValueError naming the annotation when it is not one."""
    raw = flow.metadata.annotations.get(RUN_PARAMETERS)
    if raw is None or policy_of(flow).policy != "OnRequest":
        return None
    try:
        given = json.loads(raw)
    except ValueError as error:
        raise ValueError(f"metadata.annotations.{RUN_PARAMETERS}: not JSON ({error})") from None
    if not isinstance(given, dict):
        raise ValueError(
            f"metadata.annotations.{RUN_PARAMETERS}: must be a JSON object of parameters, "
            f"not {type(given).__name__}"
        )
    return {**(flow.spec.parameters or {}), **given}


def run_started(
    status: LumeFlowStatus, flow_run: FlowRunView, reference: FlowRunStatus, limit: int = 10
) -> tuple[LumeFlowStatus, Event]:
    """Status and event once a run exists: Running, its reference, no results yet."""
    record(status, reference, limit)
    status.phase, status.results = "Running", None
    set_conditions(status, conditions.progressing("FlowRunning", f"flow run {flow_run.name}"))
    return status, Event("Normal", "FlowRunCreated", f"flow run {flow_run.name} ({flow_run.id})")


async def _admit(
    prefect: PrefectPort,
    flow: LumeFlow,
    status: LumeFlowStatus,
    deployment_id: str,
    key: str,
) -> tuple[bool, list[Event]]:
    """The concurrency policy for a new run: (whether to start it, events)."""
    policy = policy_of(flow)
    if policy.concurrency == "Allow":
        return True, []
    others = [r for r in await prefect.active_runs(deployment_id) if r.idempotency_key != key]
    if not others:
        return True, []
    names = ", ".join(r.name for r in others)
    if policy.concurrency == "Forbid":
        return False, [Event("Normal", "RunSkipped", f"a run is in flight ({names}): skipped")]
    for other in others:
        await prefect.cancel_flow_run(other.id)
        for entry in history(status):
            if entry.id == other.id:
                entry.reason = "Replaced"
    failpoints.hit("flow-runs-replaced")
    return True, [Event("Normal", "RunReplaced", f"cancelled {names} for the new run")]


def first_status(body: dict[str, Any], status: LumeFlowStatus) -> LumeFlowStatus | None:
    """`Deploying` for a valid object with no phase yet, else None (an invalid spec's status
    is the handler's, with its event).

    Written on the watch event that makes kopf add its finalizer, in the same handling cycle:
    kopf runs the create handler only on the event that patch brings back.
    """
    if status.phase or body["metadata"].get("deletionTimestamp"):
        return None
    flow, problem = parse_object(body)
    if problem or _problem(flow):
        return None
    first = _deploying(status)
    first.observed_generation = body["metadata"].get("generation")
    return first


def _deploying(status: LumeFlowStatus) -> LumeFlowStatus:
    first = status.model_copy(deep=True)
    first.phase = "Deploying"
    set_conditions(first, conditions.progressing("Deploying", "creating the Prefect deployment"))
    return first


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
    if conditions.reason_of(status.conditions) in ("InvalidSpec", "InvalidRunParameters"):
        status.phase = None  # fixed: start over as a new object would (no run is repeated)
    if not status.phase:
        if publish is not None:
            await publish(_deploying(status))
        status.phase = "Pending"
    namespace, policy = flow.metadata.namespace, policy_of(flow)
    first_deploy = not status.deployment_id
    events: list[Event] = []
    flow_run = None
    try:
        found = find_backend(backend, namespace, flow.spec.backend_ref.name)
        available = results_condition(found)
        set_conditions(status, [available])
        if first_deploy and available["status"] == "False":
            events.append(Event("Warning", available["reason"], available["message"]))
        try:
            made = flow_deployment(
                flow, found, working_dir=flow.spec.source.path if flow.spec.source else None
            )
        except ValueError as error:  # an override this backend refuses (a hostPath volume)
            return invalid(status, str(error), generation, phase="Failed")
        async with connect(found) as prefect:
            deployment_id = await prefect.ensure_deployment(made.spec, fresh=first_deploy)
            failpoints.hit("flow-deployment-ensured")
            status.deployment_id = deployment_id
            if first_deploy:
                events.append(Event("Normal", "Deployed", f"Prefect deployment {deployment_id}"))
                events.extend(Event("Normal", "Note", note) for note in made.notes)
            index = wanted_run(flow, status)
            if index is not None:
                if policy.policy == "OnRequest":
                    status.last_request = index
                try:
                    parameters = run_parameters(flow)
                except ValueError as error:
                    message = str(error)
                    skip = _skipped(index, generation, "InvalidRunParameters")
                    record(status, skip, policy.history_limit)
                    set_conditions(status, conditions.stalled("InvalidRunParameters", message))
                    events.append(Event("Warning", "InvalidRunParameters", message))
                    return Outcome(status, events)
                key = idempotency_key(flow.metadata.uid or "", generation, index)
                start, admitted = await _admit(prefect, flow, status, deployment_id, key)
                events.extend(admitted)
                if not start:
                    skip = _skipped(index, generation, "ConcurrencyForbid")
                    record(status, skip, policy.history_limit)
                else:
                    flow_run = await prefect.create_flow_run(
                        deployment_id,
                        idempotency_key=key,
                        tags=made.spec.tags,
                        parameters=parameters,
                    )
                    failpoints.hit("flow-run-created")
                    url = prefect.ui_url(flow_run.id)
                    reference = run_status(flow_run, index, url, generation)
                    reference.attempt = 0
    except (PrefectError, Waiting) as error:
        outcome = prefect_trouble(status, error, retry_in=settings.backoff(retry))
        outcome.events[:0] = events
        return outcome
    status.work_pool_name = backend.status.get("workPoolName") if backend else None
    if flow_run is not None:
        status, event = run_started(status, flow_run, reference, policy.history_limit)
        return Outcome(status, [*events, event])
    if status.phase in ("Pending", "Deploying"):
        status.phase = "Ready"
    set_conditions(status, _conditions_for(status))
    return Outcome(status, events)


def _skipped(index: int, generation: int | None, reason: str) -> FlowRunStatus:
    return FlowRunStatus(index=index, generation=generation, state="Skipped", reason=reason)


def _conditions_for(status: LumeFlowStatus) -> list[dict[str, Any]]:
    """Conditions that follow from the phase when nothing new happened."""
    if status.phase in ("Ready", "Completed"):
        return conditions.ready("Deployed", f"deployment {status.deployment_id}")
    if status.phase == "Running":
        return conditions.progressing("FlowRunning", "a flow run is in progress")
    last = status.last_run
    reason = (last.reason if last else None) or END_REASONS.get(
        (last.state_type if last else None) or "", "FlowRunFailed"
    )
    return conditions.failed(reason, (last.message if last else None) or "")


def needs_following(flow: LumeFlow, status: LumeFlowStatus) -> bool:
    """A run to read: one in flight, one whose end is not written yet, or a schedule's."""
    return _follows(policy_of(flow).policy, status)


def _follows(policy: str, status: LumeFlowStatus) -> bool:
    if not status.deployment_id:
        return False
    if policy == "Schedule":
        return True
    in_flight = any(r.id and r.state_type not in FINAL_STATES for r in history(status))
    last = status.last_run
    return in_flight or (bool(last and last.id) and not end_written(status))


def wants_following(body: Mapping[str, Any], status: Mapping[str, Any]) -> bool:
    """`needs_following` on the object as kopf has it, for the follow timer's filter: kopf
    runs a timer only while this holds, so a thousand LumeFlows with nothing in flight cost no
    timer calls (each would otherwise parse its manifest every interval). Called on every
    watch event of every LumeFlow: the status is parsed, not the whole manifest."""
    run = (body.get("spec") or {}).get("run") or {}
    policy = run.get("policy") if isinstance(run, Mapping) else None
    parsed = status_of(LumeFlowStatus, dict(status or {}))  # as the timer's handler reads it
    return _follows(policy if isinstance(policy, str) else RunPolicy().policy, parsed)


def end_written(status: LumeFlowStatus) -> bool:
    """Whether lastRun's end is decided: a run can already be final when its creation is
    recorded (it ended while the operator was down); it is done only once its phase (and
    results) are written too."""
    last = status.last_run
    return bool(last and last.state_type in FINAL_STATES) and status.phase in (
        "Completed",
        "Failed",
    )


def _elapsed(since: str | None, now: datetime) -> float | None:
    if not since:
        return None
    return (now - datetime.fromisoformat(since)).total_seconds()


def _refresh(entry: FlowRunStatus, view: FlowRunView, url: str) -> FlowRunStatus:
    """A history entry with what Prefect says now; what lume-operator decided is kept."""
    fresh = run_status(view, entry.index or 0, url, entry.generation)
    fresh.attempt, fresh.reason, fresh.results = entry.attempt, entry.reason, entry.results
    fresh.created_time = fresh.created_time or entry.created_time
    return fresh


async def follow_run(
    flow: LumeFlow,
    status: LumeFlowStatus,
    prefect: PrefectPort,
    *,
    now: datetime,
    schedule: bool | None = None,
    retry_run: Retry | None = None,
    grace: float = 60.0,
    results: Callable[[], Awaitable[Results]] | None = None,
) -> FlowOutcome | None:
    """Read the runs in flight into status (one request); the current one past its deadline
    is cancelled (by force once `grace` seconds more have passed), at its end its outcome,
    result locations and, when it failed and retries are left, the next attempt. None when
    nothing changed.

    `schedule` False: the run in `lastRun` even under a Schedule policy (the local runner
    starts its own); without `retry_run`, no retries. `results` gives where the backend's
    results are read, asked only at a run's end (None: through Prefect, its local default).
    """
    policy = policy_of(flow)
    if schedule is None:
        schedule = policy.policy == "Schedule"
    before = [entry.model_dump() for entry in history(status)]
    if schedule and status.deployment_id:
        latest = await prefect.latest_run(status.deployment_id)
        if latest is not None and not any(r.id == latest.id for r in history(status)):
            last = status.last_run
            started = run_status(
                latest, 0, prefect.ui_url(latest.id), last.generation if last else None
            )
            record(status, started, policy.history_limit)
            status.phase = "Running"  # a new run: the last one's end is decided already
    last = status.last_run
    decided = end_written(status)
    entries = history(status)
    open_ids = [r.id for r in entries if r.id and r.state_type not in FINAL_STATES]
    if last and last.id and not decided and last.id not in open_ids:
        open_ids.append(last.id)  # final, but its end not written yet
    views = {view.id: view for view in await prefect.read_flow_runs(open_ids)}
    entries = [
        _refresh(entry, views[entry.id], prefect.ui_url(entry.id)) if entry.id in views else entry
        for entry in entries
    ]
    status.runs = entries[: policy.history_limit]
    current_entry = next((r for r in entries if last and r.id and r.id == last.id), last)
    status.last_run = current_entry
    changed = before != [entry.model_dump() for entry in history(status)]
    current = views.get(current_entry.id) if current_entry and current_entry.id else None
    if current is None or decided:
        return Outcome(status) if changed else None
    was_trouble = conditions.reason_of(status.conditions) in TROUBLE
    if not current.final:
        return await _in_flight(
            policy, status, current_entry, current, prefect, now, grace, changed or was_trouble
        )
    if current_entry.reason == "DeadlineExceeded":
        status.phase = "Failed"
        message = f"flow run {current.name} passed its deadline of {policy.timeout_seconds} s"
        set_conditions(status, conditions.failed("DeadlineExceeded", message))
        return Outcome(status)
    failpoints.hit("flow-follow-final")
    storage = await results() if results is not None else None
    outcome = await run_outcome(prefect, current, flow.spec.results, storage)
    if outcome.error is None:
        status.phase, status.results = "Completed", outcome.results or []
        current_entry.results = outcome.results or None
        message = f"flow run {current.name} completed"
        if isinstance(storage, NoStorage):
            message += f"; its results were not read: {storage.message}"
        set_conditions(status, conditions.ready(outcome.reason, message))
        return Outcome(status, [Event("Normal", outcome.reason, message)])
    state_type = current.state.type if current.state else ""
    reason = (
        outcome.reason
        if outcome.reason == "ResultsInvalid"
        else END_REASONS.get(state_type, outcome.reason)
    )
    attempt = current_entry.attempt or 0
    if retry_run is not None and state_type in RETRIED_STATES and attempt < policy.retries:
        failpoints.hit("flow-retry-decided")
        delay = float(policy.retry_delay_seconds)
        next_run = await retry_run(current, attempt + 1, delay)
        url = prefect.ui_url(next_run.id)
        reference = run_status(next_run, current_entry.index or 0, url, current_entry.generation)
        reference.attempt = attempt + 1
        record(status, reference, policy.history_limit)
        status.phase, status.results = "Running", None
        ended = current.state.name if current.state else "without a state"
        message = (
            f"flow run {current.name} ended {ended}: {outcome.error}; retry {attempt + 1} of "
            f"{policy.retries} in {delay:g} s ({next_run.name})"
        )
        set_conditions(status, conditions.progressing("Retrying", message))
        return Outcome(status, [Event("Warning", "Retrying", message)])
    status.phase = "Failed"
    current_entry.reason, current_entry.message = reason, outcome.error
    set_conditions(status, conditions.failed(reason, outcome.error))
    return Outcome(status, [Event("Warning", reason, outcome.error)])


async def _in_flight(
    policy: RunPolicy,
    status: LumeFlowStatus,
    entry: FlowRunStatus,
    current: FlowRunView,
    prefect: PrefectPort,
    now: datetime,
    grace: float,
    changed: bool,
) -> FlowOutcome | None:
    """A run not ended yet: its deadline, else its state."""
    # The deadline runs from when the run was to start (a delayed retry starts late).
    since = max(filter(None, [current.start_time, current.expected_start_time]), default=None)
    age = _elapsed(since or current.created_time, now)
    past = bool(policy.timeout_seconds and age is not None and age > policy.timeout_seconds)
    if entry.reason == "DeadlineExceeded":
        # Cancelling: its worker stops it; one that does not is marked Cancelled by force.
        if past and age - policy.timeout_seconds > grace:
            await prefect.cancel_flow_run(current.id, force=True)
        return Outcome(status) if changed else None
    if past:
        await prefect.cancel_flow_run(current.id)
        entry.reason = "DeadlineExceeded"
        message = (
            f"flow run {current.name} passed its deadline of {policy.timeout_seconds} s "
            "and was cancelled"
        )
        status.phase = "Failed"
        set_conditions(status, conditions.failed("DeadlineExceeded", message))
        return Outcome(status, [Event("Warning", "DeadlineExceeded", message)])
    status.phase = phase_of(current.state.type if current.state else None)
    if not changed:
        return None
    message = f"flow run {current.name} is {entry.state}"
    set_conditions(status, conditions.progressing("FlowRunning", message))
    return Outcome(status)


async def follow_flow(
    body: dict[str, Any],
    status: LumeFlowStatus,
    *,
    backend: Found | None,
    connect: Connect,
    now: datetime,
    grace: float = 60.0,
    open_storage: OpenStorage | None = None,
) -> FlowOutcome | None:
    """The operator's periodic read of a LumeFlow's runs; None when nothing changed. A
    finished run's results are read where its backend keeps them (`open_storage`)."""
    flow, problem = parse_object(body)
    if problem or not needs_following(flow, status):
        return None
    try:
        found = find_backend(backend, flow.metadata.namespace, flow.spec.backend_ref.name)
    except Waiting:
        return None
    try:
        async with connect(found) as prefect:

            async def retry_run(failed: FlowRunView, attempt: int, delay: float) -> FlowRunView:
                # Keyed by the run it retries: deciding again (after a restart) finds the same
                # run, and each of a schedule's runs gets its own retries.
                key = idempotency_key(flow.metadata.uid or "", 0, 0, f"retry-of-{failed.id}")
                assert status.deployment_id
                return await prefect.create_flow_run(
                    status.deployment_id,
                    idempotency_key=key,
                    tags=tags(flow, found),
                    parameters=failed.parameters or None,  # as the run it retries had them
                    start_in=delay or None,
                )

            async def results() -> Results:
                return await storage_for(found, open_storage)

            return await follow_run(
                flow,
                status,
                prefect,
                now=now,
                retry_run=retry_run,
                grace=grace,
                results=results,
            )
    except PrefectError as error:
        if conditions.reason_of(status.conditions) == error.reason:
            return None
        return prefect_trouble(status, error, retry_in=None)


def backend_for_deletion(
    found: Found | None, namespace: str, name: str, settings: OperatorSettings
) -> SchedulingBackend | None:
    """The backend whose Prefect API a deletion goes to, ready or not. One already deleted
    (first, or with it) is stood in for by the operator's default API, where the objects may
    still be; None when there is none."""
    where = f"SchedulingBackend {namespace}/{name}"
    backend, _problems = parse_resource(found.body, where) if found else (None, [])
    if backend is None and settings.default_api_url:
        backend = SchedulingBackend.model_validate(
            {"metadata": {"name": name, "namespace": namespace}, "spec": {"type": "process"}}
        )
    return backend


async def delete_flow(
    body: dict[str, Any],
    status: LumeFlowStatus,
    *,
    backend: Found | None,
    connect: Connect,
    settings: OperatorSettings,
    retry: int = 0,
    waited: float = 0.0,
) -> FlowOutcome:
    """Cancel the runs in flight, then remove the Prefect deployment; the finalizer holds (a
    retry) until Prefect confirms. Runs still not stopped by their worker after
    `settings.cancel_grace` seconds (`waited` so far) are marked Cancelled by force."""
    flow, problem = parse_object(body)
    if problem or not status.deployment_id:
        return Outcome(status)
    if flow.spec.deletion_policy == "Orphan":
        return orphaned(status, f"deployment {status.deployment_id} and its runs")
    namespace, name = flow.metadata.namespace, flow.spec.backend_ref.name
    found = backend_for_deletion(backend, namespace, name, settings)
    if found is None:
        return Outcome(status)
    force = waited >= settings.cancel_grace
    try:
        async with connect(found) as prefect:
            active = await prefect.active_runs(status.deployment_id)
            for run in active:
                await prefect.cancel_flow_run(run.id, force=force)
            failpoints.hit("flow-runs-cancelled")
            still = [
                run.name
                for run in await prefect.read_flow_runs([run.id for run in active])
                if not run.final
            ]
            if still:
                message = f"waiting for {', '.join(still)} to stop before deleting"
                set_conditions(status, conditions.progressing("CancellingRuns", message))
                return Outcome(status, retry_in=2.0, retry_message=message)
            await prefect.delete_deployment(flow.metadata.name, flow.metadata.namespace)
    except PrefectError as error:
        return held(status, error, f"the Prefect deployment of {flow.key}", settings, retry)
    return Outcome(status)
