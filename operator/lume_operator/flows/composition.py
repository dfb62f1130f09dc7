"""The parent flow that runs a FlowOfFlows: each step a child run of its deployment, as a DAG.

It runs where the steps run (a run of the composition's backend), not in the operator: the
values it maps between steps are the steps' persisted results, and only that runtime is sure
to reach the result storage (a volume the workers mount). It also keeps going when the operator
restarts, and Prefect shows the whole pipeline as one run with its child runs.

The plan it takes is plain JSON made by `plan_steps` (see `lume_operator.flows.plan`), so this
module imports nothing but Prefect: it is loaded by every composition run.
"""

from __future__ import annotations

from typing import Any

import anyio
from prefect import flow, get_run_logger
from prefect._internal.engine import dynamic_key_for_task_run
from prefect.artifacts import acreate_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas import TaskRunResult
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.context import FlowRunContext
from prefect.states import Cancelling, Pending, Scheduled
from prefect.tasks import Task
from prefect.utilities.slugify import slugify

from lume_operator.api.keypath import KeyPathError, walk
from lume_operator.prefect.run_ends import Wake, listened, wake_on_run_ends

FLOW_NAME = "FlowOfFlows"
ENTRYPOINT = f"{__name__}:run_flow_of_flows"
STEP_TAG = "lume.dev/step="
# How long task runs of a finished step may take to show up (they are reported as events).
TASK_RUNS_GRACE = 15.0
OUTCOME_DESCRIPTION = "lume-operator: how each step of the FlowOfFlows ended"
DESCRIPTION_KEYS = ("filename", "filesystem_identifier", "file_type_string")
# Child runs read per request: Prefect's default page limit.
READ_CHUNK = 200


class MappingError(Exception):
    """A mapped parameter whose value cannot be taken from its parent's output."""


class StepsFailed(Exception):
    """Raised at the end of a composition in which a step did not complete."""


def step_of(tags: list[str] | None) -> str | None:
    """The step a child flow run belongs to, from its tags."""
    for tag in tags or []:
        if tag.startswith(STEP_TAG):
            return tag.removeprefix(STEP_TAG)
    return None


def index_into(value: Any, index: list[str | int] | None, where: str) -> Any:
    """`value[k1][k2]...`; a key that does not resolve is named with what was there instead."""
    try:
        return walk(value, index)
    except KeyPathError as error:
        raise MappingError(f"{where}: attributeIndex {error}") from None


def _is_description(value: Any) -> bool:
    return isinstance(value, dict) and all(key in value for key in DESCRIPTION_KEYS)


