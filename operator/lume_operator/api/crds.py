"""Generate the CustomResourceDefinitions in `crds/` from the pydantic models.

The models are the one source of truth: this turns their JSON schemas into Kubernetes
structural schemas (no $ref, no anyOf-with-null, no additionalProperties beside properties),
adds printer columns, short names and the status subresource.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from lume_operator import GROUP, VERSION
from lume_operator.api.backend import (
    SchedulingBackend,
    SchedulingBackendSpec,
    SchedulingBackendStatus,
)
from lume_operator.api.flow import LumeFlow, LumeFlowSpec, LumeFlowStatus
from lume_operator.api.flowofflows import FlowOfFlows, FlowOfFlowsSpec, FlowOfFlowsStatus

_DROP = {"title", "default", "examples", "$defs"}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def structural(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """One pydantic JSON schema node as a Kubernetes structural schema node."""
    schema = dict(schema)
    if "$ref" in schema:
        target = defs[schema.pop("$ref").rsplit("/", 1)[-1]]
        schema = _merge(target, schema)
    if "anyOf" in schema:
        options = [o for o in schema.pop("anyOf") if o.get("type") != "null"]
        types = {o.get("type") for o in options}
        if types == {"string", "integer"}:
            schema["x-kubernetes-int-or-string"] = True
        elif len(options) == 1:
            schema = _merge(structural(options[0], defs), schema)
        else:
            raise ValueError(f"no structural form for a union of {options}")
    if "const" in schema:
        schema["enum"] = [schema.pop("const")]
        schema.setdefault("type", "string")
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _DROP:
            continue
        if key == "properties":
            out["properties"] = {name: structural(sub, defs) for name, sub in value.items()}
        elif key == "items":
            out["items"] = structural(value, defs)
        elif key == "additionalProperties":
            if value is True or value == {}:
                out["x-kubernetes-preserve-unknown-fields"] = True
            elif isinstance(value, dict):
                out["additionalProperties"] = structural(value, defs)
            # `false` is implied by a schema's properties in Kubernetes (unknown fields are pruned)
        else:
            out[key] = value
    if "properties" in out and "required" in out:
        out["required"] = sorted(out["required"])
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
    elif "type" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["x-kubernetes-preserve-unknown-fields"] = True
    first = [k for k in ("description", "type") if k in out]
    return {**{k: out[k] for k in first}, **{k: v for k, v in out.items() if k not in first}}


def _schema_of(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    return structural(schema, schema.get("$defs", {}))


KINDS: list[dict[str, Any]] = [
    {
        "model": SchedulingBackend,
        "spec": SchedulingBackendSpec,
        "status": SchedulingBackendStatus,
        "plural": "schedulingbackends",
        "short": ["sb"],
        "columns": [
            {"name": "Type", "type": "string", "jsonPath": ".spec.type"},
            {"name": "Pool", "type": "string", "jsonPath": ".status.workPoolName"},
            {
                "name": "Ready",
                "type": "string",
                "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
            },
            {"name": "Agents", "type": "integer", "jsonPath": ".status.agentReadyReplicas"},
        ],
    },
    {
        "model": LumeFlow,
        "spec": LumeFlowSpec,
        "status": LumeFlowStatus,
        "plural": "lumeflows",
        "short": ["lf"],
        "columns": [
            {"name": "Backend", "type": "string", "jsonPath": ".spec.backendRef.name"},
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Last Run", "type": "date", "jsonPath": ".status.lastRun.startTime"},
            {
                "name": "Run State",
                "type": "string",
                "jsonPath": ".status.lastRun.state",
                "priority": 1,
            },
            {"name": "Run ID", "type": "string", "jsonPath": ".status.lastRun.id", "priority": 1},
        ],
    },
    {
        "model": FlowOfFlows,
        "spec": FlowOfFlowsSpec,
        "status": FlowOfFlowsStatus,
        "plural": "flowofflows",
        "short": ["fof"],
        "columns": [
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Run State", "type": "string", "jsonPath": ".status.run.state"},
        ],
    },
]


def crd(kind: dict[str, Any]) -> dict[str, Any]:
    """The CRD of one kind."""
    model: type[BaseModel] = kind["model"]
    name = model.model_fields["kind"].default
    spec_schema = _schema_of(kind["spec"])
    spec_schema["description"] = (
        model.model_fields["spec"].description + " " + spec_schema.get("description", "")
    )
    status_schema = _schema_of(kind["status"])
    status_schema["description"] = model.model_fields["status"].description
    schema = {
        "type": "object",
        "description": (model.__doc__ or "").strip(),
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of this object."},
            "kind": {"type": "string", "description": "Kind of this object."},
            "metadata": {"type": "object", "description": "Standard object metadata."},
            "spec": spec_schema,
            "status": status_schema,
        },
    }
    columns = copy.deepcopy(kind["columns"]) + [
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{kind['plural']}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": name,
                "listKind": f"{name}List",
                "plural": kind["plural"],
                "singular": name.lower(),
                "shortNames": kind["short"],
                "categories": ["lume"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                }
            ],
        },
    }


class _Dumper(yaml.SafeDumper):
    """Writes shared sub-schemas out in full: anchors and aliases confuse CRD readers."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render_all() -> dict[str, str]:
    """File name -> YAML text of every CRD."""
    return {
        f"{GROUP}_{kind['plural']}.yaml": "# Generated by `lume-operator crds`; do not edit.\n"
        + yaml.dump(crd(kind), Dumper=_Dumper, sort_keys=False, width=100)
        for kind in KINDS
    }


def write_all(output: Path) -> list[Path]:
    """Write every CRD into `output`; only files that changed are rewritten."""
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, text in render_all().items():
        path = output / filename
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        written.append(path)
    return written


CHART_CRD_HEADER = (
    "# Copied from crds/ by `write_chart_crds` (lume_operator.api.crds); do not edit.\n"
    "# Helm installs this directory before the templates and never upgrades or deletes it:\n"
    "# upgrade CRDs with `kubectl apply --server-side -f charts/lume-operator/crds/`.\n"
)


def write_chart_crds(chart_dir: Path) -> list[Path]:
    """Write the CRDs into `<chart_dir>/crds/`, so `helm install` installs them first.

    The same text as `crds/` under a header, so one drift test covers both copies. Stale
    `lume.dev_*` files (a kind renamed or removed) are deleted; other CRDs the chart ships
    (kopf's peering) are left alone.
    """
    output = chart_dir / "crds"
    output.mkdir(parents=True, exist_ok=True)
    rendered = {name: CHART_CRD_HEADER + text for name, text in render_all().items()}
    for stale in output.glob(f"{GROUP}_*.yaml"):
        if stale.name not in rendered:
            stale.unlink()
    written = []
    for filename, text in rendered.items():
        path = output / filename
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        written.append(path)
    return written


# Plural resource names by kind, for the operator's handlers and the results CLI.
PLURALS: dict[str, str] = {
    kind["model"].model_fields["kind"].default: kind["plural"] for kind in KINDS
}
