"""A LumeFlow as a Prefect deployment: the one definition the CLI and the operator both use."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lume_operator.api.backend import SchedulingBackend
from lume_operator.api.flow import LumeFlow
from lume_operator.api.flowofflows import FlowOfFlows
from lume_operator.backends import get_backend, tags, work_queue
from lume_operator.flows.composition import ENTRYPOINT, FLOW_NAME
from lume_operator.prefect.deployment import DeploymentSpec
from lume_operator.results.storage import run_env

# What every flow run gets: its return value persisted as JSON, so status can list results.
RESULT_ENV = {
    "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
    # Only the flow's return value is persisted: tasks that pass arrays around stay in memory.
    "PREFECT_TASKS_DEFAULT_PERSIST_RESULT": "false",
    "PREFECT_RESULTS_DEFAULT_SERIALIZER": "json",
}


@dataclass
class FlowDeployment:
    """The deployment of a flow and what was noticed while making it."""

    spec: DeploymentSpec
    notes: list[str] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return self.spec.job_variables.get("env", {})


def job_variables(
    backend: SchedulingBackend,
    overrides: Any,
    backend_type: str,
    notes: list[str],
    *,
    storage: bool = True,
) -> dict[str, Any]:
    """The backend's defaults with the overrides on top, as the worker's job variables, and
    (unless `storage` is False: the local runner keeps results in its own directory) what
    gives each run the backend's result storage."""
    runner = get_backend(backend_type)
    config, ignored = runner.run_config(backend.spec.run_config, overrides)
    if ignored:
        notes.append(f"run-config fields that do not apply here: {', '.join(ignored)}")
    variables = runner.job_variables(config)
    variables["env"] = {**RESULT_ENV, **variables.get("env", {})}
    declared = backend.spec.result_storage
    if declared is not None and not storage:
        notes.append(
            f"backend {backend.metadata.name!r} declares resultStorage; this run keeps its "
            "results in the local results directory"
        )
    elif declared is not None:
        block = backend.result_block_name if declared.object_store else None
        variables["env"].update(run_env(declared, block, variables["env"]))
        for name, extra in runner.storage_variables(declared).items():
            variables[name] = _merged(variables.get(name, []), extra)
    return variables


def _merged(given: list[Any], extra: list[Any]) -> list[Any]:
    """A list variable with the storage's entries added; a run-config entry of the same name
    (a volume, a mount, a variable) gives way to the storage's."""

    def name_of(item: Any) -> Any:
        return item.get("name") if isinstance(item, dict) else item

    taken = {name_of(item) for item in extra}
    return [item for item in given if name_of(item) not in taken] + extra


def flow_deployment(
    flow: LumeFlow,
    backend: SchedulingBackend,
    *,
    backend_type: str | None = None,
    entrypoint: str | None = None,
    working_dir: str | None = None,
    parameter_schema: dict[str, Any] | None = None,
    storage: bool = True,
) -> FlowDeployment:
    """The deployment `<flow name>/<namespace>` of a LumeFlow on its backend.

    `backend_type` overrides the backend's (the local runner runs everything as processes);
    `working_dir` is where the code is (the project directory locally, `source.path` in an
    image); a cron policy becomes the deployment's schedule.
    """
    notes: list[str] = []
    declared = backend.spec.type
    kind = backend_type or declared
    if kind != declared:
        notes.append(f"backend {backend.metadata.name!r} is {declared}; runs here as {kind}")
    variables = job_variables(backend, flow.spec.run_config, kind, notes, storage=storage)
    source = flow.spec.source
    if source and source.image and kind in ("kubernetes", "docker"):
        variables["image"] = source.image
    if backend.spec.result_store and kind == "kubernetes":
        store = {"secretRef": {"name": backend.spec.result_store.secret_name}}
        variables["env_from"] = [*variables.get("env_from", []), store]  # runConfig's kept
    if working_dir and kind == "process" and "working_dir" not in variables:
        # The process starts where the code is (by default a process worker starts each run
        # in a new temporary directory; a relative path is the worker's own directory). A pull
        # step would do the same from inside the run, at the cost of an API client, an event
        # and a server version check in every run's engine.
        variables["working_dir"] = working_dir
        working_dir = None
    run = flow.spec.run
    schedules = None
    if run and run.policy == "Schedule" and run.cron:
        schedules = [{"cron": run.cron, "timezone": run.timezone or "UTC"}]
    spec = DeploymentSpec(
        flow_name=flow.metadata.name,
        name=flow.metadata.namespace,
        entrypoint=entrypoint or flow.spec.entrypoint,
        work_pool_name=backend.work_pool_name,
        work_queue_name=work_queue(flow),
        job_variables=variables,
        parameters=flow.spec.parameters or {},
        tags=tags(flow, backend),
        pull_steps=(
            [{"prefect.deployments.steps.set_working_directory": {"directory": working_dir}}]
            if working_dir
            else []
        ),
        parameter_openapi_schema=parameter_schema,
        description=f"LumeFlow {flow.key}, managed by lume-operator.",
        schedules=schedules,
    )
    return FlowDeployment(spec, notes)


def composition_deployment(
    fof: FlowOfFlows,
    backend: SchedulingBackend,
    *,
    backend_type: str | None = None,
    extra_env: dict[str, str] | None = None,
    storage: bool = True,
) -> DeploymentSpec:
    """The deployment `FlowOfFlows/<namespace>.<name>` of a composition's parent flow.

    It runs on the composition's backend, in the queue of its first label; `extra_env` adds to
    its environment (the local runner's result store, which the parent reads `db` mappings from).
    """
    kind = backend_type or backend.spec.type
    variables = job_variables(backend, None, kind, [], storage=storage)
    variables["env"].update(extra_env or {})
    return DeploymentSpec(
        flow_name=FLOW_NAME,
        name=f"{fof.metadata.namespace}.{fof.metadata.name}",
        entrypoint=ENTRYPOINT,
        work_pool_name=backend.work_pool_name,
        work_queue_name=fof.spec.labels[0] if fof.spec.labels else "default",
        job_variables=variables,
        parameters={},
        tags=[
            *(fof.spec.labels or []),
            f"lume.dev/flowofflows={fof.metadata.name}",
            f"lume.dev/backend={backend.metadata.name}",
        ],
        description=f"FlowOfFlows {fof.key}, managed by lume-operator.",
    )
