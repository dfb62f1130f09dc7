"""Idempotent Prefect operations: work pools, deployments, flow runs and their results.

Everything here takes plain values (names, templates, job variables) so the reconcile logic
stays free of Prefect's client, and every call has a timeout so an outage never hangs a caller.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import anyio
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
from prefect.client.schemas.schedules import CronSchedule
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound


class PrefectError(Exception):
    """A Prefect operation that cannot succeed as asked; the message says why."""


@dataclass
class DeploymentSpec:
    """Everything that defines a deployment; compared field by field before any write."""

    flow_name: str
    name: str
    entrypoint: str
    work_pool_name: str
    work_queue_name: str
    job_variables: dict[str, Any]
    parameters: dict[str, Any]
    tags: list[str]
    pull_steps: list[dict[str, Any]] = field(default_factory=list)
    parameter_openapi_schema: dict[str, Any] | None = None
    # Never None: Prefect stores a missing description as the text "None".
    description: str = "Managed by lume-operator."
    # Cron schedules as {"cron": ..., "timezone": ...}; None: no schedule.
    schedules: list[dict[str, str]] | None = None

    def differs_from(self, current: Any) -> list[str]:
        """Names of the fields whose current value in Prefect is not what we want."""
        wanted = {
            "entrypoint": self.entrypoint,
            "work_pool_name": self.work_pool_name,
            "work_queue_name": self.work_queue_name,
            "job_variables": self.job_variables,
            "parameters": self.parameters,
            "tags": sorted(self.tags),
            "pull_steps": self.pull_steps or None,
            "description": self.description,
        }
        actual = {name: getattr(current, name, None) for name in wanted}
        actual["tags"] = sorted(actual["tags"] or [])
        actual["pull_steps"] = actual["pull_steps"] or None
        actual["job_variables"] = actual["job_variables"] or {}
        actual["parameters"] = actual["parameters"] or {}
        changed = [name for name in wanted if wanted[name] != actual[name]]
        current_schedules = [
            {"cron": item.schedule.cron, "timezone": item.schedule.timezone or "UTC"}
            for item in (getattr(current, "schedules", None) or [])
            if getattr(item.schedule, "cron", None)
        ]
        if (self.schedules or []) != current_schedules:
            changed.append("schedules")
        if self.parameter_openapi_schema is not None and (
            self.parameter_openapi_schema != current.parameter_openapi_schema
        ):
            changed.append("parameter_openapi_schema")
        return changed


class PrefectGateway:
    """One Prefect API, with the operations lume-operator needs and a count of writes."""

    def __init__(self, client: PrefectClient, timeout: float = 30.0) -> None:
        self.client = client
        self.timeout = timeout
        self.writes = 0

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls, timeout: float = 30.0, *, api_url: str | None = None, api_key: str | None = None
    ) -> AsyncIterator[PrefectGateway]:
        """A gateway on the given Prefect API, or the one the current settings point to."""
        if api_url is None:
            async with get_client() as client:
                yield cls(client, timeout)
            return
        settings = {"timeout": timeout}
        async with PrefectClient(api=api_url, api_key=api_key, httpx_settings=settings) as client:
            yield cls(client, timeout)

    async def health(self) -> None:
        """Raise PrefectError unless the API answers."""
        error = await self._call(self.client.api_healthcheck())
        if error is not None:
            raise PrefectError(f"Prefect API {self.api_url} is not healthy: {error}")

    async def delete_deployment(self, flow_name: str, name: str) -> None:
        """Delete a deployment by name; one that is already gone counts as deleted."""
        try:
            current = await self._call(self.client.read_deployment_by_name(f"{flow_name}/{name}"))
        except ObjectNotFound:
            return
        with contextlib.suppress(ObjectNotFound):
            await self._call(self.client.delete_deployment(current.id))
            self.writes += 1

    async def latest_run(self, deployment_id: UUID) -> FlowRun | None:
        """The deployment's most recently started or scheduled run (a cron schedule's)."""
        runs = await self._call(
            self.client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(
                        type=FlowRunFilterStateType(
                            any_=[t for t in StateType if t != StateType.SCHEDULED]
                        )
                    )
                ),
                sort=FlowRunSort.EXPECTED_START_TIME_DESC,
                limit=1,
            )
        )
        return runs[0] if runs else None

    async def _call(self, coroutine: Any) -> Any:
        with anyio.fail_after(self.timeout):
            return await coroutine

    @property
    def api_url(self) -> str:
        return str(self.client.api_url).rstrip("/")

    def ui_url(self, flow_run_id: UUID | str) -> str:
        """Where users see a run: the UI sits beside the API (a server's /api prefix removed)."""
        base = self.api_url.removesuffix("/api")
        return f"{base}/runs/flow-run/{flow_run_id}"

    async def ensure_work_pool(
        self,
        name: str,
        pool_type: str,
        base_job_template: dict[str, Any],
        *,
        adopt: bool = False,
        concurrency_limit: int | None = None,
        queues: list[str] | None = None,
    ) -> UUID:
        """Create the pool, bring it in line, or (adopt) use it untouched; returns its id."""
        try:
            pool = await self._call(self.client.read_work_pool(name))
        except ObjectNotFound:
            pool = None
        if pool is None:
            if adopt:
                raise PrefectError(f"work pool {name!r} to adopt does not exist")
            try:
                pool = await self._call(
                    self.client.create_work_pool(
                        WorkPoolCreate(
                            name=name,
                            type=pool_type,
                            base_job_template=base_job_template,
                            concurrency_limit=concurrency_limit,
                        )
                    )
                )
                self.writes += 1
            except ObjectAlreadyExists:
                pool = await self._call(self.client.read_work_pool(name))
        if pool.type != pool_type:
            raise PrefectError(
                f"work pool {name!r} exists with type {pool.type!r}, not {pool_type!r}"
            )
        if not adopt and (
            pool.base_job_template != base_job_template
            or pool.concurrency_limit != concurrency_limit
        ):
            await self._call(
                self.client.update_work_pool(
                    name,
                    WorkPoolUpdate(
                        base_job_template=base_job_template, concurrency_limit=concurrency_limit
                    ),
                )
            )
            self.writes += 1
        if queues:
            existing = {q.name for q in await self._call(self.client.read_work_queues(name))}
            for queue in queues:
                if queue in existing:
                    continue
                try:
                    await self._call(self.client.create_work_queue(queue, work_pool_name=name))
                    self.writes += 1
                except ObjectAlreadyExists:
                    pass
        return pool.id

    async def delete_work_pool(self, name: str) -> None:
        """Delete a pool; one that is already gone counts as deleted."""
        with contextlib.suppress(ObjectNotFound):
            await self._call(self.client.delete_work_pool(name))
            self.writes += 1

    async def ensure_deployment(self, spec: DeploymentSpec) -> UUID:
        """Upsert the deployment, skipping the write when nothing would change.

        Each deployment update deletes its future scheduled runs, so an update that changes
        nothing is not harmless.
        """
        try:
            current = await self._call(
                self.client.read_deployment_by_name(f"{spec.flow_name}/{spec.name}")
            )
        except ObjectNotFound:
            current = None
        if current is not None and not spec.differs_from(current):
            return current.id
        flow_id = await self._call(self.client.create_flow_from_name(spec.flow_name))
        deployment_id = await self._call(
            self.client.create_deployment(
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
            )
        )
        self.writes += 1
        return deployment_id

    async def create_flow_run(
        self,
        deployment_id: UUID,
        *,
        idempotency_key: str,
        parameters: dict[str, Any] | None = None,
        tags: list[str] | None = None,
        job_variables: dict[str, Any] | None = None,
    ) -> FlowRun:
        """A flow run of the deployment; the same key returns the same run, never a second."""
        flow_run = await self._call(
            self.client.create_flow_run_from_deployment(
                deployment_id,
                parameters=parameters,
                tags=tags,
                idempotency_key=idempotency_key,
                job_variables=job_variables,
            )
        )
        self.writes += 1
        return flow_run

    async def read_flow_run(self, flow_run_id: UUID) -> FlowRun:
        return await self._call(self.client.read_flow_run(flow_run_id))

    async def child_runs(self, parent_id: UUID) -> list[FlowRun]:
        """The flow runs started from inside a run (a composition's steps)."""
        return await self._call(
            self.client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])
                )
            )
        )

    async def table_artifact(self, flow_run_id: UUID, description: str) -> list[dict] | None:
        """The rows of the run's table artifact with that description, if it made one."""
        artifacts = await self._call(
            self.client.read_artifacts(
                artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["table"])),
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            )
        )
        for artifact in artifacts:
            if artifact.description == description:
                data = artifact.data
                rows = json.loads(data) if isinstance(data, str) else data
                return rows if isinstance(rows, list) else None
        return None

    async def result_of(self, flow_run: FlowRun) -> Any:
        """The persisted return value of a completed run."""
        if flow_run.state is None:
            raise PrefectError(f"flow run {flow_run.id} has no state")
        try:
            return await self._call(flow_run.state.aresult(raise_on_failure=False))
        except Exception as error:  # storage missing, serializer unknown, ...
            raise PrefectError(
                f"cannot read the result of flow run {flow_run.id}: {error}"
            ) from error

    @staticmethod
    def result_key(flow_run: FlowRun) -> str | None:
        """Where the run's return value is persisted (a storage key), when it is."""
        data = getattr(flow_run.state, "data", None)
        metadata = getattr(data, "metadata", data)
        return getattr(metadata, "storage_key", None)
