"""An in-memory Prefect behind the port, for unit tests of every decision in milliseconds.

It keeps what the real server keeps for lume-operator's calls (pools, deployments, runs by
idempotency key, child runs, artifacts, results) and lets a test play the rest: move a run to
a state, give it a result, or make the next calls fail as an outage or a refusal would.
"""

from __future__ import annotations

import copy
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from lume_operator.prefect.deployment import DeploymentSpec, DeploymentView
from lume_operator.prefect.port import (
    ACTIVE_STATES,
    FlowRunView,
    PrefectError,
    PrefectRejected,
    RunState,
    WorkPoolView,
    check_pool,
    owned_by,
    owner_mark,
)

_STATE_NAMES = {
    "SCHEDULED": "Scheduled",
    "PENDING": "Pending",
    "RUNNING": "Running",
    "PAUSED": "Paused",
    "CANCELLING": "Cancelling",
    "COMPLETED": "Completed",
    "FAILED": "Failed",
    "CRASHED": "Crashed",
    "CANCELLED": "Cancelled",
}


@dataclass
class _Run:
    view: FlowRunView
    deployment_id: str
    parameters: dict[str, Any]
    job_variables: dict[str, Any]
    parent_id: str | None = None
    result: Any = None
    has_result: bool = False
    start_in: float | None = None


