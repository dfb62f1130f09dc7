"""SchedulingBackend decisions: the work pool, the agent, readiness, deletion."""

from __future__ import annotations

import copy
from typing import Any

from lume_operator import failpoints
from lume_operator.api.backend import SchedulingBackend, SchedulingBackendStatus
from lume_operator.backends import get_backend
from lume_operator.backends.agent import agent_name, agent_objects
from lume_operator.backends.kubernetes import patch_job_template
from lume_operator.prefect.port import (
    PrefectError,
    PrefectNotConfigured,
    PrefectPort,
    pool_owner,
)
from lume_operator.reconcile import conditions
from lume_operator.reconcile.outcome import (
    TROUBLE,
    Cluster,
    Connect,
    Event,
    NameTaken,
    Outcome,
    held,
    invalid,
    orphaned,
    parse_object,
    prefect_trouble,
    set_conditions,
)
from lume_operator.results.storage import BLOCK_TYPE, block_fields
from lume_operator.settings import OperatorSettings

BackendOutcome = Outcome[SchedulingBackendStatus]


def owned(obj: dict[str, Any], owner: dict[str, Any]) -> dict[str, Any]:
    """`obj` with `owner` as its controller, so Kubernetes deletes it with the owner."""
    meta = owner["metadata"]
    reference = {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": meta["name"],
        "uid": meta.get("uid"),
        "controller": True,
        "blockOwnerDeletion": True,
    }
    obj = copy.deepcopy(obj)
    obj["metadata"].setdefault("namespace", meta.get("namespace"))
    obj["metadata"]["ownerReferences"] = [reference]
    return obj


def api_url_of(backend: SchedulingBackend, settings: OperatorSettings) -> str | None:
    prefect = backend.spec.prefect
    return (prefect.api_url if prefect else None) or settings.default_api_url


def _agent_conditions(
    status: SchedulingBackendStatus, ready: int, wanted: int
) -> list[dict[str, Any]]:
    agent_ok = ready >= wanted
    overall = (
        conditions.ready("Reconciled")
        if agent_ok
        else conditions.progressing("AgentNotReady", f"{ready} of {wanted} agent replicas ready")
    )
    agent = conditions.condition(
        "AgentReady",
        agent_ok,
        "AgentReady" if agent_ok else "AgentNotReady",
        f"{ready}/{wanted} replicas ready",
    )
    return [*overall, agent]


def pool_template(backend: SchedulingBackend, backend_type: str) -> dict[str, Any]:
    """The pool's base job template: the backend type's, with the backend's jobTemplatePatch
    (kubernetes only; the local runner runs the same backend as processes, without it).
    Raises ValueError naming the field when the patch cannot be used."""
    template = get_backend(backend_type).base_job_template()
    patch = backend.spec.job_template_patch
    if patch is not None and backend_type == "kubernetes":
        template = patch_job_template(template, patch)
    return template


async def ensure_pool(
    prefect: PrefectPort, backend: SchedulingBackend, backend_type: str | None = None
) -> str:
    """The backend's work pool as its spec says (type, template, adoption, limit, queues),
    marked with its uid when it has one; `backend_type` overrides its type (the local runner
    runs everything as processes)."""
    runner = get_backend(backend_type or backend.spec.type)
    work_pool = backend.spec.work_pool
    return await prefect.ensure_work_pool(
        backend.work_pool_name,
        runner.work_pool_type,
        pool_template(backend, runner.type),
        adopt=bool(work_pool and work_pool.adopt),
        concurrency_limit=work_pool.concurrency_limit if work_pool else None,
        queues=backend.spec.labels or [],
        owner=pool_owner(backend.metadata.uid),
    )


async def ensure_storage(
    prefect: PrefectPort, backend: SchedulingBackend, status: SchedulingBackendStatus
) -> None:
    """An object store's block (where Prefect writes the runs' return values: base path and
    fsspec options, never a credential), or none: one left from an earlier spec is deleted."""
    storage = backend.spec.result_storage
    if storage and storage.object_store:
        await prefect.ensure_result_storage(backend.result_block_name, block_fields(storage))
        status.result_storage_block = f"{BLOCK_TYPE}/{backend.result_block_name}"
    elif status.result_storage_block:
        await prefect.delete_result_storage(status.result_storage_block.partition("/")[2])
        status.result_storage_block = None


def wanted_replicas(backend: SchedulingBackend) -> int:
    return backend.spec.agent.replicas if backend.spec.agent else 1


