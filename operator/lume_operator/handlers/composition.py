"""FlowOfFlows handlers: deploy the composition's parent flow, start it once per generation,
and follow it step by step into status.

The DAG itself is driven by the parent flow in the backend's runtime (see README); the
operator only creates the parent run (idempotently) and reads what happened.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import kopf

from lume_operator import GROUP
from lume_operator.api.flow import LumeFlow
from lume_operator.api.flowofflows import FlowOfFlows
from lume_operator.api.manifests import parse_resource
from lume_operator.flows.plan import plan_steps, step_flows
from lume_operator.flows.validation import composition_problems
from lume_operator.handlers import failpoints
from lume_operator.handlers.operator import (
    COMPOSITIONS,
    ERROR_BACKOFF,
    FOLLOW_INTERVAL,
    VERSION,
    WaitingFor,
    _guarded,
    _is_outage,
    _reason,
    _status_patch,
    find_backend,
    gateway_for,
    parse,
)
from lume_operator.prefect.gateway import PrefectError
from lume_operator.reconcile import conditions
from lume_operator.reconcile.composition import StepObservation, observe_composition
from lume_operator.reconcile.deploy import composition_deployment, flow_deployment
from lume_operator.reconcile.flowrun import idempotency_key, run_status

# Seconds between the parent flow's reads of a running step.
STEP_POLL_INTERVAL = 2.0
# Steps already seen final, per composition run: their results are read from Prefect once.
_observed: dict[str, dict[str, StepObservation]] = {}


def _flows(flow_index: kopf.Index, namespace: str) -> dict[str, tuple[LumeFlow, dict[str, Any]]]:
    """Valid LumeFlows of a namespace by name, with their status."""
    found: dict[str, tuple[LumeFlow, dict[str, Any]]] = {}
    for (ns, name), entries in flow_index.items():
        if ns != namespace:
            continue
        for entry in entries:
            flow, _problems = parse_resource(entry["body"], f"LumeFlow {ns}/{name}")
            if flow is not None:
                found[name] = (flow, entry["status"])
    return found


@kopf.on.resume(GROUP, VERSION, COMPOSITIONS, backoff=ERROR_BACKOFF)
@kopf.on.create(GROUP, VERSION, COMPOSITIONS, backoff=ERROR_BACKOFF)
@kopf.on.update(GROUP, VERSION, COMPOSITIONS, backoff=ERROR_BACKOFF)
async def composition_reconcile(
    body: kopf.Body,
    status: dict[str, Any],
    patch: kopf.Patch,
    retry: int,
    backend_index: kopf.Index,
    flow_index: kopf.Index,
    **_: Any,
) -> None:
    generation = body.metadata.get("generation")
    fof, invalid = parse(body)
    extra: dict[str, Any] = {"observedGeneration": generation}
    if not invalid:
        assert isinstance(fof, FlowOfFlows)
        known = _flows(flow_index, fof.metadata.namespace)
        problems = [
            (path, message)
            for path, message in composition_problems(fof, {n: f for n, (f, _) in known.items()})
            if not path.endswith(".flowRef.name")  # a LumeFlow not applied yet: waited for
        ]
        if problems:
            invalid = "; ".join(f"{path}: {message}" for path, message in problems)
    if invalid:
        _status_patch(
            patch, status, {**extra, "phase": "Failed"}, conditions.stalled("InvalidSpec", invalid)
        )
        kopf.event(body, type="Warning", reason="InvalidSpec", message=invalid)
        return

    async def start() -> Any:
        flows = _flows(flow_index, fof.metadata.namespace)
        for step in fof.spec.steps:
            if step.flow_ref is None:
                continue
            entry = flows.get(step.flow_ref.name)
            if entry is None:
                raise WaitingFor(
                    "FlowNotFound", f"LumeFlow {step.flow_ref.name!r} not found; waiting for it"
                )
            if not entry[1].get("deploymentId"):
                raise WaitingFor(
                    "FlowNotDeployed", f"LumeFlow {step.flow_ref.name!r} is not deployed yet"
                )
        by_step = step_flows(fof, {name: flow for name, (flow, _) in flows.items()})
        first = by_step[fof.spec.steps[0].name]
        backend_name = (
            fof.spec.backend_ref.name if fof.spec.backend_ref else first.spec.backend_ref.name
        )
        backend = find_backend(backend_index, fof.metadata.namespace, backend_name)
        async with gateway_for(backend) as gateway:
            for step in fof.spec.steps:
                if step.flow is None:
                    continue  # LumeFlows deploy themselves
                inline = by_step[step.name]
                step_backend = find_backend(
                    backend_index, fof.metadata.namespace, inline.spec.backend_ref.name
                )
                made = flow_deployment(
                    inline,
                    step_backend,
                    working_dir=inline.spec.source.path if inline.spec.source else None,
                )
                await gateway.ensure_deployment(made.spec)
            spec = composition_deployment(fof, backend)
            tags = spec.tags
            deployment_id = await gateway.ensure_deployment(spec)
            last = status.get("run") or {}
            if last.get("generation") == generation and last.get("id"):
                return deployment_id, None
            uid = fof.metadata.uid or ""
            flow_run = await gateway.create_flow_run(
                deployment_id,
                idempotency_key=idempotency_key(uid, generation, 0),
                parameters={
                    "steps": plan_steps(fof, by_step, uid),
                    "poll_interval": STEP_POLL_INTERVAL,
                },
                tags=tags,
            )
            failpoints.hit("composition-run-created")
            return deployment_id, run_status(flow_run, 0, gateway.ui_url(flow_run.id), generation)

    deployment_id, reference = await _guarded(patch, status, retry, start, extra)
    extra["deploymentId"] = str(deployment_id)
    if reference is None:
        _status_patch(patch, status, extra, [])
        return
    extra.update(
        phase="Running",
        run=reference.to_wire(),
        steps=[{"name": step.name, "phase": "Pending"} for step in fof.spec.steps],
    )
    _status_patch(
        patch, status, extra, conditions.progressing("FlowRunning", f"flow run {reference.name}")
    )
    kopf.event(body, type="Normal", reason="FlowRunCreated", message=f"flow run {reference.name}")


@kopf.timer(GROUP, VERSION, COMPOSITIONS, interval=FOLLOW_INTERVAL, initial_delay=FOLLOW_INTERVAL)
async def composition_follow(
    body: kopf.Body,
    status: dict[str, Any],
    patch: kopf.Patch,
    backend_index: kopf.Index,
    flow_index: kopf.Index,
    **_: Any,
) -> None:
    """Per-step phases, runs and results, until the parent run ends."""
    fof, invalid = parse(body)
    run = status.get("run") or {}
    if invalid or not run.get("id") or status.get("phase") in ("Completed", "Failed"):
        return
    flows = _flows(flow_index, fof.metadata.namespace)
    by_step = step_flows(fof, {name: flow for name, (flow, _) in flows.items()})
    first = by_step.get(fof.spec.steps[0].name)
    if first is None:
        return
    backend_name = (
        fof.spec.backend_ref.name if fof.spec.backend_ref else first.spec.backend_ref.name
    )
    cache_key = f"{body.metadata.uid}/{run['id']}"
    try:
        backend = find_backend(backend_index, fof.metadata.namespace, backend_name)
        async with gateway_for(backend) as gateway:
            seen = await observe_composition(
                gateway, UUID(run["id"]), by_step, _observed.get(cache_key)
            )
            _observed[cache_key] = seen.steps
            reference = run_status(
                seen.parent, 0, gateway.ui_url(seen.parent.id), run.get("generation")
            )
    except WaitingFor:
        return
    except Exception as error:
        if not _is_outage(error) and not isinstance(error, PrefectError):
            raise
        if _reason(status) != "PrefectUnreachable":
            _status_patch(
                patch,
                status,
                {},
                conditions.progressing("PrefectUnreachable", f"Prefect API unreachable: {error}"),
            )
        return
    steps = []
    for step in fof.spec.steps:
        observed = seen.steps[step.name]
        item: dict[str, Any] = {"name": step.name, "phase": observed.phase}
        if observed.run:
            item["run"] = observed.run.to_wire()
        if observed.results:
            item["results"] = [r.to_wire() for r in observed.results]
        steps.append(item)
    values = {"run": reference.to_wire(), "steps": steps, "phase": seen.phase}
    if not seen.final:
        if steps != status.get("steps") or reference.state != run.get("state"):
            _status_patch(
                patch, status, values, conditions.progressing("FlowRunning", "steps running")
            )
        return
    if seen.phase == "Completed":
        new = conditions.ready("FlowRunCompleted", "every step completed")
        kopf.event(body, type="Normal", reason="FlowRunCompleted", message="every step completed")
    else:
        new = conditions.failed("StepFailed", seen.message)
        kopf.event(body, type="Warning", reason="StepFailed", message=seen.message)
    _status_patch(patch, status, values, new)
    _observed.pop(cache_key, None)
