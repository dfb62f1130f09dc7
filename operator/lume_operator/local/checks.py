"""Everything `validate` and `run` check before Prefect: manifests, references, code, parameters.

The code checks read the source (Prefect parses signatures without importing), so a broken
import in the user's project is reported by the run, not by validation. Nothing here imports
Prefect's client, server or workers (seconds of imports): `validate`, and `run` of a manifest
it refuses, answer without them.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
from rich.console import Console
from rich.markup import escape

from lume_operator.api.backend import SchedulingBackend
from lume_operator.api.flow import LumeFlow, LumeFlowSpec, LumeFlowStatus
from lume_operator.api.flowofflows import FlowOfFlows, FlowOfFlowsStatus, StepStatus
from lume_operator.api.manifests import Manifests, Problem
from lume_operator.flows.convert import load_manifests
from lume_operator.flows.plan import step_flows
from lume_operator.flows.validation import composition_problems


@dataclass
class LocalFlowCode:
    """Where a LumeFlow's code is on this machine."""

    project_dir: Path
    source_file: Path
    function: str
    # The entrypoint as Prefect's engine loads it, relative to project_dir.
    entrypoint: str


class CodeProblem(Exception):
    """The entrypoint or parameters do not fit the code; `path` is the field to fix."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(message)


def locate(flow: LumeFlow, manifest_dir: Path) -> LocalFlowCode:
    """Find the entrypoint's file and function under the flow's project directory."""
    source = flow.spec.source
    project = Path(source.path) if source and source.path else Path(".")
    project_dir = (manifest_dir / project).resolve() if not project.is_absolute() else project
    if not project_dir.is_dir():
        raise CodeProblem(
            "spec.source.path", f"project directory {str(project_dir)!r} does not exist"
        )
    target, function = flow.spec.entrypoint.rsplit(":", 1)
    if target.endswith(".py"):
        source_file = project_dir / target
        if not source_file.is_file():
            raise CodeProblem(
                "spec.entrypoint",
                f"file {target!r} not found in project directory {str(project_dir)!r}",
            )
    else:
        module_path = project_dir / Path(*target.split("."))
        candidates = [module_path.with_suffix(".py"), module_path / "__init__.py"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise CodeProblem(
                "spec.entrypoint",
                f"module {target!r} not found in project directory {str(project_dir)!r}",
            )
        source_file = found[0]
    try:
        tree = ast.parse(source_file.read_text(), filename=str(source_file))
    except SyntaxError as error:
        raise CodeProblem("spec.entrypoint", f"{source_file}:{error.lineno}: {error.msg}") from None
    defined = {
        node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    } | {
        target.id
        for node in tree.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    if function not in defined:
        raise CodeProblem(
            "spec.entrypoint", f"function {function!r} not found in {str(source_file)!r}"
        )
    entrypoint = f"{source_file.relative_to(project_dir).as_posix()}:{function}"
    return LocalFlowCode(project_dir, source_file, function, entrypoint)


def parameter_schema(code: LocalFlowCode) -> dict[str, Any]:
    """The flow's parameter schema (OpenAPI), from its signature and docstring."""
    # Prefect's import costs seconds; `validate` of a manifest without code never needs it.
    from prefect.utilities.callables import parameter_schema_from_entrypoint

    schema = parameter_schema_from_entrypoint(f"{code.source_file}:{code.function}")
    return schema.model_dump_for_openapi()


