"""The original lume-services flow-of-flows YAML, read and converted to a FlowOfFlows manifest.

Existing pipelines keep working: the old file is checked against its own shape first, so
mistakes are reported at the paths its author wrote (`composing_flows[1].map_type`), not at
paths of a manifest they never saw.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lume_operator import API_VERSION
from lume_operator.api.backend import SchedulingBackend
from lume_operator.api.common import DNS_LABEL_PATTERN, DNS_SUBDOMAIN_PATTERN, Resource
from lume_operator.api.flow import LumeFlow
from lume_operator.api.flowofflows import FlowOfFlows
from lume_operator.api.manifests import (
    Document,
    Manifests,
    Problem,
    format_location,
    identity,
    parse_resource,
    problems_from,
    read_documents,
)
from lume_operator.flows.graph import parents
from lume_operator.flows.validation import find_cycle

HEADER = "# Converted from the lume-services flow-of-flows format by lume-operator convert"
PROJECT_ANNOTATION = "lume.dev/project"

_LABEL_RE = re.compile(DNS_LABEL_PATTERN)
_SUBDOMAIN_RE = re.compile(DNS_SUBDOMAIN_PATTERN)

# New-format field names back to the old ones, so late errors still point into the old file.
_LEGACY_FIELDS = {
    "parentFlow": "parent_flow_name",
    "parentTask": "parent_task_name",
    "mapType": "map_type",
    "attributeIndex": "attribute_index",
    "mappedParameters": "mapped_parameters",
    "flowRef": "name",
}


class LegacyFormatError(ValueError):
    """Every problem of an old-format file, as (old-format path, why), fixed in one round."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("\n".join(f"{p}: {m}" if p else m for p, m in problems))


class _Legacy(BaseModel):
    # No aliases: the old format was snake_case. lume-services' own (pydantic v1) models ignored
    # keys they did not use, and its example files carry some (`parent_project_name`): they are
    # accepted and named in a note (`ignored_keys`); what those models rejected stays an error.
    model_config = ConfigDict(extra="ignore")


class LegacyMappedParameter(_Legacy):
    """A child parameter taken from a parent flow's output, as lume-services wrote it."""

    parent_flow_name: str
    parent_task_name: str | None = None
    map_type: Literal["raw", "file", "db"]
    attribute_index: list[str | int] | None = None


class LegacyComposingFlow(_Legacy):
    """One flow of an old composition; `name` is the flow (now: LumeFlow) name."""

    name: str
    project_name: str | None = None
    parameters: dict[str, Any] | None = None
    mapped_parameters: dict[str, LegacyMappedParameter] | None = None


class LegacyFlowOfFlows(_Legacy):
    """A lume-services flow-of-flows file."""

    name: str
    project_name: str | None = None
    labels: list[str] | None = None
    composing_flows: list[LegacyComposingFlow] = Field(min_length=1)


def ignored_keys(document: Any) -> list[str]:
    """The old-format paths of keys lume-services' models ignored, which convert drops too."""
    found: list[str] = []

    def visit(value: Any, model: type[_Legacy], at: str) -> None:
        if not isinstance(value, dict):
            return
        for key, item in value.items():
            path = f"{at}.{key}" if at else str(key)
            if key not in model.model_fields:
                found.append(path)
            elif model is LegacyFlowOfFlows and key == "composing_flows" and isinstance(item, list):
                for index, flow in enumerate(item):
                    visit(flow, LegacyComposingFlow, f"{path}[{index}]")
            elif model is LegacyComposingFlow and key == "mapped_parameters":
                for param, mapping in (item if isinstance(item, dict) else {}).items():
                    visit(mapping, LegacyMappedParameter, f"{path}.{param}")

    visit(document, LegacyFlowOfFlows, "")
    return found


