"""The Prefect port on Prefect's own client: the only module that speaks HTTP to Prefect.

Every call has a timeout, so an outage never hangs a caller, and every failure leaves here as
one of the port's errors: `PrefectUnreachable` (transport errors, timeouts, 5xx, 408, 429) or
`PrefectRejected` (any other answer that says no), each with its status code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import anyio
import httpx
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.actions import (
    DeploymentScheduleCreate,
    WorkPoolCreate,
    WorkPoolUpdate,
)
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterType,
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.responses import DeploymentResponse
from prefect.client.schemas.schedules import CronSchedule
from prefect.client.schemas.sorting import FlowRunSort
from prefect.context import SettingsContext, get_settings_context
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.filesystems import RemoteFileSystem
from prefect.results import aresolve_result_storage
from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, get_current_settings
from prefect.states import Cancelled, Cancelling, Scheduled

from lume_operator.prefect.deployment import DeploymentSpec, DeploymentView
from lume_operator.prefect.limiter import AdaptiveLimit
from lume_operator.prefect.port import (
    ACTIVE_STATES,
    FlowRunView,
    PrefectError,
    PrefectRejected,
    PrefectUnreachable,
    RunState,
    check_pool,
    is_outage_status,
    owned_by,
    owner_mark,
)
from lume_operator.prefect.records import json_result, refuse_unless_json

# Registers Prefect's `lume-json` serializer type, so results stored with it are read here.
from lume_operator.prefect.serializer import INSTEAD

T = TypeVar("T")
# Answers of a server that is up but busy: worth asking again soon, in a new slot.
BUSY = (429, 503)


def _time(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def run_view(flow_run: FlowRun) -> FlowRunView:
    """Prefect's flow run as the port's view."""
    state = flow_run.state
    data = getattr(state, "data", None)
    metadata = getattr(data, "metadata", data)
    return FlowRunView(
        id=str(flow_run.id),
        name=flow_run.name,
        state=RunState(state.name, state.type.value, state.message or None) if state else None,
        start_time=_time(flow_run.start_time),
        end_time=_time(flow_run.end_time),
        tags=list(flow_run.tags or []),
        deployment_id=str(flow_run.deployment_id) if flow_run.deployment_id else None,
        created_time=_time(flow_run.created),
        expected_start_time=_time(flow_run.expected_start_time),
        idempotency_key=flow_run.idempotency_key,
        parameters=dict(flow_run.parameters or {}),
        result_key=getattr(metadata, "storage_key", None),
        result_serializer=getattr(getattr(metadata, "serializer", None), "type", None),
        handle=state,
    )


def deployment_view(deployment: DeploymentResponse, flow_name: str) -> DeploymentView:
    return DeploymentView(
        id=str(deployment.id),
        flow_name=flow_name,
        name=deployment.name,
        entrypoint=deployment.entrypoint,
        work_pool_name=deployment.work_pool_name,
        work_queue_name=deployment.work_queue_name,
        job_variables=dict(deployment.job_variables or {}),
        parameters=dict(deployment.parameters or {}),
        tags=list(deployment.tags or []),
        pull_steps=deployment.pull_steps or None,
        description=deployment.description,
        schedules=[
            {"cron": item.schedule.cron, "timezone": item.schedule.timezone or "UTC"}
            for item in deployment.schedules or []
            if getattr(item.schedule, "cron", None)
        ],
        parameter_openapi_schema=deployment.parameter_openapi_schema,
    )


def translate(error: BaseException, what: str) -> PrefectError:
    """Any failure of a Prefect call as the port's error family."""
    if isinstance(error, PrefectError):
        return error
    if isinstance(error, ObjectNotFound):
        return PrefectRejected(f"{what}: not found in Prefect", 404)
    if isinstance(error, ObjectAlreadyExists):
        return PrefectRejected(f"{what}: already exists in Prefect", 409)
    if isinstance(error, httpx.HTTPStatusError):
        code = error.response.status_code
        detail = _detail(error.response)
        message = f"{what}: Prefect answered {code}" + (f": {detail}" if detail else "")
        if is_outage_status(code):
            return PrefectUnreachable(message, code)
        return PrefectRejected(message, code)
    if isinstance(error, httpx.TransportError | OSError | TimeoutError):
        kind = "timed out" if isinstance(error, TimeoutError | httpx.TimeoutException) else "failed"
        return PrefectUnreachable(f"{what}: Prefect API {kind}: {type(error).__name__}: {error}")
    return PrefectRejected(f"{what}: {type(error).__name__}: {error}")


