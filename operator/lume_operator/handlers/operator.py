"""The kopf adapter: SchedulingBackend, LumeFlow and FlowOfFlows handlers.

Each handler validates with the same models the CLI uses (an invalid spec ends `Stalled` with
zero Prefect calls), builds deployments with the same `reconcile` code as the local runner, and
writes references (ids, states, result locations) into status. Prefect outages turn `Ready`
False with reason `PrefectUnreachable` and are retried with bounded backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

import httpx
import kopf

from lume_operator import GROUP
from lume_operator.api.backend import SchedulingBackend
from lume_operator.api.flow import LumeFlow
from lume_operator.api.manifests import parse_resource
from lume_operator.backends import get_backend
from lume_operator.backends.agent import agent_name, agent_objects
from lume_operator.handlers import failpoints
from lume_operator.handlers.kube import Kube, SecretMissing, load_config
from lume_operator.prefect.gateway import PrefectError, PrefectGateway
from lume_operator.reconcile import conditions
from lume_operator.reconcile.deploy import flow_deployment
from lume_operator.reconcile.flowrun import (
    FINAL_STATES,
    idempotency_key,
    phase_of,
    run_outcome,
    run_status,
)

VERSION = "v1alpha1"
BACKENDS, FLOWS, COMPOSITIONS = "schedulingbackends", "lumeflows", "flowofflows"
RUN_REQUEST = f"{GROUP}/run-request"
FOLLOW_INTERVAL = float(os.environ.get("LUME_OPERATOR_FOLLOW_INTERVAL", "5"))
MAX_BACKOFF = 60.0
# Retry delay after an unexpected error (a bug, a refused Kubernetes call): short, not kopf's 60 s.
ERROR_BACKOFF = 10.0

_kube: Kube | None = None


def kube() -> Kube:
    """The Kubernetes client, configured on first use (in-cluster, or $KUBECONFIG)."""
    global _kube
    if _kube is None:
        load_config()
        _kube = Kube()
    return _kube


class WaitingFor(Exception):
    """Something the resource needs is not there yet; retried, not an error of the spec."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def backoff(retry: int) -> float:
    """1, 2, 4, ... seconds, at most a minute."""
    return min(MAX_BACKOFF, 2.0 ** min(retry, 10))


def _spec_of(body: kopf.Body) -> dict[str, Any]:
    """The object without its status: status is ours, and not part of what users declare."""
    raw = copy.deepcopy(dict(body))
    raw.pop("status", None)
    return raw


def parse(body: kopf.Body) -> tuple[Any, str | None]:
    """The resource as our model, or the message naming every bad field."""
    source = f"{body.get('kind')} {body.metadata.namespace}/{body.metadata.name}"
    resource, problems = parse_resource(_spec_of(body), source)
    if problems:
        return None, "; ".join(f"{p.path}: {p.message}" if p.path else p.message for p in problems)
    return resource, None


def _status_patch(
    patch: kopf.Patch, status: dict[str, Any], values: dict[str, Any], new: list[dict[str, Any]]
) -> None:
    for key, value in values.items():
        patch.status[key] = value
    patch.status["conditions"] = conditions.merge(status.get("conditions"), *new)


def _is_outage(error: BaseException) -> bool:
    return isinstance(error, httpx.HTTPError | OSError | TimeoutError)


def default_api_url() -> str | None:
    return os.environ.get("LUME_PREFECT_API_URL") or os.environ.get("PREFECT_API_URL")


@contextlib.asynccontextmanager
async def gateway_for(backend: SchedulingBackend) -> AsyncIterator[PrefectGateway]:
    """The Prefect API of a backend, its key read from the Secret it names (never logged)."""
    prefect = backend.spec.prefect
    api_url = (prefect.api_url if prefect else None) or default_api_url()
    if not api_url:
        raise WaitingFor(
            "NoPrefectAPI",
            "no Prefect API: set spec.prefect.apiUrl or the operator's PREFECT_API_URL",
        )
    api_key = None
    if prefect and prefect.api_key_secret_ref:
        ref = prefect.api_key_secret_ref
        try:
            api_key = await kube().secret_value(backend.metadata.namespace, ref.name, ref.key)
        except SecretMissing as error:
            raise WaitingFor("SecretNotFound", str(error)) from None
    async with (
        _prefect_slot(),
        PrefectGateway.connect(api_url=api_url, api_key=api_key, timeout=10.0) as gateway,
    ):
        yield gateway


