"""Reading manifests from files and turning every problem into `path: why` lines.

Used by the CLI (`validate`, `run`) and by the operator, so a bad spec reads the same everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lume_operator import GROUP
from lume_operator.api.backend import SchedulingBackend
from lume_operator.api.common import Resource
from lume_operator.api.flow import LumeFlow
from lume_operator.api.flowofflows import FlowOfFlows
from lume_operator.api.runconfig import APPLICABLE_FIELDS

KINDS: dict[str, type[Resource]] = {
    "SchedulingBackend": SchedulingBackend,
    "LumeFlow": LumeFlow,
    "FlowOfFlows": FlowOfFlows,
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one manifest, at one field."""

    source: str
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.source}: {where}{self.message}"


class ManifestError(Exception):
    """Raised with every problem found, so users fix them all in one round."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass
class Document:
    """One YAML document and where it came from."""

    source: str
    body: Any
    path: Path | None = None


@dataclass
class Manifests:
    """The parsed resources of a set of files, by kind, and what was wrong or skipped."""

    backends: list[SchedulingBackend] = field(default_factory=list)
    flows: list[LumeFlow] = field(default_factory=list)
    compositions: list[FlowOfFlows] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    # What was accepted but is worth saying (keys of the original format that are ignored).
    notes: list[Problem] = field(default_factory=list)
    # Where each resource came from (namespace/kind/name -> file), for relative source paths.
    origins: dict[str, Document] = field(default_factory=dict)

    def origin(self, resource: Resource) -> Document | None:
        return self.origins.get(identity(resource))

    def backend(self, namespace: str, name: str) -> SchedulingBackend | None:
        for backend in self.backends:
            if backend.metadata.namespace == namespace and backend.metadata.name == name:
                return backend
        return None


def identity(resource: Resource) -> str:
    return f"{resource.metadata.namespace}/{type(resource).__name__}/{resource.metadata.name}"


def iter_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    """The manifest files named, directories expanded to their *.yaml/*.yml (sorted)."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml"))
        elif path.exists():
            yield path
        else:
            raise ManifestError([Problem(str(path), "", "no such file or directory")])


def read_documents(paths: Iterable[str | Path]) -> tuple[list[Document], list[Problem]]:
    """Every YAML document in the files, with YAML syntax errors as problems."""
    documents: list[Document] = []
    problems: list[Problem] = []
    for path in iter_files(paths):
        try:
            bodies = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            reason = getattr(error, "problem", None) or str(error)
            problems.append(Problem(where, "", f"not valid YAML: {reason}"))
            continue
        for index, body in enumerate(b for b in bodies if b is not None):
            source = str(path) if len(bodies) == 1 else f"{path}#{index}"
            documents.append(Document(source, body, path))
    return documents, problems


def format_location(loc: Iterable[int | str]) -> str:
    """('spec', 'steps', 1, 'name') as spec.steps[1].name."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _message(error: dict[str, Any]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"{error['input']!r} is not one of {expected}"
    if kind == "string_pattern_mismatch":
        return f"{error['input']!r} does not match the pattern {error['ctx']['pattern']}"
    message = error["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return message


def problems_from(error: ValidationError, source: str, prefix: tuple = ()) -> list[Problem]:
    """A pydantic error as one Problem per field, with Kubernetes-style paths."""
    problems = []
    for item in error.errors(include_url=False):
        # Union members add their own names to the location; they mean nothing to users.
        loc = [p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        problems.append(Problem(source, format_location((*prefix, *loc)), _message(item)))
    return problems


def semantic_problems(resource: Resource, source: str) -> list[Problem]:
    """What a schema cannot say: checks across fields of one resource."""
    problems = []
    if isinstance(resource, SchedulingBackend) and resource.spec.run_config:
        applicable = APPLICABLE_FIELDS[resource.spec.type]
        for name in resource.spec.run_config.set_fields():
            if name not in applicable:
                problems.append(
                    Problem(
                        source,
                        f"spec.runConfig.{name}",
                        f"does not apply to {resource.spec.type} backends "
                        f"(they take: {', '.join(sorted(applicable))})",
                    )
                )
        if resource.spec.type == "kubernetes":
            for index, volume in enumerate(resource.spec.run_config.volumes or []):
                if volume.host_path:
                    problems.append(
                        Problem(
                            source,
                            f"spec.runConfig.volumes[{index}].hostPath",
                            "not allowed for kubernetes backends (Pod Security Standard "
                            "restricted forbids hostPath volumes): use a persistentVolumeClaim",
                        )
                    )
    return problems


def parse_resource(body: Any, source: str) -> tuple[Resource | None, list[Problem]]:
    """One document as a resource of our kinds; (None, []) when it is not ours."""
    if not isinstance(body, dict):
        return None, [Problem(source, "", "a manifest must be a mapping")]
    api_version = body.get("apiVersion")
    kind = body.get("kind")
    if not isinstance(api_version, str) or not api_version.startswith(f"{GROUP}/"):
        return None, []
    name = (
        (body.get("metadata") or {}).get("name") if isinstance(body.get("metadata"), dict) else None
    )
    source = f"{source} ({kind} {name})" if name else source
    if kind not in KINDS:
        return None, [
            Problem(
                source,
                "kind",
                f"unknown kind {kind!r} in {GROUP} (expected one of {', '.join(KINDS)})",
            )
        ]
    try:
        resource = KINDS[kind].model_validate(body)
    except ValidationError as error:
        return None, problems_from(error, source)
    problems = semantic_problems(resource, source)
    return (None if problems else resource), problems
