"""The kopf adapter: one handler per event of each kind, each gathering its inputs, calling
one `reconcile` function and applying its outcome (`handlers/apply.py`).

`kopf run -m lume_operator.handlers.operator` loads these. Settings are read at each operator
start (`startup`, into kopf's memo); only the timers' interval and the retry delay of
unexpected errors come from the environment at import, since kopf fixes them when handlers are
registered.
"""

from __future__ import annotations

import gc
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf

from lume_operator import GROUP, VERSION
from lume_operator.api.backend import SchedulingBackendStatus
from lume_operator.api.crds import PLURALS
from lume_operator.api.flow import LumeFlowStatus
from lume_operator.api.flowofflows import FlowOfFlowsStatus
from lume_operator.handlers.apply import (
    State,
    apply_outcome,
    found,
    in_namespace,
    manifest,
    publish,
    state_of,
)
from lume_operator.handlers.kube import Kube, pod_credentials
from lume_operator.reconcile import backend as backends
from lume_operator.reconcile import flowofflows as compositions
from lume_operator.reconcile import lumeflow as flows
from lume_operator.reconcile.outcome import status_of
from lume_operator.settings import OperatorSettings

PACE = OperatorSettings()
KOPF_PREFIX = f"kopf.{GROUP}"
FINALIZER = f"{GROUP}/finalizer"
BACKENDS, FLOWS, COMPOSITIONS = (
    PLURALS[k] for k in ("SchedulingBackend", "LumeFlow", "FlowOfFlows")
)
EVERY = {"interval": PACE.follow_interval, "initial_delay": PACE.follow_interval}
ON_CHANGE = {"backoff": PACE.error_backoff}


def _index_entry(namespace: str, name: str, body: kopf.Body) -> dict[Any, Any]:
    return {(namespace, name): {"body": manifest(body), "status": dict(body.get("status") or {})}}