# Handlers of many objects at once (an apply of hundreds of LumeFlows) would otherwise flood
# Prefect with concurrent calls until they time out and retry; a slot is taken before the
# timeouts start. One semaphore per event loop (tests run several operators, one loop each).
PREFECT_CONCURRENCY = int(os.environ.get("LUME_OPERATOR_PREFECT_CONCURRENCY", "8"))
_slots: dict[int, asyncio.Semaphore] = {}


@contextlib.asynccontextmanager
async def _prefect_slot() -> AsyncIterator[None]:
    loop = asyncio.get_running_loop()
    slots = _slots.get(id(loop))
    if slots is None:
        slots = _slots[id(loop)] = asyncio.Semaphore(PREFECT_CONCURRENCY)
    async with slots:
        yield


async def _guarded(
    patch: kopf.Patch, status: dict[str, Any], retry: int, action: Any, extra: dict[str, Any]
) -> Any:
    """Run `action`; turn waiting and outages into status and a retry with bounded backoff."""
    try:
        return await action()
    except WaitingFor as waiting:
        _status_patch(patch, status, extra, conditions.progressing(waiting.reason, str(waiting)))
        raise kopf.TemporaryError(str(waiting), delay=backoff(retry)) from None
    except PrefectError as error:
        _status_patch(patch, status, extra, conditions.progressing("PrefectRejected", str(error)))
        raise kopf.TemporaryError(str(error), delay=backoff(retry)) from None
    except Exception as error:
        if not _is_outage(error):
            raise
        message = f"Prefect API unreachable: {type(error).__name__}: {error}"
        _status_patch(patch, status, extra, conditions.progressing("PrefectUnreachable", message))
        raise kopf.TemporaryError(message, delay=backoff(retry)) from None


async def announce(body: kopf.Body, plural: str, status: dict[str, Any], generation: Any) -> None:
    """A first status (Deploying, Reconciling) at once, before any Prefect call, so users and
    GitOps tools see the object taken up even while Prefect is slow or busy with others."""
    first = {
        "phase": "Deploying",
        "observedGeneration": generation,
        "conditions": conditions.merge(
            status.get("conditions"),
            *conditions.progressing("Deploying", "creating the Prefect deployment"),
        ),
    }
    try:
        await kube().patch_own_status(plural, body.metadata.namespace, body.metadata.name, first)
    except Exception as error:  # only a courtesy: the handler's own patch follows anyway
        logging.getLogger(__name__).warning("could not write the first status: %s", error)


# ---- SchedulingBackend ------------------------------------------------------------------------


