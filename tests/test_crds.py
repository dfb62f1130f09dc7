"""The CRDs: generated from the models, accepted by Kubernetes' schema, and matching the examples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from lume_operator.api.backend import DOCKER_NO_SECRET, S3_URL_PATTERN
from lume_operator.api.crds import render_all
from lume_operator.api.manifests import read_documents

from .conftest import EXAMPLES, ROOT, run_cli

CRDS = ROOT / "crds"


def crd_of(kind: str) -> dict[str, Any]:
    for text in render_all().values():
        crd = yaml.safe_load(text)
        if crd["spec"]["names"]["kind"] == kind:
            return crd
    raise KeyError(kind)


def schema_of(kind: str) -> dict[str, Any]:
    return crd_of(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_crds_directory_matches_the_models(tmp_path):
    """Regenerating with the project's own command changes nothing in crds/."""
    result = run_cli("crds", "--output", str(tmp_path))
    assert result.returncode == 0, result.stderr
    generated = {p.name: p.read_text() for p in tmp_path.iterdir()}
    committed = {p.name: p.read_text() for p in CRDS.glob("*.yaml")}
    assert generated == committed, "crds/ is stale: run `lume-operator crds --output crds`"


@pytest.mark.unit
@pytest.mark.parametrize("filename", sorted(render_all()))
def test_crd_passes_kubernetes_schema(filename):
    crd = yaml.safe_load(render_all()[filename])
    kubernetes_validate.validate(crd, kubernetes_validate.latest_version(), strict=True)


def walk(schema: dict[str, Any], path: str = ""):
    for name, sub in schema.get("properties", {}).items():
        yield f"{path}.{name}", sub
        yield from walk(sub, f"{path}.{name}")
    if "items" in schema:
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["SchedulingBackend", "LumeFlow", "FlowOfFlows"])
def test_every_field_is_described_and_structural(kind):
    schema = schema_of(kind)
    for path, sub in walk(schema):
        assert sub.get("description"), f"{kind}{path} has no description"
        assert (
            "type" in sub
            or sub.get("x-kubernetes-int-or-string")
            or sub.get("x-kubernetes-preserve-unknown-fields")
        ), f"{kind}{path} has no type"
        for forbidden in ("$ref", "anyOf", "oneOf", "allOf", "title", "nullable"):
            assert forbidden not in sub, f"{kind}{path} has {forbidden}"
        assert not ("properties" in sub and "additionalProperties" in sub), f"{kind}{path}"


@pytest.mark.unit
def test_names_columns_status_and_cel():
    expected_short = {"SchedulingBackend": ["sb"], "LumeFlow": ["lf"], "FlowOfFlows": ["fof"]}
    for kind, short in expected_short.items():
        crd = crd_of(kind)
        assert crd["spec"]["names"]["shortNames"] == short
        version = crd["spec"]["versions"][0]
        assert version["subresources"] == {"status": {}}
        assert version["additionalPrinterColumns"][-1]["name"] == "Age"
    columns = [
        c["name"] for c in crd_of("LumeFlow")["spec"]["versions"][0]["additionalPrinterColumns"]
    ]
    assert columns[:3] == ["Backend", "Phase", "Last Run"] and "Age" in columns
    backend_type = schema_of("SchedulingBackend")["properties"]["spec"]["properties"]["type"]
    assert backend_type["x-kubernetes-validations"] == [
        {"rule": "self == oldSelf", "message": "type is immutable"}
    ]
    steps = schema_of("FlowOfFlows")["properties"]["spec"]["properties"]["steps"]
    assert steps["x-kubernetes-list-type"] == "map" and steps["x-kubernetes-list-map-keys"] == [
        "name"
    ]


def example_documents() -> list[dict[str, Any]]:
    documents, problems = read_documents([EXAMPLES])
    assert not problems
    return [d.body for d in documents if str(d.body.get("apiVersion", "")).startswith("lume.dev/")]


@pytest.mark.unit
def test_examples_exist():
    kinds = {d["kind"] for d in example_documents()}
    assert {"SchedulingBackend", "LumeFlow"} <= kinds


@pytest.mark.unit
@pytest.mark.parametrize(
    "document", example_documents(), ids=lambda d: f"{d['kind']}-{d['metadata']['name']}"
)
def test_example_validates_against_its_crd(document):
    jsonschema.validate(document, schema_of(document["kind"]))


@pytest.mark.unit
@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"runConfig": {"memoryLimit": "2 gigs"}}, "does not match"),
        ({"runConfig": {"cpuLimit": 2}}, "is not of type 'string'"),
        ({"entrypoint": "no-function"}, "does not match"),
        ({"runConfig": {"imagePullPolicy": "Sometimes"}}, "is not one of"),
    ],
)
def test_crd_schema_rejects_bad_flows(patch, message):
    document = next(d for d in example_documents() if d["kind"] == "LumeFlow")
    document = {**document, "spec": {**document["spec"], **patch}}
    with pytest.raises(jsonschema.ValidationError, match=message):
        jsonschema.validate(document, schema_of("LumeFlow"))


@pytest.mark.unit
def test_crd_schema_rejects_unknown_backend_type():
    with pytest.raises(jsonschema.ValidationError, match="'slurm' is not one of"):
        jsonschema.validate(
            {
                "apiVersion": "lume.dev/v1alpha1",
                "kind": "SchedulingBackend",
                "metadata": {"name": "b"},
                "spec": {"type": "slurm"},
            },
            schema_of("SchedulingBackend"),
        )


@pytest.mark.unit
def test_committed_crds_are_the_files_kubectl_applies():
    assert sorted(p.name for p in Path(CRDS).glob("*.yaml")) == sorted(render_all())


@pytest.mark.unit
def test_result_storage_rules_are_in_the_crd():
    spec = schema_of("SchedulingBackend")["properties"]["spec"]
    assert [rule["message"] for rule in spec["x-kubernetes-validations"]] == [DOCKER_NO_SECRET]
    storage = spec["properties"]["resultStorage"]
    assert storage["x-kubernetes-validations"] == [
        {
            "rule": "has(self.objectStore) != has(self.volume)",
            "message": "resultStorage needs exactly one of objectStore or volume",
        }
    ]
    url = storage["properties"]["objectStore"]["properties"]["url"]
    assert url["pattern"] == S3_URL_PATTERN