def _detail(response: httpx.Response) -> str:
    """Prefect's own explanation, short: its `detail` field, never a whole body."""
    try:
        body = response.json()
    except ValueError:
        return ""
    detail = body.get("detail") if isinstance(body, dict) else None
    return str(detail)[:300] if detail else ""


async def _fail_at_once(response: httpx.Response) -> None:
    """Raise a 429 or 5xx as it arrives, before Prefect's client decides to retry it: with
    retries off, its loop still sleeps 2 s after the last attempt before returning it."""
    if response.status_code == 429 or response.status_code >= 500:
        await response.aread()
        raise httpx.HTTPStatusError(
            f"Prefect answered {response.status_code}",
            request=response.request,
            response=response,
        )


class PrefectGateway:
    """One Prefect API, with the operations lume-operator needs and a count of writes.

    With a `limit`, every call holds one of its slots (shared by every gateway on that API).
    """

    def __init__(
        self,
        client: PrefectClient,
        timeout: float = 30.0,
        limit: AdaptiveLimit | None = None,
        *,
        retries: bool = True,
    ) -> None:
        self.client = client
        self.timeout = timeout
        self.limit = limit
        self.busy_retries = 4
        self._no_retries: tuple[Any, Any] | None = None
        if not retries:
            # The client reads its retry count from the settings in context at each request.
            current = get_settings_context()
            settings = current.settings.copy_with_update(updates={PREFECT_CLIENT_MAX_RETRIES: 0})
            self._no_retries = (current.profile, settings)
        self.writes = 0
        self._flow_ids: dict[str, UUID] = {}
        self._flow_locks: dict[str, asyncio.Lock] = {}

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        timeout: float = 30.0,
        *,
        api_url: str | None = None,
        api_key: str | None = None,
        auth_string: str | None = None,
        limit: AdaptiveLimit | None = None,
        retries: bool = True,
    ) -> AsyncIterator[PrefectGateway]:
        """A gateway on the given Prefect API, or the one the current settings point to.

        `retries=False` turns off the client's own retries of a 429 or 5xx (5, with backoff,
        within one call's timeout, holding the call's slot of `limit` throughout): with a
        limit, a busy server is asked again in a new slot (`_call`), and other outages go to
        the object's own backoff.
        """
        settings: dict[str, Any] = {"timeout": timeout}
        if not retries:
            settings["event_hooks"] = {"response": [_fail_at_once]}
        client = (
            get_client(httpx_settings=None if retries else settings)
            if api_url is None
            else PrefectClient(
                api=api_url, api_key=api_key, auth_string=auth_string, httpx_settings=settings
            )
        )
        try:
            async with client:
                yield cls(client, timeout, limit, retries=retries)
        except (httpx.HTTPError, OSError) as error:  # opening or closing the connection
            raise translate(error, f"Prefect API {api_url or 'from settings'}") from error

    async def _call(
        self, make: Callable[[], Awaitable[T]], what: str, *, quiet: tuple[type, ...] = ()
    ) -> T:
        """Make and await one Prefect call with a deadline; `quiet` errors pass through
        untranslated.

        With a limit, the call holds one of its slots. A server that answers 429 or 503 is up
        but busy (a SQLite server's writer lock): the limit is told, and the call waits for a
        slot again after a short pause, up to `busy_retries` times, instead of failing the
        object into its backoff (seconds to minutes while the server may already be free).
        Anything else unreachable (refused, timed out, 5xx) fails at once.
        """
        if self.limit is None:
            return await self._timed(make(), what, quiet)
        for attempt in range(self.busy_retries + 1):
            async with self.limit.slot() as sample:
                try:
                    return await self._timed(make(), what, quiet)
                except PrefectUnreachable as error:
                    sample.overload()
                    if error.status_code not in BUSY or attempt == self.busy_retries:
                        raise
            await anyio.sleep(random.uniform(0.5, 1.0) * 0.2 * 2**attempt)  # outside the slot
        raise AssertionError("unreachable")  # the loop returns or raises

    def _scope(self) -> contextlib.AbstractContextManager[Any]:
        if self._no_retries is None:
            return contextlib.nullcontext()
        profile, settings = self._no_retries
        return SettingsContext(profile=profile, settings=settings)

    async def _timed(self, call: Awaitable[T], what: str, quiet: tuple[type, ...]) -> T:
        try:
            with anyio.fail_after(self.timeout), self._scope():
                return await call
        except quiet:
            raise
        except Exception as error:
            raise translate(error, what) from error

    @property
    def api_url(self) -> str:
        return str(self.client.api_url).rstrip("/")

    def ui_url(self, flow_run_id: UUID | str) -> str:
        """Where users see a run: the UI sits beside the API (a server's /api prefix removed)."""
        base = self.api_url.removesuffix("/api")
        return f"{base}/runs/flow-run/{flow_run_id}"

    async def health(self) -> None:
        error = await self._call(lambda: self.client.api_healthcheck(), "health check")
        if error is not None:
            raise translate(error, "health check")

    async def ensure_work_pool(
        self,
        name: str,
        pool_type: str,
        base_job_template: dict[str, Any],
        *,
        adopt: bool = False,
        concurrency_limit: int | None = None,
        queues: list[str] | None = None,
        owner: str | None = None,
    ) -> str:
        what = f"work pool {name!r}"
        try:
            pool = await self._call(
                lambda: self.client.read_work_pool(name), what, quiet=(ObjectNotFound,)
            )
        except ObjectNotFound:
            pool = None
        if pool is None:
            if adopt:
                raise PrefectRejected(f"work pool {name!r} to adopt does not exist", 404)
            try:
                pool = await self._call(
                    lambda: self.client.create_work_pool(
                        WorkPoolCreate(
                            name=name,
                            description=owner_mark(owner),
                            type=pool_type,
                            base_job_template=base_job_template,
                            concurrency_limit=concurrency_limit,
                        )
                    ),
                    what,
                    quiet=(ObjectAlreadyExists,),
                )
                self.writes += 1
            except ObjectAlreadyExists:
                pool = await self._call(lambda: self.client.read_work_pool(name), what)
        check_pool(name, pool_type, pool.type, pool.description, owner=owner, adopt=adopt)
        if not adopt and (
            pool.base_job_template != base_job_template
            or pool.concurrency_limit != concurrency_limit
        ):
            await self._call(
                lambda: self.client.update_work_pool(
                    name,
                    WorkPoolUpdate(
                        base_job_template=base_job_template, concurrency_limit=concurrency_limit
                    ),
                ),
                what,
            )
            self.writes += 1
        if queues:
            existing = {
                q.name for q in await self._call(lambda: self.client.read_work_queues(name), what)
            }
            for queue in queues:
                if queue in existing:
                    continue
                with contextlib.suppress(ObjectAlreadyExists):
                    await self._call(
                        lambda queue=queue: self.client.create_work_queue(
                            queue, work_pool_name=name
                        ),
                        f"work queue {queue!r} of {what}",
                        quiet=(ObjectAlreadyExists,),
                    )
                    self.writes += 1
        return str(pool.id)

    async def delete_work_pool(self, name: str, owner: str | None = None) -> None:
        if owner:
            try:
                pool = await self._call(
                    lambda: self.client.read_work_pool(name),
                    f"work pool {name!r}",
                    quiet=(ObjectNotFound,),
                )
            except ObjectNotFound:
                return
            if not owned_by(pool.description, owner):
                return  # another's (or adopted): never ours to delete
        with contextlib.suppress(ObjectNotFound):
            await self._call(
                lambda: self.client.delete_work_pool(name),
                f"work pool {name!r}",
                quiet=(ObjectNotFound,),
            )
            self.writes += 1

    async def _read_block(self, name: str) -> Any:
        try:
            return await self._call(
                lambda: self.client.read_block_document_by_name(
                    name, block_type_slug=RemoteFileSystem.get_block_type_slug()
                ),
                f"result storage block {name!r}",
                quiet=(ObjectNotFound,),
            )
        except ObjectNotFound:
            return None

    async def ensure_result_storage(self, name: str, fields: dict[str, Any]) -> str:
        current = await self._read_block(name)
        if current is not None and current.data == fields:
            return str(current.id)
        block = RemoteFileSystem(**fields)
        block_id = await self._call(
            lambda: block.asave(name, overwrite=True, client=self.client),
            f"result storage block {name!r}",
        )
        self.writes += 1
        return str(block_id)

    async def delete_result_storage(self, name: str) -> None:
        current = await self._read_block(name)
        if current is None:
            return
        with contextlib.suppress(ObjectNotFound):
            await self._call(
                lambda: self.client.delete_block_document(current.id),
                f"result storage block {name!r}",
                quiet=(ObjectNotFound,),
            )
            self.writes += 1

    async def _read_deployment(self, flow_name: str, name: str) -> DeploymentResponse | None:
        try:
            return await self._call(
                lambda: self.client.read_deployment_by_name(f"{flow_name}/{name}"),
                f"deployment {flow_name}/{name}",
                quiet=(ObjectNotFound,),
            )
        except ObjectNotFound:
            return None

    async def read_deployment(self, flow_name: str, name: str) -> DeploymentView | None:
        current = await self._read_deployment(flow_name, name)
        return deployment_view(current, flow_name) if current else None

    async def ensure_deployment(self, spec: DeploymentSpec, *, fresh: bool = False) -> str:
        if not fresh:
            current = await self.read_deployment(spec.flow_name, spec.name)
            if current is not None and not spec.differs_from(current):
                return current.id
        try:
            return await self._write_deployment(spec)
        except PrefectRejected as error:
            if error.status_code not in (404, 409) or spec.flow_name not in self._flow_ids:
                raise
            self._flow_ids.pop(spec.flow_name)  # the flow was deleted in Prefect meanwhile
            return await self._write_deployment(spec)

    async def _flow_id(self, flow_name: str, what: str) -> UUID:
        """A flow's id, created on first use and kept: flows are never renamed."""
        if flow_name not in self._flow_ids:
            # One create per name, however many objects of that flow deploy at once.
            async with self._flow_locks.setdefault(flow_name, asyncio.Lock()):
                if flow_name not in self._flow_ids:
                    flow_id = await self._call(
                        lambda: self.client.create_flow_from_name(flow_name), what
                    )
                    self._flow_ids[flow_name] = flow_id
            self._flow_locks.pop(flow_name, None)
        return self._flow_ids[flow_name]

    async def _write_deployment(self, spec: DeploymentSpec) -> str:
        """Prefect's deployment create is an upsert by (flow, name): one request either way."""
        what = f"deployment {spec.flow_name}/{spec.name}"
        flow_id = await self._flow_id(spec.flow_name, what)
        deployment_id = await self._call(
            lambda: self.client.create_deployment(
                flow_id=flow_id,
                name=spec.name,
                entrypoint=spec.entrypoint,
                work_pool_name=spec.work_pool_name,
                work_queue_name=spec.work_queue_name,
                job_variables=spec.job_variables,
                parameters=spec.parameters,
                tags=spec.tags,
                pull_steps=spec.pull_steps or None,
                parameter_openapi_schema=spec.parameter_openapi_schema,
                enforce_parameter_schema=spec.parameter_openapi_schema is not None,
                description=spec.description,
                schedules=[
                    DeploymentScheduleCreate(
                        schedule=CronSchedule(cron=item["cron"], timezone=item["timezone"]),
                        active=True,
                    )
                    for item in spec.schedules or []
                ],
            ),
            what,
        )
        self.writes += 1
        return str(deployment_id)

    async def delete_deployment(self, flow_name: str, name: str) -> None:
        current = await self._read_deployment(flow_name, name)
        if current is None:
            return
        with contextlib.suppress(ObjectNotFound):
            await self._call(
                lambda: self.client.delete_deployment(current.id),
                f"deployment {flow_name}/{name}",
                quiet=(ObjectNotFound,),
            )
            self.writes += 1

    async def create_flow_run(
        self,
        deployment_id: str,
        *,
        idempotency_key: str,
        parameters: dict[str, Any] | None = None,
        tags: list[str] | None = None,
        job_variables: dict[str, Any] | None = None,
        start_in: float | None = None,
    ) -> FlowRunView:
        state = None
        if start_in:
            state = Scheduled(scheduled_time=datetime.now(UTC) + timedelta(seconds=start_in))
        flow_run = await self._call(
            lambda: self.client.create_flow_run_from_deployment(
                UUID(deployment_id),
                parameters=parameters,
                tags=tags,
                idempotency_key=idempotency_key,
                job_variables=job_variables,
                state=state,
            ),
            f"flow run of deployment {deployment_id}",
        )
        self.writes += 1
        return run_view(flow_run)

    async def read_flow_run(self, flow_run_id: str) -> FlowRunView:
        flow_run = await self._call(
            lambda: self.client.read_flow_run(UUID(flow_run_id)), f"flow run {flow_run_id}"
        )
        return run_view(flow_run)

    async def read_flow_runs(self, flow_run_ids: list[str]) -> list[FlowRunView]:
        if not flow_run_ids:
            return []
        runs = await self._call(
            lambda: self.client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    id=FlowRunFilterId(any_=[UUID(run_id) for run_id in flow_run_ids])
                ),
                limit=len(flow_run_ids),
            ),
            f"{len(flow_run_ids)} flow runs",
        )
        return [run_view(run) for run in runs]

    async def active_runs(self, deployment_id: str) -> list[FlowRunView]:
        runs = await self._call(
            lambda: self.client.read_flow_runs(
                deployment_filter=DeploymentFilter(
                    id=DeploymentFilterId(any_=[UUID(deployment_id)])
                ),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(
                        type=FlowRunFilterStateType(any_=[StateType(t) for t in ACTIVE_STATES])
                    )
                ),
            ),
            f"runs in flight of deployment {deployment_id}",
        )
        return [run_view(run) for run in runs]

    async def latest_run(self, deployment_id: str) -> FlowRunView | None:
        runs = await self._call(
            lambda: self.client.read_flow_runs(
                deployment_filter=DeploymentFilter(
                    id=DeploymentFilterId(any_=[UUID(deployment_id)])
                ),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(
                        type=FlowRunFilterStateType(
                            any_=[t for t in StateType if t != StateType.SCHEDULED]
                        )
                    )
                ),
                sort=FlowRunSort.EXPECTED_START_TIME_DESC,
                limit=1,
            ),
            f"runs of deployment {deployment_id}",
        )
        return run_view(runs[0]) if runs else None

    async def child_runs(self, parent_id: str) -> list[FlowRunView]:
        runs = await self._call(
            lambda: self.client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[UUID(parent_id)])
                )
            ),
            f"child runs of flow run {parent_id}",
        )
        return [run_view(run) for run in runs]

    async def cancel_flow_run(self, flow_run_id: str, *, force: bool = False) -> None:
        current = await self.read_flow_run(flow_run_id)
        cancelling = bool(current.state and current.state.type == "CANCELLING")
        if current.final or (cancelling and not force):
            return
        await self._call(
            # Unforced, Prefect's own rules apply: a run no worker has taken yet (scheduled)
            # goes straight to Cancelled, a running one to Cancelling until its worker stops it.
            lambda: self.client.set_flow_run_state(
                UUID(flow_run_id), Cancelled() if force else Cancelling(), force=force
            ),
            f"cancel flow run {flow_run_id}",
        )
        self.writes += 1

    async def table_artifact(self, flow_run_id: str, description: str) -> list[dict] | None:
        artifacts = await self._call(
            lambda: self.client.read_artifacts(
                artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["table"])),
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)])),
            ),
            f"artifacts of flow run {flow_run_id}",
        )
        for artifact in artifacts:
            if artifact.description == description:
                data = artifact.data
                rows = json.loads(data) if isinstance(data, str) else data
                return rows if isinstance(rows, list) else None
        return None

    async def result_of(self, flow_run: FlowRunView) -> Any:
        """The persisted return value, read as JSON data (prefect/records.py): a record
        another serializer wrote is refused, never deserialized."""
        where = f"the result of flow run {flow_run.id}"
        metadata = getattr(flow_run.handle, "data", None)
        key = getattr(metadata, "storage_key", None)
        if not key:
            raise PrefectRejected(f"{where} was not persisted")
        refuse_unless_json(getattr(getattr(metadata, "serializer", None), "type", None), where)
        try:
            with anyio.fail_after(self.timeout):
                content = await self._stored(metadata)
        except (httpx.HTTPError, TimeoutError) as error:  # result storage behind an API
            raised = translate(error, where)
            if isinstance(raised, PrefectUnreachable):
                raise raised from error
            raise PrefectRejected(f"cannot read {where}: {error}") from error
        except FileNotFoundError as error:
            # Prefect logs a warning and completes the run when its serializer fails.
            raise PrefectRejected(
                f"the return value of flow run {flow_run.id} was never stored: Prefect could "
                f"not serialize it (its log names the value); {INSTEAD}"
            ) from error
        except Exception as error:  # storage missing, a block gone, ...
            raise PrefectRejected(f"cannot read {where}: {error}") from error
        return json_result(content, where)

    async def _stored(self, metadata: Any) -> bytes:
        """The bytes at a record's storage key, from its storage block, or the local disk."""
        key = metadata.storage_key
        if metadata.storage_block_id is not None:
            storage = await aresolve_result_storage(metadata.storage_block_id)
            return await storage.read_path(key)
        path = Path(key)
        if not path.is_absolute():
            path = Path(get_current_settings().results.local_storage_path) / key
        return await anyio.Path(path).read_bytes()
