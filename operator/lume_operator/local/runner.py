"""`lume-operator run`: LumeFlows from manifest files, run on Prefect through a real worker.

The same steps the operator takes in a cluster (work pool, deployment, flow run, status), with
a Prefect process worker in this process standing in for the in-cluster agent.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import yaml
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from lume_operator.api.backend import SchedulingBackend
from lume_operator.api.common import Condition
from lume_operator.api.flow import LumeFlow, LumeFlowStatus
from lume_operator.api.manifests import Manifests, Problem, load
from lume_operator.backends import get_backend, tags, work_queue
from lume_operator.local.checks import (
    CodeProblem,
    LocalFlowCode,
    check_parameters,
    composition_problems_local,
    locate,
    parameter_schema,
)
from lume_operator.reconcile.flowrun import (
    ResultError,
    idempotency_key,
    phase_of,
    result_statuses,
    run_status,
)

FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

# What every local flow run gets: results persisted as JSON, so status can list them.
RESULT_ENV = {
    "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
    # Only the flow's return value is persisted: tasks that pass arrays around stay in memory.
    "PREFECT_TASKS_DEFAULT_PERSIST_RESULT": "false",
    "PREFECT_RESULTS_DEFAULT_SERIALIZER": "json",
}


@dataclass
class PlannedFlow:
    """A LumeFlow with everything resolved for a local run."""

    flow: LumeFlow
    backend: SchedulingBackend
    code: LocalFlowCode
    schema: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    status: LumeFlowStatus = field(default_factory=LumeFlowStatus)
    error: str | None = None


def plan(manifests: Manifests) -> tuple[list[PlannedFlow], list[Problem]]:
    """Resolve backends, code and parameters of every LumeFlow; problems instead of raising."""
    planned: list[PlannedFlow] = []
    problems: list[Problem] = []
    for flow in manifests.flows:
        origin = manifests.origin(flow)
        source = f"{origin.source} (LumeFlow {flow.metadata.name})" if origin else flow.key
        backend = manifests.backend(flow.metadata.namespace, flow.spec.backend_ref.name)
        if backend is None:
            have = ", ".join(b.metadata.name for b in manifests.backends) or "none"
            problems.append(
                Problem(
                    source,
                    "spec.backendRef.name",
                    f"SchedulingBackend {flow.spec.backend_ref.name!r} is not in the manifests "
                    f"given (namespace {flow.metadata.namespace!r}; have: {have})",
                )
            )
            continue
        labels = set(backend.spec.labels or [])
        for index, label in enumerate(flow.spec.labels or []):
            if label not in labels:
                problems.append(
                    Problem(
                        source,
                        f"spec.labels[{index}]",
                        f"{label!r} is not a label of backend {backend.metadata.name!r} "
                        f"(it has: {', '.join(sorted(labels)) or 'none'})",
                    )
                )
        manifest_dir = origin.path.parent if origin and origin.path else Path.cwd()
        try:
            code = locate(flow, manifest_dir)
            schema = parameter_schema(code)
            bad = check_parameters(code, flow.spec.parameters or {}, schema)
        except CodeProblem as problem:
            problems.append(Problem(source, problem.path, str(problem)))
            continue
        problems.extend(Problem(source, p.path, str(p)) for p in bad)
        if not bad:
            planned.append(PlannedFlow(flow, backend, code, schema))
    return planned, problems


class LocalRunner:
    """Runs planned flows on one Prefect API and reports as it goes."""

    def __init__(self, console: Console, results_root: Path, timeout: float) -> None:
        self.console = console
        self.results_root = results_root.resolve()
        self.timeout = timeout
        self._pools_ready: set[str] = set()

    def say(self, who: str, text: str, style: str = "") -> None:
        """One progress line; user text is never read as markup."""
        self.console.print(Text.assemble((who, "bold"), ": ", (text, style)))

    async def run(self, planned: list[PlannedFlow]) -> None:
        from prefect.workers.process import ProcessWorker

        from lume_operator.prefect.gateway import PrefectError, PrefectGateway

        async with PrefectGateway.connect() as gateway:
            pools: dict[str, set[str]] = {}
            runs: dict[str, tuple[PlannedFlow, Any]] = {}
            for item in planned:
                try:
                    pool, queue, flow_run = await self._start(gateway, item)
                except PrefectError as error:
                    item.error = str(error)
                    item.status.phase = "Failed"
                    self.say(item.flow.key, str(error), "red")
                    continue
                pools.setdefault(pool, set()).add(queue)
                runs[str(flow_run.id)] = (item, flow_run)
            if not runs:
                return
            async with anyio.create_task_group() as group:
                workers = []
                for pool, queues in pools.items():
                    worker = ProcessWorker(work_pool_name=pool, work_queues=sorted(queues))
                    await worker.__aenter__()
                    workers.append(worker)
                try:
                    group.start_soon(self._poll_workers, workers)
                    await self._follow(gateway, runs)
                finally:
                    group.cancel_scope.cancel()
                    for worker in workers:
                        await worker.__aexit__(None, None, None)

    def run_sync(self, planned: list[PlannedFlow]) -> None:
        anyio.run(self.run, planned)

    async def _start(self, gateway: Any, item: PlannedFlow) -> tuple[str, str, Any]:
        from lume_operator.prefect.gateway import DeploymentSpec

        flow, backend = item.flow, item.backend
        declared = backend.spec.type
        runner = get_backend("process")
        if declared != "process":
            item.notes.append(
                f"backend {backend.metadata.name!r} is {declared}; runs here as a local process"
            )
        config, ignored = runner.run_config(backend.spec.run_config, flow.spec.run_config)
        if ignored:
            item.notes.append(f"run-config fields that do not apply locally: {', '.join(ignored)}")
        for note in item.notes:
            self.say(flow.key, f"note: {note}", "yellow")
        variables = runner.job_variables(config)
        variables["env"] = {**RESULT_ENV, **variables.get("env", {})}
        pool = backend.work_pool_name
        queues = backend.spec.labels or []
        adopt = bool(backend.spec.work_pool and backend.spec.work_pool.adopt)
        limit = backend.spec.work_pool.concurrency_limit if backend.spec.work_pool else None
        if pool not in self._pools_ready:
            await gateway.ensure_work_pool(
                pool,
                runner.work_pool_type,
                runner.base_job_template(),
                adopt=adopt,
                concurrency_limit=limit,
                queues=queues,
            )
            self._pools_ready.add(pool)
            self.say(backend.key, f"work pool {pool!r} ({runner.work_pool_type}) ready")
        queue = work_queue(flow)
        deployment = DeploymentSpec(
            flow_name=flow.metadata.name,
            name=flow.metadata.namespace,
            entrypoint=item.code.entrypoint,
            work_pool_name=pool,
            work_queue_name=queue,
            job_variables=variables,
            parameters=flow.spec.parameters or {},
            tags=tags(flow, backend),
            pull_steps=[
                {
                    "prefect.deployments.steps.set_working_directory": {
                        "directory": str(item.code.project_dir)
                    }
                }
            ],
            parameter_openapi_schema=item.schema,
            description=f"LumeFlow {flow.key}, managed by lume-operator.",
        )
        deployment_id = await gateway.ensure_deployment(deployment)
        item.status.deployment_id = str(deployment_id)
        item.status.work_pool_name = pool
        self.say(flow.key, f"deployment '{flow.metadata.name}/{flow.metadata.namespace}' ready")
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        local_uid = uuid.uuid4().hex
        run_dir = (
            self.results_root
            / flow.metadata.namespace
            / flow.metadata.name
            / f"{stamp}-{local_uid[:8]}"
        )
        run_dir.mkdir(parents=True, exist_ok=True)
        flow_run = await gateway.create_flow_run(
            deployment_id,
            idempotency_key=idempotency_key(
                flow.metadata.uid or local_uid, flow.metadata.generation, 0
            ),
            tags=tags(flow, backend),
            job_variables={"env": {**variables["env"], "LUME_RESULTS_DIR": str(run_dir)}},
        )
        item.status.phase = "Running"
        item.status.last_run = run_status(flow_run, 0, gateway.ui_url(flow_run.id))
        self.say(flow.key, f"flow run {flow_run.name!r} created ({gateway.ui_url(flow_run.id)})")
        self.say(flow.key, f"results directory {run_dir}")
        return pool, queue, flow_run

    async def _poll_workers(self, workers: list[Any]) -> None:
        while True:
            for worker in workers:
                await worker.get_and_submit_flow_runs()
            await anyio.sleep(0.5)

    async def _follow(self, gateway: Any, runs: dict[str, tuple[PlannedFlow, Any]]) -> None:
        pending = dict(runs)
        last_state: dict[str, str] = {}
        started = time.monotonic()
        while pending:
            if time.monotonic() - started > self.timeout:
                for item, _ in pending.values():
                    item.error = f"timed out after {self.timeout:.0f} s waiting for the flow run"
                    item.status.phase = "Failed"
                    item.status.conditions = [_ready(False, "Timeout", item.error)]
                    self.say(item.flow.key, item.error, "red")
                return
            for run_id, (item, _) in list(pending.items()):
                flow_run = await gateway.read_flow_run(uuid.UUID(run_id))
                state = flow_run.state
                if state and last_state.get(run_id) != state.name:
                    last_state[run_id] = state.name
                    self.say(item.flow.key, f"flow run {flow_run.name!r} is {state.name}")
                item.status.last_run = run_status(flow_run, 0, gateway.ui_url(flow_run.id))
                if state and state.type.value in FINAL_STATES:
                    del pending[run_id]
                    try:
                        await self._finish(gateway, item, flow_run)
                    except Exception as error:  # one flow's surprise must not hide the others'
                        item.status.phase = "Failed"
                        item.error = f"{type(error).__name__}: {error}"
                        item.status.conditions = [_ready(False, "InternalError", item.error)]
            await anyio.sleep(0.3)

    async def _finish(self, gateway: Any, item: PlannedFlow, flow_run: Any) -> None:
        from lume_operator.prefect.gateway import PrefectError

        state_type = flow_run.state.type.value
        item.status.phase = phase_of(state_type)
        if state_type != "COMPLETED":
            item.error = flow_run.state.message or f"flow run ended {flow_run.state.name}"
            item.status.conditions = [_ready(False, "FlowRunFailed", item.error)]
            return
        try:
            value = await gateway.result_of(flow_run)
            item.status.results = result_statuses(
                value, item.flow.spec.results, gateway.result_key(flow_run)
            )
        except (PrefectError, ResultError) as error:
            item.status.phase = "Failed"
            item.error = str(error)
            item.status.conditions = [_ready(False, "ResultsInvalid", item.error)]
            return
        item.status.conditions = [_ready(True, "FlowRunCompleted", "")]


def _ready(ok: bool, reason: str, message: str) -> Condition:
    return Condition(
        type="Ready",
        status="True" if ok else "False",
        reason=reason,
        message=message,
        last_transition_time=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def status_documents(planned: Iterable[PlannedFlow]) -> list[dict[str, Any]]:
    """Each flow as `kubectl get -o yaml` would show it: identity and status."""
    return [
        {
            "apiVersion": item.flow.api_version,
            "kind": item.flow.kind,
            "metadata": {
                "name": item.flow.metadata.name,
                "namespace": item.flow.metadata.namespace,
            },
            "status": item.status.to_wire(),
        }
        for item in planned
    ]


def print_summary(console: Console, planned: list[PlannedFlow]) -> None:
    for item in planned:
        status = item.status
        run = status.last_run
        console.print()
        console.print(
            f"[bold]LumeFlow {escape(item.flow.key)}[/bold]  phase: [bold]{status.phase}[/bold]"
        )
        if run:
            console.print(escape(f"  flow run: {run.name} ({run.id}), state {run.state}"))
        if item.error:
            console.print(f"  [red]error[/red]: {escape(item.error)}")
        for result in status.results or []:
            where = f" on {result.filesystem}" if result.filesystem else ""
            console.print(
                escape(f"  result {result.name} ({result.type}{where}): {result.location}")
            )


def run_local(
    paths: list[str],
    *,
    console: Console,
    results_root: Path,
    status_out: Path | None = None,
    timeout: float = 3600.0,
) -> int:
    """Validate, run and report; the exit code is 0 only when every flow completed."""
    manifests = load(paths)
    problems = list(manifests.problems)
    planned, plan_problems = plan(manifests)
    problems.extend(plan_problems)
    problems.extend(composition_problems_local(manifests))
    if problems:
        for problem in problems:
            console.print(f"[red]error[/red] {escape(str(problem))}")
        console.print(f"{len(problems)} problem(s); nothing was run.")
        return 1
    for fof in manifests.compositions:
        console.print(
            f"[yellow]note[/yellow]: FlowOfFlows {escape(fof.key)} is valid but not run: "
            "running compositions is not implemented yet"
        )
    if not planned:
        console.print("[red]error[/red] no LumeFlow in the manifests given; nothing to run.")
        return 1
    from lume_operator.prefect.server import prefect_api

    with prefect_api() as (api_url, embedded):
        console.print(
            f"Prefect API: {api_url}" + (" (embedded server)" if embedded else ""), highlight=False
        )
        LocalRunner(console, results_root, timeout).run_sync(planned)
    print_summary(console, planned)
    if status_out:
        status_out.parent.mkdir(parents=True, exist_ok=True)
        status_out.write_text(yaml.safe_dump_all(status_documents(planned), sort_keys=False))
    return 0 if all(item.status.phase == "Completed" for item in planned) else 1
