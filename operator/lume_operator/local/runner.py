"""`lume-operator run`: LumeFlows from manifest files, run on Prefect through a real worker.

The same steps the operator takes in a cluster (work pool, deployment, flow run, status), with
a Prefect process worker in this process standing in for the in-cluster agent.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import yaml
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from lume_operator.api.backend import SchedulingBackend
from lume_operator.backends import tags
from lume_operator.flows.plan import plan_steps, steps_with_mapped_tasks
from lume_operator.local.checks import (
    Checked,
    PlannedComposition,
    PlannedFlow,
)
from lume_operator.local.preload import preload_for
from lume_operator.prefect.deployment import DeploymentSpec
from lume_operator.prefect.forkserver import ForkServer
from lume_operator.prefect.gateway import PrefectGateway
from lume_operator.prefect.port import FINAL_STATES, PrefectError, idempotency_key
from lume_operator.prefect.run_ends import Wake, listened, on_run_states, wake_on_run_ends
from lume_operator.prefect.serializer import LOCAL_RESULT_ENV
from lume_operator.prefect.server import prefect_api
from lume_operator.prefect.worker import WarmProcessWorker
from lume_operator.reconcile import conditions
from lume_operator.reconcile.backend import ensure_pool
from lume_operator.reconcile.deploy import composition_deployment, flow_deployment
from lume_operator.reconcile.flowofflows import (
    StepObservation,
    apply_observation,
    observe_composition,
)
from lume_operator.reconcile.flowrun import run_status
from lume_operator.reconcile.lumeflow import follow_run, run_started
from lume_operator.reconcile.outcome import set_conditions

# Overlapping polls per worker; each may be starting a run's process.
MAX_POLLS_IN_FLIGHT = 8
FOLLOW_INTERVAL = 0.3  # seconds between reads of the runs `run` follows
# After Ctrl-C or --timeout: how long the worker gets to kill the runs' processes.
CANCEL_GRACE_SECONDS = 60.0
EXIT_INTERRUPTED = 130


@dataclass
class Stop:
    """Why the runner should stop waiting: set by Ctrl-C (or the timeout), read by the runner."""

    reason: str | None = None  # the condition reason: Interrupted or Timeout
    message: str = ""

    def set(self, reason: str, message: str) -> None:
        if self.reason is None:
            self.reason, self.message = reason, message


def _store_values_as_lume_json(spec: DeploymentSpec) -> None:
    """Local runs store return values with lume-operator's JSON (numpy arrays included).

    Their process has lume-operator installed (it is this Python); a cluster image may not,
    so the operator keeps Prefect's own JSON there.
    """
    spec.job_variables["command"] = f"{sys.executable} -m lume_operator.local.engine"
    spec.job_variables["env"] = {**spec.job_variables.get("env", {}), **LOCAL_RESULT_ENV}


@dataclass
class _Deployed:
    pool: str
    queue: str
    deployment_id: Any
    env: dict[str, str]


class LocalRunner:
    """Runs planned flows and compositions on one Prefect API and reports as it goes."""

    def __init__(
        self,
        console: Console,
        results_root: Path,
        timeout: float,
        poll_interval: float = 0.5,
        stop: Stop | None = None,
        fork_server: ForkServer | None = None,
        warm_starts: bool = True,
    ) -> None:
        """`fork_server`: started by the caller for warm starts; else each worker starts one.
        `warm_starts=False`: every flow run a new interpreter (Prefect's process worker)."""
        self.console = console
        self.fork_server = fork_server
        self.warm_starts = warm_starts
        self.results_root = results_root.resolve()
        self.timeout = timeout
        self.stop = stop or Stop()
        self.poll_interval = poll_interval
        self._pools_ready: set[str] = set()
        self._deployed: dict[str, _Deployed] = {}
        # DB results of local runs: a SQLite file beside the file results, unless configured.
        # (The store's module imports SQLAlchemy and alembic: only here, while the server starts.)
        from lume_operator.results.store import STORE_URL_ENV

        self.store_env = {
            STORE_URL_ENV: os.environ.get(STORE_URL_ENV)
            or f"sqlite:///{self.results_root / 'results.sqlite'}"
        }
        self.queues: dict[str, set[str]] = {}
        self._wake = Wake()  # a followed run was announced ended: read now

    def say(self, who: str, text: str, style: str = "") -> None:
        """One progress line; user text is never read as markup."""
        self.console.print(Text.assemble((who, "bold"), ": ", (text, style)))

    async def run(
        self, planned: list[PlannedFlow], compositions: list[PlannedComposition] | None = None
    ) -> None:
        async with PrefectGateway.connect() as gateway:
            watches: list[_Watch] = []
            for item in planned:
                try:
                    flow_run = await self._start(gateway, item)
                except PrefectError as error:
                    item.error = str(error)
                    item.status.phase = "Failed"
                    self.say(item.flow.key, str(error), "red")
                    continue
                watches.append(_FlowWatch(self, item, flow_run.id))
            for composition in compositions or []:
                try:
                    flow_run = await self._start_composition(gateway, composition)
                except PrefectError as error:
                    composition.error = str(error)
                    composition.status.phase = "Failed"
                    self.say(composition.fof.key, str(error), "red")
                    continue
                watches.append(_CompositionWatch(self, composition, flow_run.id))
            if not watches:
                return
            async with anyio.create_task_group() as group:
                workers = []
                for pool, queues in self.queues.items():
                    worker = WarmProcessWorker(
                        work_pool_name=pool,
                        work_queues=sorted(queues),
                        fork_server=self.fork_server,
                        warm_starts=self.warm_starts,
                    )
                    await worker.__aenter__()
                    workers.append(worker)
                try:
                    group.start_soon(self._poll_workers, workers)
                    group.start_soon(self._listen, watches)
                    await self._follow(gateway, watches)
                finally:
                    group.cancel_scope.cancel()
                    for worker in workers:
                        await worker.__aexit__(None, None, None)

    def run_sync(
        self, planned: list[PlannedFlow], compositions: list[PlannedComposition] | None = None
    ) -> None:
        anyio.run(self.run, planned, compositions)

    async def _ensure_pool(self, gateway: Any, backend: SchedulingBackend, queue: str) -> str:
        pool = backend.work_pool_name
        if pool not in self._pools_ready:
            await ensure_pool(gateway, backend, "process")
            self._pools_ready.add(pool)
            self.say(backend.key, f"work pool {pool!r} (process) ready")
        self.queues.setdefault(pool, set()).add(queue)
        return pool

    async def _deploy(self, gateway: Any, item: PlannedFlow) -> _Deployed:
        """The flow's work pool and deployment, once per flow however many steps use it."""
        flow, backend = item.flow, item.backend
        if flow.key in self._deployed:
            return self._deployed[flow.key]
        made = flow_deployment(
            flow,
            backend,
            backend_type="process",
            entrypoint=item.code.entrypoint,
            working_dir=str(item.code.project_dir),
            parameter_schema=item.schema,
            storage=False,
        )
        _store_values_as_lume_json(made.spec)
        item.notes.extend(made.notes)
        for note in item.notes:
            self.say(flow.key, f"note: {note}", "yellow")
        pool = await self._ensure_pool(gateway, backend, made.spec.work_queue_name)
        deployment_id = await gateway.ensure_deployment(made.spec)
        item.status.deployment_id = str(deployment_id)
        item.status.work_pool_name = pool
        self.say(flow.key, f"deployment '{flow.metadata.name}/{flow.metadata.namespace}' ready")
        self._deployed[flow.key] = _Deployed(
            pool, made.spec.work_queue_name, deployment_id, made.env
        )
        return self._deployed[flow.key]

    def _run_dir(self, namespace: str, name: str, local_uid: str) -> Path:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        run_dir = self.results_root / namespace / name / f"{stamp}-{local_uid[:8]}"
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir

    async def _start(self, gateway: Any, item: PlannedFlow) -> Any:
        flow = item.flow
        deployed = await self._deploy(gateway, item)
        local_uid = uuid.uuid4().hex
        run_dir = self._run_dir(flow.metadata.namespace, flow.metadata.name, local_uid)
        flow_run = await gateway.create_flow_run(
            deployed.deployment_id,
            idempotency_key=idempotency_key(
                flow.metadata.uid or local_uid, flow.metadata.generation, 0
            ),
            tags=tags(flow, item.backend),
            job_variables={
                "env": {**deployed.env, **self.store_env, "LUME_RESULTS_DIR": str(run_dir)}
            },
        )
        run_started(item.status, flow_run, run_status(flow_run, 0, gateway.ui_url(flow_run.id)))
        self.say(flow.key, f"flow run {flow_run.name!r} created ({gateway.ui_url(flow_run.id)})")
        self.say(flow.key, f"results directory {run_dir}")
        return flow_run

    async def _start_composition(self, gateway: Any, composition: PlannedComposition) -> Any:
        """Deploy every step's flow and the parent flow, then start the parent run."""
        fof, backend = composition.fof, composition.backend
        local_uid = uuid.uuid4().hex
        run_dir = self._run_dir(fof.metadata.namespace, fof.metadata.name, local_uid)
        persist_tasks = steps_with_mapped_tasks(fof)
        step_variables: dict[str, dict[str, Any]] = {}
        for step in fof.spec.steps:
            deployed = await self._deploy(gateway, composition.steps[step.name])
            env = {**deployed.env, **self.store_env, "LUME_RESULTS_DIR": str(run_dir / step.name)}
            if step.name in persist_tasks:  # a child maps one of its tasks' results
                env["PREFECT_TASKS_DEFAULT_PERSIST_RESULT"] = "true"
            step_variables[step.name] = {"env": env}
        uid = fof.metadata.uid or local_uid
        flows = {name: item.flow for name, item in composition.steps.items()}
        steps = plan_steps(fof, flows, uid, job_variables=step_variables)
        # The parent reads `db` mappings from the run's store.
        spec = composition_deployment(
            fof, backend, backend_type="process", extra_env=self.store_env, storage=False
        )
        _store_values_as_lume_json(spec)  # the parent reads its steps' values
        await self._ensure_pool(gateway, backend, spec.work_queue_name)
        deployment_id = await gateway.ensure_deployment(spec)
        composition_tags = spec.tags
        flow_run = await gateway.create_flow_run(
            deployment_id,
            idempotency_key=idempotency_key(uid, fof.metadata.generation, 0),
            parameters={"steps": steps, "poll_interval": self.poll_interval},
            tags=composition_tags,
        )
        composition.status.phase = "Running"
        composition.status.run = run_status(flow_run, 0, gateway.ui_url(flow_run.id))
        self.say(fof.key, f"flow run {flow_run.name!r} created ({gateway.ui_url(flow_run.id)})")
        self.say(fof.key, f"results directory {run_dir}")
        return flow_run

    async def _poll_workers(self, workers: list[Any]) -> None:
        """Poll each worker without waiting for the previous poll to finish.

        A process worker's poll returns only once each run it took has started its process,
        a few seconds each; awaited in turn, branches of a composition that should run side
        by side would start one after the other. Overlapping polls (the worker skips runs
        it is already submitting) start them together.
        """
        in_flight = dict.fromkeys(range(len(workers)), 0)

        async def poll(index: int) -> None:
            in_flight[index] += 1
            try:
                await workers[index].get_and_submit_flow_runs()
            finally:
                in_flight[index] -= 1

        scheduled = Wake()
        pools = {f"prefect.work-pool.{worker.work_pool.id}" for worker in workers}

        def announced(_: str, event: Any) -> None:
            if any(related.id in pools for related in event.related):  # a run for these workers
                scheduled.set()

        async with anyio.create_task_group() as group:
            # A run announced scheduled is polled for at once, not up to an interval later
            # (each step of a chain waited half an interval for its worker).
            group.start_soon(listened, on_run_states, ("Scheduled",), announced)
            while True:
                for index in range(len(workers)):
                    if in_flight[index] < MAX_POLLS_IN_FLIGHT:
                        group.start_soon(poll, index)
                await scheduled.wait(self.poll_interval)

    async def _listen(self, watches: list[_Watch]) -> None:
        """Read the runs as soon as one of them is announced ended (`run_ends`), not up to
        0.3 s later; without an event stream, every 0.3 s all the same."""
        ids = {str(watch.flow_run_id) for watch in watches}
        await listened(wake_on_run_ends, lambda: ids, self._wake.set)

    async def _pause(self) -> None:
        """Until the next read: 0.3 s, or less if a run was announced ended meanwhile."""
        await self._wake.wait(FOLLOW_INTERVAL)

    async def _follow(self, gateway: Any, watches: list[_Watch]) -> None:
        pending = list(watches)
        started = time.monotonic()
        while pending:
            if time.monotonic() - started > self.timeout:
                self.stop.set("Timeout", f"timed out after {self.timeout:g} s")
            if self.stop.reason:
                await self._cancel(gateway, pending)
                return
            for watch in list(pending):
                try:
                    if await watch.poll(gateway):
                        pending.remove(watch)
                except Exception as error:  # one run's surprise must not hide the others'
                    pending.remove(watch)
                    watch.broken(f"{type(error).__name__}: {error}")
            if pending:
                await self._pause()

    async def _cancel(self, gateway: Any, pending: list[_Watch]) -> None:
        """Cancel the runs still going, and wait while the worker kills their processes.

        The worker (still polling here) sees each run Cancelling, kills its process and marks
        it Cancelled; each watch then records that, with the stop's reason on its Ready condition.
        """
        self.console.print(f"[red]{escape(self.stop.message)}[/red]: cancelling the flow runs")
        for watch in pending:
            try:
                await watch.cancel(gateway)
            except PrefectError as error:
                self.say(watch.who, f"cannot cancel: {error}", "red")
        deadline = time.monotonic() + CANCEL_GRACE_SECONDS
        waiting = list(pending)
        while waiting and time.monotonic() < deadline:
            for watch in list(waiting):
                try:
                    if await watch.poll(gateway):
                        waiting.remove(watch)
                except Exception:  # the stop is recorded below whatever the poll says
                    waiting.remove(watch)
            await anyio.sleep(0.3)
        for watch in waiting:
            self.say(watch.who, "the flow run did not end Cancelled in time", "red")
        for watch in pending:
            watch.stopped(self.stop.reason or "Interrupted", self.stop.message)


class _Watch:
    """One run being followed to its end."""

    who: str
    flow_run_id: Any

    async def cancel(self, gateway: Any) -> None:
        """Ask Prefect to cancel the run (and a composition's step runs)."""
        await gateway.cancel_flow_run(str(self.flow_run_id))

    def stopped(self, reason: str, message: str) -> None:
        raise NotImplementedError

    async def poll(self, gateway: Any) -> bool:
        """Read the run's state, report changes; True once it is final."""
        raise NotImplementedError

    def broken(self, message: str) -> None:
        raise NotImplementedError


class _FlowWatch(_Watch):
    def __init__(self, runner: LocalRunner, item: PlannedFlow, flow_run_id: Any) -> None:
        self.runner, self.item, self.flow_run_id = runner, item, flow_run_id
        self.who = item.flow.key
        self.last_state: str | None = None

    async def poll(self, gateway: Any) -> bool:
        item = self.item
        await follow_run(item.flow, item.status, gateway, now=datetime.now(UTC), schedule=False)
        run = item.status.last_run
        if run and run.state and self.last_state != run.state:
            self.last_state = run.state
            self.runner.say(item.flow.key, f"flow run {run.name!r} is {run.state}")
        if not (run and run.state_type in FINAL_STATES):
            return False
        ready = next(c for c in item.status.conditions or [] if c.type == "Ready")
        if item.status.phase != "Completed":
            item.error = ready.message
            if ready.reason == "ResultsInvalid":
                self.runner.say(item.flow.key, ready.message, "red")
        return True

    def stopped(self, reason: str, message: str) -> None:
        self.item.error = f"{message}; flow run cancelled"
        self.item.status.phase = "Failed"
        set_conditions(self.item.status, conditions.failed(reason, self.item.error))

    def broken(self, message: str) -> None:
        self.item.error = message
        self.item.status.phase = "Failed"
        set_conditions(self.item.status, conditions.failed("InternalError", message))


class _CompositionWatch(_Watch):
    """The parent run of a composition and its child runs, one per step."""

    def __init__(
        self, runner: LocalRunner, composition: PlannedComposition, flow_run_id: Any
    ) -> None:
        self.runner, self.composition, self.flow_run_id = runner, composition, flow_run_id
        self.who = composition.fof.key
        self.said: dict[str, str] = {}
        self.steps: dict[str, StepObservation] = {}

    def _say(self, who: str, text: str, style: str = "") -> None:
        if self.said.get(who) != text:
            self.said[who] = text
            self.runner.say(who, text, style)

    async def poll(self, gateway: Any) -> bool:
        composition = self.composition
        fof = composition.fof
        flows = {name: item.flow for name, item in composition.steps.items()}
        seen = await observe_composition(gateway, self.flow_run_id, flows, self.steps)
        self.steps = seen.steps
        parent = seen.parent
        if parent.state:
            self._say(fof.key, f"flow run {parent.name!r} is {parent.state.name}")
        for name, step in seen.steps.items():
            who = f"{fof.key}/{name}"
            if step.run and step.run.state:
                style = {"Completed": "green", "Failed": "red"}.get(step.phase, "")
                self._say(who, f"flow run {step.run.name!r} is {step.run.state}", style)
            if step.phase == "Skipped":
                self._say(who, step.note or "skipped", "yellow")
            elif step.error and not step.run:
                self._say(who, step.error, "red")
        apply_observation(fof, composition.status, seen, gateway.ui_url(parent.id))
        if not seen.final:
            return False
        if seen.phase != "Completed":
            composition.error = seen.message or f"ended {parent.state.name}"
        return True

    async def cancel(self, gateway: Any) -> None:
        """The parent run, then every step run still going (they are not its subflows)."""
        await gateway.cancel_flow_run(str(self.flow_run_id))
        for child in await gateway.child_runs(str(self.flow_run_id)):
            if not child.final:
                await gateway.cancel_flow_run(child.id)

    def stopped(self, reason: str, message: str) -> None:
        self.composition.error = f"{message}; flow runs cancelled"
        self.composition.status.phase = "Failed"
        set_conditions(self.composition.status, conditions.failed(reason, self.composition.error))

    def broken(self, message: str) -> None:
        self.composition.error = message
        self.composition.status.phase = "Failed"
        set_conditions(self.composition.status, conditions.failed("InternalError", message))


def _document(resource: Any, status: Any) -> dict[str, Any]:
    return {
        "apiVersion": resource.api_version,
        "kind": resource.kind,
        "metadata": {"name": resource.metadata.name, "namespace": resource.metadata.namespace},
        "status": status.to_wire(),
    }


def status_documents(
    planned: Iterable[PlannedFlow], compositions: Iterable[PlannedComposition] = ()
) -> list[dict[str, Any]]:
    """Each resource as `kubectl get -o yaml` would show it: identity and status."""
    return [_document(item.flow, item.status) for item in planned] + [
        _document(item.fof, item.status) for item in compositions
    ]


def _print_results(console: Console, results: list[Any] | None, indent: str) -> None:
    for result in results or []:
        where = f" on {result.filesystem}" if result.filesystem else ""
        console.print(
            escape(f"{indent}result {result.name} ({result.type}{where}): {result.location}")
        )


def print_summary(
    console: Console,
    planned: list[PlannedFlow],
    compositions: list[PlannedComposition] | None = None,
) -> None:
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
        _print_results(console, status.results, "  ")
    for composition in compositions or []:
        status = composition.status
        console.print()
        console.print(
            f"[bold]FlowOfFlows {escape(composition.fof.key)}[/bold]  "
            f"phase: [bold]{status.phase}[/bold]"
        )
        if status.run:
            console.print(escape(f"  flow run: {status.run.name} ({status.run.id})"))
        if composition.error:
            console.print(f"  [red]error[/red]: {escape(composition.error)}")
        for step in status.steps or []:
            run = f", flow run {step.run.name} ({step.run.id})" if step.run else ""
            console.print(escape(f"  step {step.name}: {step.phase}{run}"))
            _print_results(console, step.results, "    ")


def run_local(
    checked: Checked,
    *,
    console: Console,
    results_root: Path,
    status_out: Path | None = None,
    timeout: float = 3600.0,
    verbose: bool = False,
) -> int:
    """Run what passed the checks (`checks.runnable`) and report; 0 only when everything
    completed, 130 after Ctrl-C.

    Status is merged into `status_out` (default: status.yaml in the results directory);
    Prefect's own log lines go to prefect.log there (and to the console with `verbose`).
    """
    planned, compositions = checked.planned, checked.compositions
    results_root = results_root.resolve()
    results_root.mkdir(parents=True, exist_ok=True)
    status_out = status_out or results_root / STATUS_FILE
    log_path = results_root / LOG_FILE
    stop = Stop()
    console.print(escape(f"Prefect's own log: {log_path}"), highlight=False)
    # Started first: it imports Prefect and the flows' installed dependencies while Prefect's
    # server starts, and each flow run is then forked from it (warm starts).
    sources = [(i.code.source_file, i.code.project_dir) for i in planned] + [
        (i.code.source_file, i.code.project_dir) for c in compositions for i in c.steps.values()
    ]
    # What the runner needs later and takes seconds to import (the result store; the file
    # types, which import lume-base, to check File results at a run's end; the Prefect
    # collections its worker lists to Prefect's server as it starts): imported while Prefect's
    # server starts, when this waits.
    threading.Thread(target=_preload, name="lume-imports", daemon=True).start()
    with (
        ForkServer(preload_for(sources)).start() as fork_server,
        _on_interrupt(stop),
        _prefect_log(log_path, console, verbose) as log,
    ):
        try:
            with prefect_api() as (api_url, embedded):
                log.flush()
                console.print(
                    f"Prefect API: {api_url}" + (" (embedded server)" if embedded else ""),
                    highlight=False,
                )
                if stop.reason is None:  # Ctrl-C while the server started: nothing to cancel
                    runner = LocalRunner(
                        console, results_root, timeout, stop=stop, fork_server=fork_server
                    )
                    runner.run_sync(planned, compositions)
        finally:
            started = [i for i in planned if i.status.last_run] + [
                c for c in compositions if c.status.run
            ]
            if started:
                write_status(status_out, status_documents(planned, compositions))
    print_summary(console, planned, compositions)
    if started:
        console.print(escape(f"status: {status_out}"), highlight=False)
    if stop.reason == "Interrupted":
        console.print("[red]interrupted[/red]")
        return EXIT_INTERRUPTED
    if stop.reason == "Timeout":
        console.print(f"[red]{escape(stop.message)}[/red]")
    done = [item.status.phase for item in planned] + [c.status.phase for c in compositions]
    return 0 if all(phase == "Completed" for phase in done) else 1


def _preload() -> None:
    from prefect.plugins import load_prefect_collections

    for module in ("lume_operator.results.store", "lume_operator.results.files"):
        with contextlib.suppress(Exception):  # imported again, and failing there, when needed
            importlib.import_module(module)
    with contextlib.suppress(Exception):  # loaded again by the worker's start, as Prefect does
        load_prefect_collections()


STATUS_FILE = "status.yaml"
LOG_FILE = "prefect.log"


def _key(document: dict[str, Any]) -> tuple[str, str, str]:
    metadata = document.get("metadata") or {}
    return (
        str(document.get("kind")),
        str(metadata.get("namespace")),
        str(metadata.get("name")),
    )


def write_status(path: Path, documents: list[dict[str, Any]]) -> None:
    """Merge documents into the status file, one per resource (kind, namespace, name).

    Resources of earlier runs stay; this run's replace theirs. An unreadable file is replaced.
    """
    merged: dict[tuple[str, str, str], dict[str, Any]] = {}
    if path.is_file():
        try:
            existing = [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            existing = []
        merged = {_key(document): document for document in existing}
    for document in documents:
        merged[_key(document)] = document
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump_all(list(merged.values()), sort_keys=False))


@contextlib.contextmanager
def _on_interrupt(stop: Stop) -> Iterator[None]:
    """Ctrl-C asks the runner to cancel its runs; a second one stops at once."""
    if sys.platform == "win32" or signal.getsignal(signal.SIGINT) is None:
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        stop.set("Interrupted", "interrupted")
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class _Tee:
    """A text stream writing to the log file, and also to the console's stream if verbose."""

    def __init__(self, log: Any, echo: Any | None) -> None:
        self.log, self.echo = log, echo

    def write(self, text: str) -> int:
        self.log.write(text)
        if self.echo is not None:
            self.echo.write(text)
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        if self.echo is not None:
            self.echo.flush()

    def isatty(self) -> bool:
        return False


@contextlib.contextmanager
def _prefect_log(path: Path, console: Console, verbose: bool) -> Iterator[_Tee]:
    """Prefect's own lines (its loggers, the worker, the flow runs' output) go to `path`.

    The console keeps the progress lines; with `verbose`, Prefect's lines are shown there too.
    """
    original_out, original_err = sys.stdout, sys.stderr
    console.file = original_out
    with path.open("a", encoding="utf-8") as log:
        tee = _Tee(log, original_err if verbose else None)
        swapped = []
        for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
            for handler in getattr(logger, "handlers", []):
                if isinstance(handler, logging.StreamHandler) and not isinstance(
                    handler, logging.FileHandler
                ):
                    swapped.append((handler, handler.stream))
                    handler.setStream(tee)  # type: ignore[arg-type]
                    if hasattr(handler, "console"):  # Prefect's handler prints through rich
                        handler.console.file = tee
        sys.stdout = sys.stderr = tee  # type: ignore[assignment]
        try:
            yield tee
        finally:
            sys.stdout, sys.stderr = original_out, original_err
            for handler, stream in swapped:
                handler.setStream(stream)
                if hasattr(handler, "console"):
                    handler.console.file = stream
