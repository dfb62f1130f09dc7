"""Checks that need the flow's code on this machine: the entrypoint and the parameters.

They read the source (Prefect parses signatures without importing), so a broken import in the
user's project is reported by the run, not by validation.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema

from lume_operator.api.flow import LumeFlow, LumeFlowSpec
from lume_operator.api.flowofflows import FlowOfFlows
from lume_operator.api.manifests import Manifests, Problem
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