class _Composition:
    """State of one composition run: which steps ended how, and their outputs."""

    def __init__(self, steps: list[dict[str, Any]], poll_interval: float) -> None:
        self.steps = {step["name"]: step for step in steps}
        self.poll_interval = poll_interval
        self.done = {name: anyio.Event() for name in self.steps}
        self.outcome: dict[str, dict[str, Any]] = {}
        self.runs: dict[str, Any] = {}
        self.outputs: dict[tuple[str, str | None], Any] = {}
        self.logger = get_run_logger()
        # Each deployment read once, however many steps (and retries) run it.
        self._deployments: dict[str, Any] = {}
        self._deployment_locks: dict[str, anyio.Lock] = {}
        # The task run standing for each step in this run (its children link to it).
        self._task_runs: dict[str, Any] = {}
        # Child runs in flight, read together by one poller: one request per interval.
        self._watched: dict[Any, anyio.Event] = {}
        self._latest: dict[Any, Any] = {}
        self._wake = Wake()  # a watched run's end was announced: read now
        # One creation at a time: a SQLite Prefect server takes one write at a time, and
        # concurrent ones wait on its lock and retry with backoff (8 creations at once took
        # 6 s where 8 in a row took 0.2 s).
        self._creating = anyio.Lock()

    async def run(self) -> dict[str, dict[str, Any]]:
        async with get_client() as client, anyio.create_task_group() as group:
            group.start_soon(self._poll, client)
            group.start_soon(self._listen)
            async with anyio.create_task_group() as steps:
                for step in self.steps.values():
                    steps.start_soon(self._run_step, client, step)
            group.cancel_scope.cancel()
        return self.outcome

    async def _poll(self, client: Any) -> None:
        """Every interval, or as soon as one's end is announced, one read of all child runs in
        flight; wakes those that ended."""
        while True:
            await self._wake.wait(self.poll_interval)  # set during the read: again at once
            if not self._watched:
                continue
            ids = list(self._watched)
            runs = []
            try:
                for start in range(0, len(ids), READ_CHUNK):
                    chunk = ids[start : start + READ_CHUNK]
                    runs += await client.read_flow_runs(
                        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=chunk)),
                        limit=len(chunk),
                    )
            except Exception as error:  # an outage: read again next interval
                self.logger.warning("reading the steps' runs failed: %s", error)
                continue
            for run in runs:
                self._latest[run.id] = run
                if run.state is not None and run.state.is_final() and run.id in self._watched:
                    self._watched.pop(run.id).set()

    async def _listen(self) -> None:
        """Wake the poller when a watched run's end is announced (`run_ends`)."""

        def failed(error: Exception) -> None:
            self.logger.debug(
                "no event stream; steps' ends are read every %g s: %s", self.poll_interval, error
            )

        await listened(
            wake_on_run_ends,
            lambda: {str(run_id) for run_id in self._watched},
            self._wake.set,
            failed=failed,
        )

    async def _deployment(self, client: Any, name: str) -> Any:
        lock = self._deployment_locks.setdefault(name, anyio.Lock())
        async with lock:
            if name not in self._deployments:
                self._deployments[name] = await client.read_deployment_by_name(name)
        return self._deployments[name]

    async def _start_child(
        self, client: Any, step: dict[str, Any], parameters: dict[str, Any], attempt: int
    ) -> Any:
        """The step's child run, linked to this run as `run_deployment` links a subflow:
        through a task run standing for the step (its mapped parents as its inputs)."""
        deployment = await self._deployment(client, step["deployment"])
        async with self._creating:
            return await self._create_child(client, step, parameters, attempt, deployment)

    async def _create_child(
        self,
        client: Any,
        step: dict[str, Any],
        parameters: dict[str, Any],
        attempt: int,
        deployment: Any,
    ) -> Any:
        name = step["name"]
        context = FlowRunContext.get()
        parent_task_run_id = None
        if context is not None and context.flow_run is not None:
            stand_in = Task(name=step["deployment"], fn=lambda: None, version=deployment.version)
            stand_in.task_key = (
                f"prefect.deployments.flow_runs.run_deployment.{slugify(step['deployment'])}"
            )
            inputs = {
                param: [TaskRunResult(id=self._task_runs[m["parent"]])]
                for param, m in (step.get("mapped") or {}).items()
                if m["parent"] in self._task_runs
            }
            task_run = await client.create_task_run(
                task=stand_in,
                flow_run_id=context.flow_run.id,
                dynamic_key=dynamic_key_for_task_run(context, stand_in),
                task_inputs=inputs,
                state=Pending(),
            )
            self._task_runs[name] = parent_task_run_id = task_run.id
        return await client.create_flow_run_from_deployment(
            deployment.id,
            parameters=parameters,
            state=Scheduled(),
            # Each attempt its own run, each as idempotent as the first.
            idempotency_key=step["key"] if not attempt else f"{step['key']}/{attempt}",
            tags=[*step.get("tags", []), f"{STEP_TAG}{name}"],
            parent_task_run_id=parent_task_run_id,
            job_variables=step.get("jobVariables"),
        )

    async def _wait(self, flow_run: Any, timeout: float | None) -> Any:
        """The child run once final, or as last read when `timeout` seconds passed."""
        ended = self._watched.setdefault(flow_run.id, anyio.Event())
        with anyio.move_on_after(timeout):
            await ended.wait()
        self._watched.pop(flow_run.id, None)
        return self._latest.get(flow_run.id, flow_run)

    async def _run_step(self, client: Any, step: dict[str, Any]) -> None:
        name = step["name"]
        try:
            await self._run_step_inner(client, step)
        except Exception as error:  # a broken step must not take its siblings with it
            self.outcome[name] = {"state": "FAILED", "message": f"{type(error).__name__}: {error}"}
        finally:
            self.done[name].set()

    async def _run_step_inner(self, client: Any, step: dict[str, Any]) -> None:
        name = step["name"]
        parents = sorted({m["parent"] for m in (step.get("mapped") or {}).values()})
        for parent in parents:
            await self.done[parent].wait()
        blocked = [p for p in parents if self.outcome[p]["state"] != "COMPLETED"]
        if blocked:
            self.outcome[name] = {
                "state": "SKIPPED",
                "message": f"not run: parent step {', '.join(map(repr, blocked))} did not complete",
            }
            self.logger.info("step %r skipped: %s", name, self.outcome[name]["message"])
            return
        parameters = dict(step.get("parameters") or {})
        try:
            for param, mapping in (step.get("mapped") or {}).items():
                parameters[param] = await self._mapped_value(client, name, param, mapping)
        except MappingError as error:
            self.outcome[name] = {"state": "FAILED", "message": str(error)}
            self.logger.error("step %r not started: %s", name, error)
            return
        retries = int(step.get("retries") or 0)
        for attempt in range(retries + 1):
            self.logger.info("step %r starting (%s)", name, step["deployment"])
            flow_run = await self._start_child(client, step, parameters, attempt)
            flow_run = await self._wait(flow_run, step.get("timeout"))
            self.runs[name] = flow_run
            state = flow_run.state
            if state is None or not state.is_final():
                # Past its deadline: stopped (its worker ends it), and not retried.
                await client.set_flow_run_state(flow_run.id, Cancelling())
                self.outcome[name] = {
                    "state": "FAILED",
                    "flowRunId": str(flow_run.id),
                    "message": f"DeadlineExceeded: no end within {step.get('timeout')} s; "
                    "cancelled",
                }
                self.logger.error("step %r: %s", name, self.outcome[name]["message"])
                return
            self.outcome[name] = {
                "state": state.type.value,
                "flowRunId": str(flow_run.id),
                "message": state.message or "",
            }
            self.logger.info("step %r ended %s", name, state.name)
            if state.type.value not in ("FAILED", "CRASHED") or attempt == retries:
                return
            delay = float(step.get("retryDelay") or 0)
            self.logger.warning(
                "step %r: retry %d of %d in %g s", name, attempt + 1, retries, delay
            )
            await anyio.sleep(delay)

    async def _mapped_value(
        self, client: Any, step: str, param: str, mapping: dict[str, Any]
    ) -> Any:
        where = f"step {step!r}, parameter {param!r}"
        parent, task = mapping["parent"], mapping.get("task")
        output = await self._output(client, parent, task, where)
        if mapping["type"] == "db":
            return self._db_value(output, mapping.get("index"), parent, where)
        value = index_into(output, mapping.get("index"), where)
        if mapping["type"] == "file" and not _is_description(value):
            raise MappingError(
                f"{where}: mapType file needs a File description "
                f"({', '.join(DESCRIPTION_KEYS)}) from step {parent!r}, got {type(value).__name__}"
            )
        return value

    def _db_value(self, output: Any, index: list[Any] | None, parent: str, where: str) -> Any:
        """The parent's DB result document (its location is in the output), indexed into its
        outputs by `index`."""
        # Only db mappings need the store (and lume-base, 1.3 s to import): every composition
        # run loads this module, most never map a db result.
        from lume_operator.results.db_tasks import store_for_location
        from lume_operator.results.store import ResultStoreError, find_db_locations, resolve

        found = find_db_locations(output)
        if len(found) != 1:
            what = "no DB result location" if not found else f"{len(found)} DB result locations"
            raise MappingError(
                f"{where}: mapType db needs one DB result location in the output of step "
                f"{parent!r}; it has {what}"
            )
        location = found[0][1]
        try:
            document = store_for_location(location).get(location["id"])
            return resolve(document, index)
        except ResultStoreError as error:
            raise MappingError(f"{where}: {error}") from None

    async def _output(self, client: Any, parent: str, task: str | None, where: str) -> Any:
        """The parent's return value, or the last completed run of one of its tasks."""
        cache_key = (parent, task)
        if cache_key not in self.outputs:
            flow_run = self.runs[parent]
            if task is None:
                state = flow_run.state
            else:
                state = await self._task_state(client, flow_run, parent, task, where)
            try:
                self.outputs[cache_key] = await state.aresult(raise_on_failure=True)
            except Exception as error:
                what = f"task {task!r} of step {parent!r}" if task else f"step {parent!r}"
                raise MappingError(
                    f"{where}: cannot read the result of {what}: {type(error).__name__}: {error}"
                ) from error
        return self.outputs[cache_key]

    async def _task_state(
        self, client: Any, flow_run: Any, parent: str, task: str, where: str
    ) -> Any:
        """The state of the task's last completed run in the parent step's flow run.

        Task runs reach the server as events, after their flow run may already show
        Completed: an absent task is looked for again for a while before it counts as unknown.
        """
        deadline = anyio.current_time() + TASK_RUNS_GRACE
        while True:
            task_runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
            )
            named = [r for r in task_runs if r.name == task or r.name.rsplit("-", 1)[0] == task]
            completed = [r for r in named if r.state and r.state.is_completed()]
            if completed:
                return max(completed, key=lambda r: r.end_time or r.expected_start_time).state
            if anyio.current_time() >= deadline:
                break
            await anyio.sleep(1.0)
        if not named:
            seen = sorted({run.name.rsplit("-", 1)[0] for run in task_runs})
            raise MappingError(
                f"{where}: parentTask {task!r}: flow run of step {parent!r} ran no task of "
                f"that name (its tasks: {', '.join(seen) or 'none'})"
            )
        raise MappingError(f"{where}: parentTask {task!r} of step {parent!r} did not complete")