def ignored_note(document: Any) -> str | None:
    """One sentence naming the ignored keys, or None."""
    keys = ignored_keys(document)
    if not keys:
        return None
    return (
        f"ignored {', '.join(keys)}: lume-services did not use "
        f"{'this key' if len(keys) == 1 else 'these keys'} either"
    )


def is_legacy(document: Any) -> bool:
    """Whether a parsed YAML document is the old format rather than a manifest."""
    return (
        isinstance(document, dict)
        and "composing_flows" in document
        and "apiVersion" not in document
    )


def step_name(flow_name: str) -> str:
    """The flow name as a DNS label, what step names must be."""
    return flow_name.lower().replace("_", "-").replace(".", "-")


def object_name(flow_name: str) -> str:
    """The flow name as a DNS subdomain, what object names (flowRef, metadata) must be."""
    return flow_name.lower().replace("_", "-")


def convert(document: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
    """The FlowOfFlows manifest equivalent to an old-format document, validated."""
    if not isinstance(document, dict):
        raise LegacyFormatError([("", "a flow-of-flows file must be a mapping")])
    if "apiVersion" in document:
        raise LegacyFormatError(
            [("apiVersion", "already a manifest, not the lume-services format: nothing to convert")]
        )
    try:
        legacy = LegacyFlowOfFlows.model_validate(document)
    except ValidationError as error:
        raise LegacyFormatError(
            [(p.path, p.message) for p in problems_from(error, "legacy")]
        ) from None

    problems = _name_problems(legacy) + _parent_problems(legacy)
    if problems:
        raise LegacyFormatError(problems)
    steps = {flow.name: step_name(flow.name) for flow in legacy.composing_flows}

    metadata: dict[str, Any] = {"name": object_name(legacy.name), "namespace": namespace}
    if legacy.project_name:
        metadata["annotations"] = {PROJECT_ANNOTATION: legacy.project_name}
    spec: dict[str, Any] = {}
    if legacy.labels is not None:
        spec["labels"] = list(legacy.labels)
    spec["steps"] = [_step(flow, steps) for flow in legacy.composing_flows]
    manifest = {
        "apiVersion": API_VERSION,
        "kind": "FlowOfFlows",
        "metadata": metadata,
        "spec": spec,
    }

    try:
        fof = FlowOfFlows.model_validate(manifest)
    except ValidationError as error:
        raise LegacyFormatError(
            [(_legacy_path(p.path), p.message) for p in problems_from(error, "converted")]
        ) from None
    cycle = find_cycle(parents(fof.spec))
    if cycle:
        raise LegacyFormatError(
            [("composing_flows", f"mapped parameters form a cycle: {' -> '.join(cycle)}")]
        )
    return manifest


def dump(manifest: dict[str, Any]) -> str:
    """YAML of a converted manifest, marked as generated so nobody mistakes it for hand-written."""
    return f"{HEADER}\n{yaml.safe_dump(manifest, sort_keys=False)}"


def _name_problems(legacy: LegacyFlowOfFlows) -> list[tuple[str, str]]:
    """Names that cannot become Kubernetes names, or that collide once converted."""
    problems: list[tuple[str, str]] = []
    if not _SUBDOMAIN_RE.match(object_name(legacy.name)):
        problems.append(
            (
                "name",
                f"{legacy.name!r} cannot be made a Kubernetes name (letters, digits, '-', '.')",
            )
        )
    seen: dict[str, int] = {}
    for index, flow in enumerate(legacy.composing_flows):
        at = f"composing_flows[{index}].name"
        name = step_name(flow.name)
        if not _LABEL_RE.match(name) or len(name) > 63:
            problems.append(
                (
                    at,
                    f"{flow.name!r} cannot be made a step name "
                    "(at most 63 letters, digits, '-', '_' or '.')",
                )
            )
        elif name in seen:
            other = legacy.composing_flows[seen[name]].name
            same = "appears twice" if other == flow.name else f"becomes {name!r}, as {other!r} does"
            problems.append((at, f"{flow.name!r} {same} (composing_flows[{seen[name]}])"))
        else:
            seen[name] = index
    return problems


def _parent_problems(legacy: LegacyFlowOfFlows) -> list[tuple[str, str]]:
    """Mappings whose parent is no other flow of the composition."""
    known = [flow.name for flow in legacy.composing_flows]
    problems: list[tuple[str, str]] = []
    for index, flow in enumerate(legacy.composing_flows):
        for param, mapping in (flow.mapped_parameters or {}).items():
            at = f"composing_flows[{index}].mapped_parameters.{param}.parent_flow_name"
            if mapping.parent_flow_name == flow.name:
                problems.append((at, f"{flow.name!r} cannot map a parameter from itself"))
            elif mapping.parent_flow_name not in known:
                problems.append(
                    (
                        at,
                        f"{mapping.parent_flow_name!r} is not a composing flow "
                        f"(known: {', '.join(known)})",
                    )
                )
    return problems


def _step(flow: LegacyComposingFlow, steps: dict[str, str]) -> dict[str, Any]:
    step: dict[str, Any] = {"name": steps[flow.name], "flowRef": {"name": object_name(flow.name)}}
    if flow.parameters is not None:
        step["parameters"] = dict(flow.parameters)
    if flow.mapped_parameters is not None:
        step["mappedParameters"] = {
            param: _mapping(mapping, steps) for param, mapping in flow.mapped_parameters.items()
        }
    return step


def _mapping(mapping: LegacyMappedParameter, steps: dict[str, str]) -> dict[str, Any]:
    new: dict[str, Any] = {"parentFlow": steps[mapping.parent_flow_name]}
    if mapping.parent_task_name is not None:
        new["parentTask"] = mapping.parent_task_name
    new["mapType"] = mapping.map_type
    if mapping.attribute_index is not None:
        new["attributeIndex"] = list(mapping.attribute_index)
    return new


def _legacy_path(path: str) -> str:
    """A path of the converted manifest as the old-format path it came from."""
    parts = path.split(".")
    if parts[:2] == ["metadata", "name"]:
        return "name"
    if not parts or parts[0] != "spec":
        return path
    rest = parts[1:]
    if rest and rest[0].startswith("steps["):
        rest[0] = rest[0].replace("steps", "composing_flows", 1)
        rest = rest[:2] if len(rest) > 1 and rest[1] == "flowRef" else rest
    return format_location(_LEGACY_FIELDS.get(part, part) for part in rest) if rest else path


def _parse_document(
    document: Document, notes: list[Problem]
) -> tuple[Resource | None, list[Problem]]:
    """A manifest, or an original lume-services flow-of-flows file converted to one."""
    if not is_legacy(document.body):
        return parse_resource(document.body, document.source)
    source = f"{document.source} (lume-services flow-of-flows)"
    try:
        manifest = convert(document.body)
    except LegacyFormatError as error:
        return None, [Problem(source, path, message) for path, message in error.problems]
    note = ignored_note(document.body)
    if note:
        notes.append(Problem(source, "", note))
    return parse_resource(manifest, document.source)


def load_manifests(paths: Iterable[str | Path]) -> Manifests:
    """Parse every manifest under `paths`, original-format flow-of-flows files converted;
    problems are collected, not raised."""
    documents, problems = read_documents(paths)
    manifests = Manifests(problems=problems)
    for document in documents:
        resource, found = _parse_document(document, manifests.notes)
        manifests.problems.extend(found)
        if resource is None:
            if not found:
                body = document.body
                manifests.skipped.append(
                    f"{document.source} ({body.get('kind')} {body.get('apiVersion')})"
                )
            continue
        manifests.origins[identity(resource)] = document
        if isinstance(resource, SchedulingBackend):
            manifests.backends.append(resource)
        elif isinstance(resource, LumeFlow):
            manifests.flows.append(resource)
        elif isinstance(resource, FlowOfFlows):
            manifests.compositions.append(resource)
    return manifests