def _takes_any_keyword(code: LocalFlowCode) -> bool:
    tree = ast.parse(code.source_file.read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == code.function:
            return node.args.kwarg is not None
    return False


def check_parameters(
    code: LocalFlowCode,
    parameters: dict[str, Any],
    schema: dict[str, Any],
    *,
    supplied_elsewhere: bool = False,
) -> list[CodeProblem]:
    """Every way `parameters` do not fit the flow's signature, each at its field.

    `supplied_elsewhere`: the flow runs as a composition step, which supplies the rest, so a
    missing required parameter is the step's problem, checked there.
    """
    problems = []
    properties = schema.get("properties", {})
    if not _takes_any_keyword(code):
        for name in parameters:
            if name not in properties:
                takes = ", ".join(properties) or "no parameters"
                problems.append(
                    CodeProblem(
                        f"spec.parameters.{name}",
                        f"flow {code.function!r} takes no parameter {name!r} (it takes: {takes})",
                    )
                )
    for name in [] if supplied_elsewhere else schema.get("required", []):
        if name not in parameters:
            problems.append(
                CodeProblem(
                    "spec.parameters",
                    f"missing required parameter {name!r} of flow {code.function!r}",
                )
            )
    known = {k: v for k, v in parameters.items() if k in properties}
    checkable = {**schema, "required": [], "additionalProperties": True}
    validator = jsonschema.Draft202012Validator(checkable)
    for error in sorted(validator.iter_errors(known), key=lambda e: list(e.path)):
        where = ".".join(str(p) for p in error.path)
        problems.append(
            CodeProblem(f"spec.parameters.{where}" if where else "spec.parameters", error.message)
        )
    return problems


def local_parameter_schema(spec: LumeFlowSpec, manifest_dir: Path) -> dict[str, Any] | None:
    """The flow's parameter schema when its code is on this machine, else None."""
    probe = LumeFlow(metadata={"name": "probe"}, spec=spec)
    try:
        return parameter_schema(locate(probe, manifest_dir))
    except (CodeProblem, OSError, ValueError, SyntaxError):
        return None


def composition_problems_local(manifests: Manifests, *, code: bool = True) -> list[Problem]:
    """Every FlowOfFlows problem, with step flows (and, if `code`, their code) looked up."""
    problems = []
    for fof in manifests.compositions:
        origin = manifests.origin(fof)
        source = f"{origin.source} (FlowOfFlows {fof.metadata.name})" if origin else fof.key
        flows = {
            f.metadata.name: f
            for f in manifests.flows
            if f.metadata.namespace == fof.metadata.namespace
        }

        def schema(
            spec: LumeFlowSpec, fof: FlowOfFlows = fof, flows: dict[str, LumeFlow] = flows
        ) -> dict[str, Any] | None:
            if not code:
                return None
            owner = next((f for f in flows.values() if f.spec is spec), None)
            where = manifests.origin(owner) if owner else manifests.origin(fof)
            directory = where.path.parent if where and where.path else Path.cwd()
            return local_parameter_schema(spec, directory)

        for path, message in composition_problems(fof, flows, schema):
            problems.append(Problem(source, path, message))
    return problems


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


@dataclass
class PlannedComposition:
    """A FlowOfFlows with its steps' flows planned and the backend of its parent run."""

    fof: FlowOfFlows
    backend: SchedulingBackend
    steps: dict[str, PlannedFlow]
    status: FlowOfFlowsStatus = field(default_factory=FlowOfFlowsStatus)
    error: str | None = None

    def __post_init__(self) -> None:
        self.status.steps = [
            StepStatus(name=step.name, phase="Pending") for step in self.fof.spec.steps
        ]


def _plan_flow(
    manifests: Manifests,
    flow: LumeFlow,
    source: str,
    manifest_dir: Path,
    *,
    step: bool = False,
    code: bool = True,
) -> tuple[PlannedFlow | None, list[Problem]]:
    problems: list[Problem] = []
    backend = manifests.backend(flow.metadata.namespace, flow.spec.backend_ref.name)
    if backend is None:
        have = ", ".join(b.metadata.name for b in manifests.backends) or "none"
        return None, [
            Problem(
                source,
                "spec.backendRef.name",
                f"SchedulingBackend {flow.spec.backend_ref.name!r} is not in the manifests "
                f"given (namespace {flow.metadata.namespace!r}; have: {have})",
            )
        ]
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
    if not code:  # `validate --no-code`: the code is only in an image
        return None, problems
    try:
        found = locate(flow, manifest_dir)
        schema = parameter_schema(found)
        bad = check_parameters(found, flow.spec.parameters or {}, schema, supplied_elsewhere=step)
    except CodeProblem as problem:
        return None, [*problems, Problem(source, problem.path, str(problem))]
    problems.extend(Problem(source, p.path, str(p)) for p in bad)
    return (None if problems else PlannedFlow(flow, backend, found, schema)), problems


def plan(
    manifests: Manifests, *, code: bool = True
) -> tuple[list[PlannedFlow], list[PlannedComposition], list[Problem]]:
    """Resolve backends, code and parameters of every LumeFlow and composition.

    Returns the flows to run on their own (none when compositions are given: then LumeFlows
    are their steps), the compositions, and every problem found instead of raising.
    """
    by_key: dict[str, PlannedFlow] = {}
    problems: list[Problem] = []
    steps_of = {
        f"{fof.metadata.namespace}/{step.flow_ref.name}"
        for fof in manifests.compositions
        for step in fof.spec.steps
        if step.flow_ref is not None
    }
    for flow in manifests.flows:
        origin = manifests.origin(flow)
        source = f"{origin.source} (LumeFlow {flow.metadata.name})" if origin else flow.key
        directory = origin.path.parent if origin and origin.path else Path.cwd()
        # With compositions given, LumeFlows are their building blocks: they need not be
        # runnable alone (their steps supply parameters), and run only as steps.
        as_step = flow.key in steps_of or bool(manifests.compositions)
        item, found = _plan_flow(manifests, flow, source, directory, step=as_step, code=code)
        problems.extend(found)
        if item:
            by_key[flow.key] = item
    compositions: list[PlannedComposition] = []
    for fof in manifests.compositions:
        origin = manifests.origin(fof)
        source = f"{origin.source} (FlowOfFlows {fof.metadata.name})" if origin else fof.key
        directory = origin.path.parent if origin and origin.path else Path.cwd()
        namespace = {
            f.metadata.name: f
            for f in manifests.flows
            if f.metadata.namespace == fof.metadata.namespace
        }
        steps: dict[str, PlannedFlow] = {}
        for index, step in enumerate(fof.spec.steps):
            flow = step_flows(fof, namespace).get(step.name)
            if flow is None:
                continue  # an unknown flowRef: the composition checks report it
            if step.flow_ref is not None:
                if flow.key in by_key:
                    steps[step.name] = by_key[flow.key]
                continue
            item, found = _plan_flow(manifests, flow, source, directory, step=True, code=code)
            problems.extend(
                Problem(
                    p.source, f"spec.steps[{index}].flow.{p.path.removeprefix('spec.')}", p.message
                )
                for p in found
            )
            if item:
                steps[step.name] = item
        named = None
        if fof.spec.backend_ref is not None:
            named = manifests.backend(fof.metadata.namespace, fof.spec.backend_ref.name)
            if named is None:
                problems.append(
                    Problem(
                        source,
                        "spec.backendRef.name",
                        f"SchedulingBackend {fof.spec.backend_ref.name!r} is not in the "
                        f"manifests given (namespace {fof.metadata.namespace!r})",
                    )
                )
                continue
        if len(steps) != len(fof.spec.steps):
            continue
        step_problems = _step_parameter_problems(fof, steps, source)
        if step_problems:
            problems.extend(step_problems)
            continue
        backend = named or steps[fof.spec.steps[0].name].backend
        compositions.append(PlannedComposition(fof, backend, steps))
    alone = [] if manifests.compositions else list(by_key.values())
    return alone, compositions, problems


def _step_parameter_problems(
    fof: FlowOfFlows, steps: dict[str, PlannedFlow], source: str
) -> list[Problem]:
    """A step's own parameters against its flow's signature; every required one supplied."""
    problems = []
    for index, step in enumerate(fof.spec.steps):
        item = steps[step.name]
        own = step.parameters or {}
        merged = {**(item.flow.spec.parameters or {}), **own}
        for bad in check_parameters(item.code, merged, item.schema, supplied_elsewhere=True):
            name = bad.path.removeprefix("spec.parameters").lstrip(".").split(".")[0]
            if name in own:
                path = f"spec.steps[{index}].{bad.path.removeprefix('spec.')}"
                problems.append(Problem(source, path, str(bad)))
        supplied = {*merged, *(step.mapped_parameters or {})}
        missing = [name for name in item.schema.get("required", []) if name not in supplied]
        for name in missing:
            problems.append(
                Problem(
                    source,
                    f"spec.steps[{index}]",
                    f"step {step.name!r}: flow {item.code.function!r} needs parameter {name!r}; "
                    "set it in parameters or mappedParameters",
                )
            )
    return problems


@dataclass
class Checked:
    """What the checks found: the manifests, what can run, and every problem."""

    manifests: Manifests
    planned: list[PlannedFlow]
    compositions: list[PlannedComposition]
    problems: list[Problem]

    @property
    def count(self) -> int:
        m = self.manifests
        return len(m.backends) + len(m.flows) + len(m.compositions)


def check(paths: list[str], *, code: bool = True) -> Checked:
    """Every check `run` makes before Prefect, for `validate` and `run` alike.

    The manifests themselves, references across them (backends, labels, flowRefs), the
    compositions' DAGs and mappings, and (unless `code` is False, for code only in an image)
    the entrypoint's file and function and the parameters against its signature. Nothing to
    check is a problem too. Raises ManifestError only for a path that does not exist.
    """
    manifests = load_manifests(paths)
    problems = list(manifests.problems)
    planned, compositions, plan_problems = plan(manifests, code=code)
    problems.extend(plan_problems)
    problems.extend(composition_problems_local(manifests, code=code))
    checked = Checked(manifests, planned, compositions, problems)
    if not problems and checked.count == 0:
        problems.append(
            Problem(
                ", ".join(paths),
                "",
                "no lume.dev manifests here (give YAML files, or directories holding "
                ".yaml/.yml files, with SchedulingBackend, LumeFlow or FlowOfFlows documents)",
            )
        )
    return checked


def print_problems(console: Console, checked: Checked) -> None:
    """Notes, skipped documents and problems, as `validate` and `run` both print them."""
    for note in checked.manifests.notes:
        console.print(f"[yellow]note[/yellow] {escape(str(note))}")
    for skipped in checked.manifests.skipped:
        console.print(escape(f"skipped {skipped}: not a lume.dev resource"))
    for problem in checked.problems:
        console.print(f"[red]error[/red] {escape(str(problem))}")


def runnable(console: Console, checked: Checked) -> bool:
    """Print what the checks found; False (said why) when `run` must not start Prefect."""
    manifests, planned, compositions = checked.manifests, checked.planned, checked.compositions
    print_problems(console, checked)
    if checked.problems:
        console.print(f"{len(checked.problems)} problem(s); nothing was run.")
        return False
    if manifests.compositions:
        used = {item.flow.key for c in compositions for item in c.steps.values()}
        idle = sorted(f.key for f in manifests.flows if f.key not in used)
        console.print(
            "[yellow]note[/yellow]: with a FlowOfFlows given, LumeFlows run only as its steps"
            + (f"; not run: {escape(', '.join(idle))}" if idle else ""),
            highlight=False,
        )
    if not planned and not compositions:
        console.print("[red]error[/red] no LumeFlow in the manifests given; nothing to run.")
        return False
    return True