@flow(name=FLOW_NAME, persist_result=True)
async def run_flow_of_flows(steps: list[dict[str, Any]], poll_interval: float = 0.5) -> dict:
    """Run every step as soon as its parents completed; fail naming the steps that did not.

    Args:
        steps: The plan: per step its deployment, parameters, mapped parameters, idempotency
            key, tags and job variables.
        poll_interval: Seconds between reads of a running child's state.
    """
    outcome = await _Composition(steps, poll_interval).run()
    # Steps that never got a child run (skipped, or a mapping that failed) are known only
    # here: the table tells readers of the parent run (the UI, the operator) how each ended.
    await acreate_table_artifact(
        table=[
            {
                "step": name,
                "state": outcome[name]["state"],
                "flowRunId": outcome[name].get("flowRunId"),
                "message": outcome[name].get("message") or "",
            }
            for name in (step["name"] for step in steps)
        ],
        description=OUTCOME_DESCRIPTION,
    )
    failed = {name: o for name, o in outcome.items() if o["state"] not in ("COMPLETED", "SKIPPED")}
    if failed:
        skipped = [name for name, o in outcome.items() if o["state"] == "SKIPPED"]
        text = "; ".join(
            f"step {name!r} {o['state'].lower()}: {o['message'] or 'no message'}"
            for name, o in failed.items()
        )
        if skipped:
            text += f"; skipped: {', '.join(skipped)}"
        raise StepsFailed(text)
    return outcome