# Async, though they never wait: kopf runs a sync handler in a worker thread, and an index is
# called on every watch event of its kind (each status patch of a thousand objects).
@kopf.index(GROUP, VERSION, BACKENDS)
async def backend_index(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    """Backends by (namespace, name) with their status, so flows find them without calls."""
    return _index_entry(namespace, name, body)


@kopf.index(GROUP, VERSION, FLOWS)
async def flow_index(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return _index_entry(namespace, name, body)


# ---- SchedulingBackend ------------------------------------------------------------------------


@kopf.on.resume(GROUP, VERSION, BACKENDS, **ON_CHANGE)
@kopf.on.create(GROUP, VERSION, BACKENDS, **ON_CHANGE)
@kopf.on.update(GROUP, VERSION, BACKENDS, **ON_CHANGE)
async def backend_reconcile(
    body: kopf.Body,
    status: dict[str, Any],
    patch: kopf.Patch,
    retry: int,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    state = state_of(memo)
    outcome = await backends.reconcile_backend(
        manifest(body),
        status_of(SchedulingBackendStatus, status),
        connect=state.connect,
        cluster=state.kube,
        settings=state.settings,
        retry=retry,
    )
    apply_outcome(outcome, body, status, patch)


@kopf.timer(GROUP, VERSION, BACKENDS, **EVERY)
async def backend_health(
    body: kopf.Body, status: dict[str, Any], patch: kopf.Patch, memo: kopf.Memo, **_: Any
) -> None:
    """Agent readiness and Prefect reachability, so `Ready` follows both."""
    state = state_of(memo)
    outcome = await backends.check_backend(
        manifest(body),
        status_of(SchedulingBackendStatus, status),
        connect=state.connect,
        cluster=state.kube,
    )
    apply_outcome(outcome, body, status, patch)


@kopf.on.delete(GROUP, VERSION, BACKENDS)
async def backend_delete(
    body: kopf.Body,
    status: dict[str, Any],
    patch: kopf.Patch,
    retry: int,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    state = state_of(memo)
    outcome = await backends.delete_backend(
        manifest(body),
        status_of(SchedulingBackendStatus, status),
        connect=state.connect,
        settings=state.settings,
        retry=retry,
    )
    apply_outcome(outcome, body, status, patch)


# ---- LumeFlow ---------------------------------------------------------------------------------


def _backend_of(body: kopf.Body, backend_index: kopf.Index) -> Any:
    name = (body.get("spec") or {}).get("backendRef", {}).get("name", "")
    return found(backend_index, (body.metadata.namespace, name))


def _not_taken_up(body: kopf.Body, status: dict[str, Any], **_: Any) -> bool:
    finalizers = body.metadata.get("finalizers") or []
    return not status.get("phase") and FINALIZER not in finalizers


@kopf.on.event(GROUP, VERSION, FLOWS, when=_not_taken_up)
async def flow_taken_up(
    body: kopf.Body, status: dict[str, Any], patch: kopf.Patch, memo: kopf.Memo, **_: Any
) -> None:
    """A first status (`Deploying`) written with the finalizer, a handling cycle before the
    create handler runs (it publishes one itself when this could not).

    The finalizer (kopf's, by our name) is added here, as a merge patch of the list: kopf
    would add it in a JSON patch sent after the status patch, and the watch event of the
    status patch (no finalizer yet) then makes kopf add it again against a stale version,
    which fails and leaves the object waiting for an event that never comes. A merge patch
    carries no version check (a conflict would stop kopf's worker): a finalizer another
    controller adds in the milliseconds before this patch is replaced; one that checks for its
    finalizer on every event, as kopf does, adds it again on the event this patch brings.
    """
    first = flows.first_status(manifest(body), status_of(LumeFlowStatus, status))
    if first is not None:
        patch.metadata["finalizers"] = [*(body.metadata.get("finalizers") or []), FINALIZER]
        patch.status.update(first.to_wire())
        state_of(memo).arrivals.seen()  # Prefect calls wait while more arrive


@kopf.on.resume(GROUP, VERSION, FLOWS, **ON_CHANGE)
@kopf.on.create(GROUP, VERSION, FLOWS, **ON_CHANGE)
@kopf.on.update(GROUP, VERSION, FLOWS, **ON_CHANGE)
async def flow_reconcile(
    body: kopf.Body,
    status: dict[str, Any],
    patch: kopf.Patch,
    retry: int,
    backend_index: kopf.Index,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    state = state_of(memo)

    async def announce(first: LumeFlowStatus) -> None:
        await publish(state, FLOWS, body, first)

    outcome = await flows.reconcile_flow(
        manifest(body),
        status_of(LumeFlowStatus, status),
        backend=_backend_of(body, backend_index),
        connect=state.connect,
        settings=state.settings,
        retry=retry,
        publish=announce,
    )
    apply_outcome(outcome, body, status, patch)


@kopf.timer(
    GROUP,
    VERSION,
    FLOWS,
    **EVERY,
    when=lambda body, status, **_: flows.wants_following(body, status),
)
async def flow_follow(
    body: kopf.Body,
    status: dict[str, Any],
    patch: kopf.Patch,
    backend_index: kopf.Index,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """Follow the current run to its end: state, times, UI link, then result locations."""
    outcome = await flows.follow_flow(
        manifest(body),
        status_of(LumeFlowStatus, status),
        backend=_backend_of(body, backend_index),
        connect=state_of(memo).connect,
        now=datetime.now(UTC),
        grace=state_of(memo).settings.cancel_grace,
        open_storage=state_of(memo).storage,
    )
    apply_outcome(outcome, body, status, patch)


@kopf.on.delete(GROUP, VERSION, FLOWS)
async def flow_delete(
    body: kopf.Body,
    status: dict[str, Any],
    patch: kopf.Patch,
    retry: int,
    runtime: timedelta,
    backend_index: kopf.Index,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """Cancel runs in flight, remove the deployment; the finalizer holds until Prefect says so."""
    state = state_of(memo)
    outcome = await flows.delete_flow(
        manifest(body),
        status_of(LumeFlowStatus, status),
        backend=_backend_of(body, backend_index),
        connect=state.connect,
        settings=state.settings,
        retry=retry,
        waited=runtime.total_seconds(),
    )
    apply_outcome(outcome, body, status, patch)


# ---- FlowOfFlows ------------------------------------------------------------------------------


@kopf.on.resume(GROUP, VERSION, COMPOSITIONS, **ON_CHANGE)
@kopf.on.create(GROUP, VERSION, COMPOSITIONS, **ON_CHANGE)
@kopf.on.update(GROUP, VERSION, COMPOSITIONS, **ON_CHANGE)
async def composition_reconcile(
    body: kopf.Body,
    status: dict[str, Any],
    patch: kopf.Patch,
    retry: int,
    backend_index: kopf.Index,
    flow_index: kopf.Index,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    state, namespace = state_of(memo), body.metadata.namespace
    outcome = await compositions.reconcile_composition(
        manifest(body),
        status_of(FlowOfFlowsStatus, status),
        flows=in_namespace(flow_index, namespace),
        backends=in_namespace(backend_index, namespace),
        connect=state.connect,
        settings=state.settings,
        retry=retry,
    )
    apply_outcome(outcome, body, status, patch)


@kopf.timer(GROUP, VERSION, COMPOSITIONS, **EVERY)
async def composition_follow(
    body: kopf.Body,
    status: dict[str, Any],
    patch: kopf.Patch,
    backend_index: kopf.Index,
    flow_index: kopf.Index,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """Per-step phases, runs and results, until the parent run ends."""
    state, namespace = state_of(memo), body.metadata.namespace
    outcome = await compositions.follow_composition(
        manifest(body),
        status_of(FlowOfFlowsStatus, status),
        flows=in_namespace(flow_index, namespace),
        backends=in_namespace(backend_index, namespace),
        connect=state.connect,
        memory=state.observed,
        open_storage=state.storage,
    )
    apply_outcome(outcome, body, status, patch)


@kopf.on.delete(GROUP, VERSION, COMPOSITIONS)
async def composition_delete(
    body: kopf.Body,
    status: dict[str, Any],
    patch: kopf.Patch,
    retry: int,
    runtime: timedelta,
    backend_index: kopf.Index,
    flow_index: kopf.Index,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """Cancel the parent run and its steps, remove the deployments it made."""
    state, namespace = state_of(memo), body.metadata.namespace
    outcome = await compositions.delete_composition(
        manifest(body),
        status_of(FlowOfFlowsStatus, status),
        flows=in_namespace(flow_index, namespace),
        backends=in_namespace(backend_index, namespace),
        connect=state.connect,
        settings=state.settings,
        retry=retry,
        waited=runtime.total_seconds(),
    )
    apply_outcome(outcome, body, status, patch)


# ---- the operator -----------------------------------------------------------------------------


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    """Close the Prefect clients kept for the operator's lifetime."""
    if "lume" in memo:
        await state_of(memo).close()


@kopf.on.login()
def login(settings: kopf.OperatorSettings, **kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a pod its ServiceAccount, at the address Kubernetes gives every pod
    ($KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT, as the Kubernetes client reaches it);
    elsewhere $KUBECONFIG (or ~/.kube/config). kopf's own `login_with_service_account` dials
    https://kubernetes.default.svc:443, which needs cluster DNS (a host-network pod has none)."""
    pod = pod_credentials()
    if pod is None:
        return kopf.login_with_kubeconfig(settings=settings, **kwargs)
    return kopf.ConnectionInfo(
        server=pod.server,
        token=pod.token,
        ca_path=pod.ca_path,
        default_namespace=pod.namespace,
        trust_env=settings.networking.trust_env,
        priority=20,
    )


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Our finalizer and annotation names, quiet event posting, fast reconnects; this run's
    settings and clients into the memo (a kubeconfig may differ from the last run's)."""
    settings.persistence.finalizer = FINALIZER
    # kopf's own annotations under a prefix of their own: kopf leaves every annotation under
    # its storage prefix out of the changes it reacts to, and users' `lume.dev/run-request`
    # must start runs.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=KOPF_PREFIX, key="last-handled-configuration"
    )
    lume = OperatorSettings()
    # Without cluster-wide rights kopf's listing of Namespaces is refused, and retried for
    # nearly a minute (its backoffs, 54 s) before kopf falls back to the namespaces it was given.
    settings.scanning.disabled = not lume.scan_cluster
    # Our transitions are posted as events with kopf.event; kopf's own handler logs are not.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 30
    # On deletion kopf waits for our timers to stop; one caught mid-call (a health check) is
    # re-checked after this many seconds, which would otherwise hold the finalizer for 60 s.
    settings.background.cancellation_polling = 1.0
    # The Kubernetes client logs whole response bodies at DEBUG, Secrets (API keys) included,
    # and the S3 clients request headers that name the access key: never below INFO.
    for name in ("kubernetes.client.rest", "botocore", "aiobotocore", "s3fs"):
        logging.getLogger(name).setLevel(logging.INFO)
    memo["lume"] = State(settings=lume, kube=Kube.configured())
    _imports_settled()


def _imports_settled() -> None:
    """lume-base (seconds) now, before kopf watches: a thread held the GIL through a mass
    apply. Then what the imports made, which lives as long as the process, goes out of the
    collector's full passes; they walked all of it (300,000 objects) for each, 1 s of a
    1000-object apply's 5.7 s."""
    import lume_operator.results.files  # noqa: F401

    gc.freeze()