@dataclass
class FakePrefect:
    """`PrefectPort` in memory. `calls` counts each operation; `writes` counts changes."""

    api_url: str = "http://prefect.test/api"
    pools: dict[str, WorkPoolView] = field(default_factory=dict)
    deployments: dict[tuple[str, str], tuple[DeploymentSpec, DeploymentView]] = field(
        default_factory=dict
    )
    runs: dict[str, _Run] = field(default_factory=dict)
    artifacts: dict[tuple[str, str], list[dict]] = field(default_factory=dict)
    blocks: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)
    # The time new runs are created at (RFC 3339), for deadline decisions.
    now: str = "2026-01-01T00:00:00+00:00"
    writes: int = 0
    # Raised by every call while set: an outage (PrefectUnreachable) or a refusal.
    failure: PrefectError | None = None
    _keys: dict[tuple[str, str], str] = field(default_factory=dict)

    # ---- what a test plays -------------------------------------------------------------

    def set_state(self, run_id: str, state_type: str, message: str | None = None) -> None:
        """Move a run on, as a worker and the flow would."""
        view = self.runs[run_id].view
        view.state = RunState(_STATE_NAMES[state_type], state_type, message)
        if state_type == "RUNNING" and view.start_time is None:
            view.start_time = "2026-01-01T00:00:00+00:00"
        if view.state.final:
            view.end_time = "2026-01-01T00:01:00+00:00"

    def set_result(
        self, run_id: str, value: Any, key: str | None = None, serializer: str = "json"
    ) -> None:
        """The run's persisted return value, and where it is (a storage key)."""
        run = self.runs[run_id]
        run.result, run.has_result = value, True
        run.view.result_key = key or f"/results/{run_id}"
        run.view.result_serializer = serializer

    def add_child(self, parent_id: str, deployment_id: str, tags: list[str]) -> str:
        """A run started from inside `parent_id` (a composition's step)."""
        run_id = self._new_run(deployment_id, {}, {}, tags)
        self.runs[run_id].parent_id = parent_id
        return run_id

    def set_artifact(self, run_id: str, description: str, rows: list[dict]) -> None:
        self.artifacts[(run_id, description)] = rows

    def deployment(self, flow_name: str, name: str) -> DeploymentSpec | None:
        found = self.deployments.get((flow_name, name))
        return found[0] if found else None

    def runs_of(self, deployment_id: str) -> list[FlowRunView]:
        return [r.view for r in self.runs.values() if r.deployment_id == deployment_id]

    # ---- the port ----------------------------------------------------------------------

    def _enter(self, operation: str) -> None:
        self.calls[operation] += 1
        if self.failure is not None:
            raise self.failure

    def ui_url(self, flow_run_id: str) -> str:
        return f"{self.api_url.removesuffix('/api')}/runs/flow-run/{flow_run_id}"

    async def health(self) -> None:
        self._enter("health")

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
        self._enter("ensure_work_pool")
        pool = self.pools.get(name)
        if pool is None:
            if adopt:
                raise PrefectRejected(f"work pool {name!r} to adopt does not exist", 404)
            pool = WorkPoolView(
                str(uuid.uuid4()), name, pool_type, {}, None, ["default"], owner_mark(owner)
            )
            self.pools[name] = pool
            self.writes += 1
        check_pool(name, pool_type, pool.type, pool.description, owner=owner, adopt=adopt)
        if not adopt and (
            pool.base_job_template != base_job_template
            or pool.concurrency_limit != concurrency_limit
        ):
            pool.base_job_template = copy.deepcopy(base_job_template)
            pool.concurrency_limit = concurrency_limit
            self.writes += 1
        for queue in queues or []:
            if queue not in pool.queues:
                pool.queues.append(queue)
                self.writes += 1
        return pool.id

    async def ensure_result_storage(self, name: str, fields: dict[str, Any]) -> str:
        self._enter("ensure_result_storage")
        if self.blocks.get(name) != fields:
            self.blocks[name] = copy.deepcopy(fields)
            self.writes += 1
        return f"block-{name}"

    async def delete_result_storage(self, name: str) -> None:
        self._enter("delete_result_storage")
        if self.blocks.pop(name, None) is not None:
            self.writes += 1

    async def delete_work_pool(self, name: str, owner: str | None = None) -> None:
        self._enter("delete_work_pool")
        pool = self.pools.get(name)
        if pool is None or (owner and not owned_by(pool.description, owner)):
            return
        del self.pools[name]
        self.writes += 1

    async def ensure_deployment(self, spec: DeploymentSpec, *, fresh: bool = False) -> str:
        self._enter("ensure_deployment")
        key = (spec.flow_name, spec.name)
        found = self.deployments.get(key)
        if not fresh and found is not None and not spec.differs_from(found[1]):
            return found[1].id
        view = DeploymentView(
            id=found[1].id if found else str(uuid.uuid4()),
            flow_name=spec.flow_name,
            name=spec.name,
            entrypoint=spec.entrypoint,
            work_pool_name=spec.work_pool_name,
            work_queue_name=spec.work_queue_name,
            job_variables=copy.deepcopy(spec.job_variables),
            parameters=copy.deepcopy(spec.parameters),
            tags=list(spec.tags),
            pull_steps=copy.deepcopy(spec.pull_steps) or None,
            description=spec.description,
            schedules=list(spec.schedules or []),
            parameter_openapi_schema=spec.parameter_openapi_schema,
        )
        self.deployments[key] = (copy.deepcopy(spec), view)
        self.writes += 1
        return view.id

    async def delete_deployment(self, flow_name: str, name: str) -> None:
        self._enter("delete_deployment")
        if self.deployments.pop((flow_name, name), None) is not None:
            self.writes += 1

    def _new_run(
        self,
        deployment_id: str,
        parameters: dict[str, Any],
        job_variables: dict[str, Any],
        tags: list[str],
        key: str | None = None,
    ) -> str:
        run_id = str(uuid.uuid4())
        view = FlowRunView(
            id=run_id,
            name=f"run-{len(self.runs) + 1}",
            state=RunState("Scheduled", "SCHEDULED"),
            tags=list(tags),
            deployment_id=deployment_id,
            created_time=self.now,
            expected_start_time=self.now,
            idempotency_key=key,
            parameters=dict(parameters),
        )
        self.runs[run_id] = _Run(view, deployment_id, parameters, job_variables)
        self.writes += 1
        return run_id

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
        self._enter("create_flow_run")
        if not any(view.id == deployment_id for _spec, view in self.deployments.values()):
            raise PrefectRejected(f"deployment {deployment_id} not found", 404)
        key = (deployment_id, idempotency_key)
        if key not in self._keys:
            self._keys[key] = self._new_run(
                deployment_id,
                dict(parameters or {}),
                dict(job_variables or {}),
                list(tags or []),
                idempotency_key,
            )
            run = self.runs[self._keys[key]]
            run.start_in = start_in
            if start_in:
                start = datetime.fromisoformat(self.now) + timedelta(seconds=start_in)
                run.view.expected_start_time = start.isoformat()
        return copy.copy(self.runs[self._keys[key]].view)

    async def read_flow_run(self, flow_run_id: str) -> FlowRunView:
        self._enter("read_flow_run")
        run = self.runs.get(flow_run_id)
        if run is None:
            raise PrefectRejected(f"flow run {flow_run_id} not found", 404)
        return copy.copy(run.view)

    async def read_flow_runs(self, flow_run_ids: list[str]) -> list[FlowRunView]:
        if not flow_run_ids:
            return []  # as the gateway: no request for nothing
        self._enter("read_flow_runs")
        return [copy.copy(self.runs[i].view) for i in flow_run_ids if i in self.runs]

    async def active_runs(self, deployment_id: str) -> list[FlowRunView]:
        self._enter("active_runs")
        return [
            copy.copy(r.view)
            for r in self.runs.values()
            if r.deployment_id == deployment_id and r.view.state.type in ACTIVE_STATES
        ]

    async def latest_run(self, deployment_id: str) -> FlowRunView | None:
        self._enter("latest_run")
        started = [
            r.view
            for r in self.runs.values()
            if r.deployment_id == deployment_id
            and r.view.state
            and r.view.state.type != "SCHEDULED"
        ]
        return copy.copy(started[-1]) if started else None

    async def child_runs(self, parent_id: str) -> list[FlowRunView]:
        self._enter("child_runs")
        return [copy.copy(r.view) for r in self.runs.values() if r.parent_id == parent_id]

    async def cancel_flow_run(self, flow_run_id: str, *, force: bool = False) -> None:
        """As Prefect's rules do: a run no worker took is Cancelled at once; a running one is
        Cancelling until a test plays its worker (`set_state(..., "CANCELLED")`)."""
        self._enter("cancel_flow_run")
        run = self.runs.get(flow_run_id)
        if run is None or run.view.final:
            return
        taken = run.view.state.type not in ("SCHEDULED", "PENDING")
        self.set_state(flow_run_id, "CANCELLING" if taken and not force else "CANCELLED")
        self.writes += 1

    async def table_artifact(self, flow_run_id: str, description: str) -> list[dict] | None:
        self._enter("table_artifact")
        return self.artifacts.get((flow_run_id, description))

    async def result_of(self, flow_run: FlowRunView) -> Any:
        self._enter("result_of")
        run = self.runs.get(flow_run.id)
        if run is None or not run.has_result:
            raise PrefectRejected(f"cannot read the result of flow run {flow_run.id}: none stored")
        return copy.deepcopy(run.result)