async def reconcile_backend(
    body: dict[str, Any],
    status: SchedulingBackendStatus,
    *,
    connect: Connect,
    cluster: Cluster,
    settings: OperatorSettings,
    retry: int = 0,
) -> BackendOutcome:
    """Work pool in Prefect, agent objects in the cluster, then how ready both are."""
    generation = body["metadata"].get("generation")
    backend, problem = parse_object(body)
    if problem:
        return invalid(status, problem, generation)
    try:
        pool_template(backend, backend.spec.type)
    except ValueError as error:  # a jobTemplatePatch that cannot be used
        return invalid(status, str(error), generation)
    pool = backend.work_pool_name
    status.observed_generation, status.work_pool_name = generation, pool
    first_time = not status.work_pool_id
    try:
        async with connect(backend) as prefect:
            pool_id = await ensure_pool(prefect, backend)
            await ensure_storage(prefect, backend, status)
    except PrefectError as error:
        return prefect_trouble(status, error, retry_in=settings.backoff(retry))
    failpoints.hit("backend-pool-ensured")
    try:
        for obj in agent_objects(backend, api_url_of(backend, settings), settings.agent_image):
            await cluster.apply(owned(obj, body))
    except NameTaken as taken:
        message = str(taken)
        set_conditions(status, conditions.stalled("NameTaken", message))
        return Outcome(status, [Event("Warning", "NameTaken", message)])
    failpoints.hit("backend-agent-applied")
    name = agent_name(backend)
    ready = await cluster.ready_replicas(backend.metadata.namespace, name) or 0
    status.work_pool_id, status.agent_deployment, status.agent_ready_replicas = pool_id, name, ready
    set_conditions(
        status,
        [
            *_agent_conditions(status, ready, wanted_replicas(backend)),
            conditions.condition("WorkPoolReady", True, "WorkPoolReady", f"work pool {pool!r}"),
        ],
    )
    events = [Event("Normal", "WorkPoolReady", f"work pool {pool!r} ready")] if first_time else []
    return Outcome(status, events)


async def check_backend(
    body: dict[str, Any],
    status: SchedulingBackendStatus,
    *,
    connect: Connect,
    cluster: Cluster,
) -> BackendOutcome | None:
    """Agent readiness and Prefect reachability, so `Ready` follows both without a spec
    change; None when nothing changed."""
    backend, problem = parse_object(body)
    if problem or not status.work_pool_id:
        return None
    was_ready = conditions.is_true(status.conditions, "Ready")
    try:
        async with connect(backend) as prefect:
            await prefect.health()
    except PrefectError as error:
        if not was_ready and conditions.reason_of(status.conditions) == error.reason:
            return None
        if isinstance(error, PrefectNotConfigured):
            return prefect_trouble(status, error, retry_in=None)
        outcome = prefect_trouble(status, error, retry_in=None)
        if not outcome.events:  # a refusal brings its own event
            message = conditions.message_of(outcome.status.conditions)
            outcome.events.append(Event("Warning", error.reason, message))
        return outcome
    ready = await cluster.ready_replicas(backend.metadata.namespace, agent_name(backend)) or 0
    agent_ok = ready >= wanted_replicas(backend)
    was_trouble = conditions.reason_of(status.conditions) in TROUBLE
    if status.agent_ready_replicas == ready and was_ready == agent_ok and not was_trouble:
        return None
    status.agent_ready_replicas = ready
    set_conditions(status, _agent_conditions(status, ready, wanted_replicas(backend)))
    events = (
        [Event("Normal", "Ready", "work pool and agent ready")]
        if agent_ok and not was_ready
        else []
    )
    return Outcome(status, events)


async def delete_backend(
    body: dict[str, Any],
    status: SchedulingBackendStatus,
    *,
    connect: Connect,
    settings: OperatorSettings,
    retry: int = 0,
) -> BackendOutcome:
    """Remove the work pool we created (never an adopted one) and the result storage block;
    the agent goes by ownership. The finalizer holds (a retry) until Prefect confirms."""
    backend, problem = parse_object(body)
    adopted = bool(backend and backend.spec.work_pool and backend.spec.work_pool.adopt)
    if problem or (adopted and not status.result_storage_block):
        return Outcome(status)
    if backend.spec.deletion_policy == "Orphan":
        return orphaned(status, f"work pool {backend.work_pool_name!r}")
    try:
        async with connect(backend) as prefect:
            if status.result_storage_block:
                await prefect.delete_result_storage(status.result_storage_block.partition("/")[2])
            if not adopted:
                await prefect.delete_work_pool(
                    backend.work_pool_name, owner=pool_owner(backend.metadata.uid)
                )
    except PrefectNotConfigured as error:
        if error.reason == "NoPrefectAPI":
            return Outcome(status)  # no Prefect API was ever configured: nothing was created
        message = (
            f"cannot delete work pool {backend.work_pool_name!r}: {error} (restore it, or set "
            "spec.deletionPolicy: Orphan)"
        )
        set_conditions(status, conditions.progressing(error.reason, message))
        return Outcome(status, retry_in=settings.backoff(retry), retry_message=message)
    except PrefectError as error:
        return held(status, error, f"work pool {backend.work_pool_name!r}", settings, retry)
    return Outcome(status)