@kopf.index(GROUP, VERSION, BACKENDS)
def backend_index(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    """Backends by (namespace, name), with their status, so flows look them up without calls."""
    return {(namespace, name): {"body": _spec_of(body), "status": dict(body.get("status") or {})}}


def _condition(status: dict[str, Any], type_: str) -> bool:
    return any(
        c.get("type") == type_ and c.get("status") == "True" for c in status.get("conditions") or []
    )


@kopf.on.resume(GROUP, VERSION, BACKENDS, backoff=ERROR_BACKOFF)
@kopf.on.create(GROUP, VERSION, BACKENDS, backoff=ERROR_BACKOFF)
@kopf.on.update(GROUP, VERSION, BACKENDS, backoff=ERROR_BACKOFF)
async def backend_reconcile(
    body: kopf.Body, status: dict[str, Any], patch: kopf.Patch, retry: int, **_: Any
) -> None:
    generation = body.metadata.get("generation")
    backend, invalid = parse(body)
    if invalid:
        _status_patch(
            patch,
            status,
            {"observedGeneration": generation},
            conditions.stalled("InvalidSpec", invalid),
        )
        kopf.event(body, type="Warning", reason="InvalidSpec", message=invalid)
        return
    runner = get_backend(backend.spec.type)
    pool = backend.work_pool_name

    async def ensure() -> Any:
        async with gateway_for(backend) as gateway:
            work_pool = backend.spec.work_pool
            return await gateway.ensure_work_pool(
                pool,
                runner.work_pool_type,
                runner.base_job_template(),
                adopt=bool(work_pool and work_pool.adopt),
                concurrency_limit=work_pool.concurrency_limit if work_pool else None,
                queues=backend.spec.labels or [],
            )

    extra = {"observedGeneration": generation, "workPoolName": pool}
    pool_id = await _guarded(patch, status, retry, ensure, extra)
    failpoints.hit("backend-pool-ensured")
    prefect = backend.spec.prefect
    api_url = (prefect.api_url if prefect else None) or default_api_url()
    for obj in agent_objects(backend, api_url):
        kopf.adopt(obj, owner=body)
        await kube().apply(obj)
    failpoints.hit("backend-agent-applied")
    ready = await kube().ready_replicas(backend.metadata.namespace, agent_name(backend)) or 0
    wanted = backend.spec.agent.replicas if backend.spec.agent else 1
    agent_ok = ready >= wanted
    extra.update(
        workPoolId=str(pool_id),
        agentDeployment=agent_name(backend),
        agentReadyReplicas=ready,
    )
    new = (
        conditions.ready("Reconciled")
        if agent_ok
        else conditions.progressing("AgentNotReady", f"{ready} of {wanted} agent replicas ready")
    )
    _status_patch(
        patch,
        status,
        extra,
        [
            *new,
            conditions.condition("WorkPoolReady", True, "WorkPoolReady", f"work pool {pool!r}"),
            conditions.condition(
                "AgentReady",
                agent_ok,
                "AgentReady" if agent_ok else "AgentNotReady",
                f"{ready}/{wanted} replicas ready",
            ),
        ],
    )
    if not status.get("workPoolId"):
        kopf.event(body, type="Normal", reason="WorkPoolReady", message=f"work pool {pool!r} ready")


@kopf.timer(GROUP, VERSION, BACKENDS, interval=FOLLOW_INTERVAL, initial_delay=FOLLOW_INTERVAL)
async def backend_health(
    body: kopf.Body, status: dict[str, Any], patch: kopf.Patch, **_: Any
) -> None:
    """Agent readiness and Prefect reachability, so `Ready` follows both without a spec change."""
    backend, invalid = parse(body)
    if invalid or not status.get("workPoolId"):
        return
    try:
        async with gateway_for(backend) as gateway:
            await gateway.health()
    except WaitingFor as waiting:
        _status_patch(patch, status, {}, conditions.progressing(waiting.reason, str(waiting)))
        return
    except Exception as error:
        if not _is_outage(error) and not isinstance(error, PrefectError):
            raise
        message = f"Prefect API unreachable: {type(error).__name__}: {error}"
        if _condition(status, "Ready") or _reason(status) != "PrefectUnreachable":
            _status_patch(patch, status, {}, conditions.progressing("PrefectUnreachable", message))
            kopf.event(body, type="Warning", reason="PrefectUnreachable", message=message)
        return
    ready = await kube().ready_replicas(backend.metadata.namespace, agent_name(backend)) or 0
    wanted = backend.spec.agent.replicas if backend.spec.agent else 1
    agent_ok = ready >= wanted
    new = (
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
    if status.get("agentReadyReplicas") != ready or _condition(status, "Ready") != agent_ok:
        _status_patch(patch, status, {"agentReadyReplicas": ready}, [*new, agent])
        if agent_ok and not _condition(status, "Ready"):
            kopf.event(body, type="Normal", reason="Ready", message="work pool and agent ready")


def _reason(status: dict[str, Any]) -> str | None:
    return next(
        (c.get("reason") for c in status.get("conditions") or [] if c.get("type") == "Ready"), None
    )


@kopf.on.delete(GROUP, VERSION, BACKENDS)
async def backend_delete(body: kopf.Body, retry: int, **_: Any) -> None:
    """Remove the work pool we created (never an adopted one); the agent goes by ownership."""
    backend, invalid = parse(body)
    if invalid or (backend.spec.work_pool and backend.spec.work_pool.adopt):
        return
    try:
        async with gateway_for(backend) as gateway:
            await gateway.delete_work_pool(backend.work_pool_name)
    except WaitingFor:
        return  # no Prefect API was ever configured, so nothing was created there
    except Exception as error:
        if not _is_outage(error):
            raise
        raise kopf.TemporaryError(
            f"waiting for Prefect to delete work pool {backend.work_pool_name!r}: {error}",
            delay=backoff(retry),
        ) from None


# ---- LumeFlow ---------------------------------------------------------------------------------


@kopf.index(GROUP, VERSION, FLOWS)
def flow_index(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, name): {"body": _spec_of(body), "status": dict(body.get("status") or {})}}


def find_backend(index: kopf.Index, namespace: str, name: str) -> SchedulingBackend:
    """The named backend, valid and with its work pool ready, or WaitingFor saying which not."""
    entries = list(index.get((namespace, name), []))
    if not entries:
        raise WaitingFor(
            "BackendNotFound", f"SchedulingBackend {namespace}/{name} not found; waiting for it"
        )
    entry = entries[0]
    backend, problems = parse_resource(entry["body"], f"SchedulingBackend {namespace}/{name}")
    if backend is None:
        raise WaitingFor("BackendInvalid", f"SchedulingBackend {namespace}/{name} is invalid")
    if not _condition(entry["status"], "WorkPoolReady"):
        raise WaitingFor(
            "BackendNotReady", f"SchedulingBackend {namespace}/{name}: work pool not ready yet"
        )
    return backend


def _is_whole_number(text: str) -> bool:
    """0, 1, 2, ... in ASCII digits: str.isdigit() alone also takes '²', which int() refuses."""
    return text.isascii() and text.isdigit()


def wanted_run(flow: LumeFlow, status: dict[str, Any]) -> int | None:
    """The run index to create now, or None: OnChange once per generation, OnRequest per
    new value of the `lume.dev/run-request` annotation (an integer users increase)."""
    policy = flow.spec.run.policy if flow.spec.run else "OnChange"
    last = status.get("lastRun") or {}
    generation = flow.metadata.generation
    if policy == "OnChange":
        if last.get("generation") == generation and last.get("index") == 0:
            return None
        return 0
    if policy == "OnRequest":
        request = flow.metadata.annotations.get(RUN_REQUEST)
        if request is None:
            return None
        index = int(request) if _is_whole_number(request) else None
        if index is None or (last.get("index") == index and last.get("generation") == generation):
            return None
        return index
    return None


@kopf.on.resume(GROUP, VERSION, FLOWS, backoff=ERROR_BACKOFF)
@kopf.on.create(GROUP, VERSION, FLOWS, backoff=ERROR_BACKOFF)
@kopf.on.update(GROUP, VERSION, FLOWS, backoff=ERROR_BACKOFF)
async def flow_reconcile(
    body: kopf.Body,
    status: dict[str, Any],
    patch: kopf.Patch,
    retry: int,
    backend_index: kopf.Index,
    **_: Any,
) -> None:
    generation = body.metadata.get("generation")
    flow, invalid = parse(body)
    if not invalid and flow.spec.run and flow.spec.run.policy == "OnRequest":
        request = flow.metadata.annotations.get(RUN_REQUEST)
        if request is not None and not _is_whole_number(request):
            invalid = f"metadata.annotations.{RUN_REQUEST}: {request!r} is not a whole number"
    if invalid:
        _status_patch(
            patch,
            status,
            {"phase": "Failed", "observedGeneration": generation},
            conditions.stalled("InvalidSpec", invalid),
        )
        kopf.event(body, type="Warning", reason="InvalidSpec", message=invalid)
        return
    extra: dict[str, Any] = {"observedGeneration": generation}
    if not status.get("phase"):
        extra["phase"] = "Pending"
        await announce(body, FLOWS, status, generation)

    async def deploy() -> tuple[Any, Any, int | None]:
        backend = find_backend(backend_index, flow.metadata.namespace, flow.spec.backend_ref.name)
        made = flow_deployment(
            flow, backend, working_dir=flow.spec.source.path if flow.spec.source else None
        )
        async with gateway_for(backend) as gateway:
            deployment_id = await gateway.ensure_deployment(made.spec)
            failpoints.hit("flow-deployment-ensured")
            index = wanted_run(flow, status)
            flow_run = None
            if index is not None:
                flow_run = await gateway.create_flow_run(
                    deployment_id,
                    idempotency_key=idempotency_key(flow.metadata.uid or "", generation, index),
                    tags=made.spec.tags,
                )
                failpoints.hit("flow-run-created")
                flow_run = (
                    flow_run,
                    run_status(flow_run, index, gateway.ui_url(flow_run.id), generation),
                )
            return deployment_id, flow_run, index

    deployment_id, created, _index = await _guarded(patch, status, retry, deploy, extra)
    extra.update(deploymentId=str(deployment_id), workPoolName=None)
    backend_entry = next(
        iter(backend_index.get((flow.metadata.namespace, flow.spec.backend_ref.name), [])), None
    )
    if backend_entry:
        extra["workPoolName"] = backend_entry["status"].get("workPoolName")
    if created:
        flow_run, reference = created
        extra.update(phase="Running", lastRun=reference.to_wire(), results=None)
        _status_patch(
            patch, status, extra, conditions.progressing("FlowRunning", f"flow run {flow_run.name}")
        )
        kopf.event(
            body,
            type="Normal",
            reason="FlowRunCreated",
            message=f"flow run {flow_run.name} ({flow_run.id})",
        )
        return
    if status.get("phase") in (None, "Pending", "Deploying"):
        extra["phase"] = "Ready"
    if extra.get("phase", status.get("phase")) in ("Ready", "Completed"):
        new = conditions.ready("Deployed", f"deployment {deployment_id}")
    elif extra.get("phase", status.get("phase")) == "Running":
        new = conditions.progressing("FlowRunning", "a flow run is in progress")
    else:
        new = conditions.failed("FlowRunFailed", (status.get("lastRun") or {}).get("message") or "")
    _status_patch(patch, status, extra, new)
    if not status.get("deploymentId"):
        kopf.event(
            body, type="Normal", reason="Deployed", message=f"Prefect deployment {deployment_id}"
        )


@kopf.timer(GROUP, VERSION, FLOWS, interval=FOLLOW_INTERVAL, initial_delay=FOLLOW_INTERVAL)
async def flow_follow(
    body: kopf.Body,
    status: dict[str, Any],
    patch: kopf.Patch,
    backend_index: kopf.Index,
    **_: Any,
) -> None:
    """Follow the current run to its end: state, times, UI link, then result locations."""
    flow, invalid = parse(body)
    if invalid or not status.get("deploymentId"):
        return
    last = status.get("lastRun") or {}
    schedule = bool(flow.spec.run and flow.spec.run.policy == "Schedule")
    # A run can already be final when its creation is recorded (it ended while the operator was
    # down): it is done only once its phase (and results) are written too.
    done = last.get("stateType") in FINAL_STATES and status.get("phase") in ("Completed", "Failed")
    if not schedule and (not last.get("id") or done):
        return
    try:
        backend = find_backend(backend_index, flow.metadata.namespace, flow.spec.backend_ref.name)
    except WaitingFor:
        return
    try:
        async with gateway_for(backend) as gateway:
            if schedule:
                flow_run = await gateway.latest_run(UUID(status["deploymentId"]))
                if flow_run is None or (
                    str(flow_run.id) == last.get("id") and last.get("stateType") in FINAL_STATES
                ):
                    return
            else:
                flow_run = await gateway.read_flow_run(UUID(last["id"]))
            reference = run_status(
                flow_run,
                last.get("index") or 0,
                gateway.ui_url(flow_run.id),
                last.get("generation"),
            )
            state_type = reference.state_type
            values: dict[str, Any] = {"lastRun": reference.to_wire(), "phase": phase_of(state_type)}
            if state_type not in FINAL_STATES:
                # Also after an outage: Prefect answers again, so `Ready` stops saying it is not.
                if last.get("state") != reference.state or _reason(status) == "PrefectUnreachable":
                    _status_patch(
                        patch,
                        status,
                        values,
                        conditions.progressing(
                            "FlowRunning", f"flow run {flow_run.name} is {reference.state}"
                        ),
                    )
                return
            failpoints.hit("flow-follow-final")
            outcome = await run_outcome(gateway, flow_run, flow.spec.results)
            values["phase"] = outcome.phase
            if outcome.error is None:
                values["results"] = [r.to_wire() for r in outcome.results or []]
                message = f"flow run {flow_run.name} completed"
                new = conditions.ready(outcome.reason, message)
                kopf.event(body, type="Normal", reason=outcome.reason, message=message)
            else:
                new = conditions.failed(outcome.reason, outcome.error)
                kopf.event(body, type="Warning", reason=outcome.reason, message=outcome.error)
            _status_patch(patch, status, values, new)
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


@kopf.on.delete(GROUP, VERSION, FLOWS)
async def flow_delete(body: kopf.Body, retry: int, backend_index: kopf.Index, **_: Any) -> None:
    """Remove the Prefect deployment; the finalizer stays until Prefect confirms."""
    flow, invalid = parse(body)
    if invalid or not (body.get("status") or {}).get("deploymentId"):
        return
    entries = list(backend_index.get((flow.metadata.namespace, flow.spec.backend_ref.name), []))
    backend, _problems = parse_resource(entries[0]["body"], "backend") if entries else (None, [])
    if backend is None:
        # Its backend is gone already (deleted first, or with it): the deployment may still be
        # there, in the operator's default Prefect API if it has one.
        if not default_api_url():
            return
        backend = SchedulingBackend.model_validate(
            {
                "metadata": {
                    "name": flow.spec.backend_ref.name,
                    "namespace": flow.metadata.namespace,
                },
                "spec": {"type": "process"},
            }
        )
    try:
        async with gateway_for(backend) as gateway:
            await gateway.delete_deployment(flow.metadata.name, flow.metadata.namespace)
    except Exception as error:
        if not _is_outage(error):
            raise
        raise kopf.TemporaryError(
            f"waiting for Prefect to delete deployment of {flow.key}: {error}", delay=backoff(retry)
        ) from None


def configure(settings: kopf.OperatorSettings) -> None:
    """Our finalizer and annotation names, quiet event posting, fast reconnects."""
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # Our transitions are posted as events with kopf.event; kopf's own handler logs are not.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 30
    # On deletion kopf waits for our timers to stop; one caught mid-call (a health check) is
    # re-checked after this many seconds, which would otherwise hold the finalizer for 60 s.
    settings.background.cancellation_polling = 1.0


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a pod the service account; elsewhere $KUBECONFIG (or ~/.kube/config)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    global _kube
    configure(settings)
    _kube = None  # configured afresh for this operator run (its kubeconfig may be another)


# The FlowOfFlows handlers live beside these and share their helpers; importing them here
# registers them wherever this module is loaded (`kopf run -m lume_operator.handlers.operator`).
from lume_operator.handlers import composition as _composition  # noqa: E402, F401
