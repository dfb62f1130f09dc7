"""The lume-services flow-of-flows format: converted exactly, and every mistake at its old path."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from lume_operator.api.flowofflows import FlowOfFlows
from lume_operator.flows.convert import (
    HEADER,
    LegacyFlowOfFlows,
    LegacyFormatError,
    convert,
    dump,
    is_legacy,
)

LEGACY = Path(__file__).parent / "data" / "legacy" / "impact-pipeline.yaml"

EXPECTED = {
    "apiVersion": "lume.dev/v1alpha1",
    "kind": "FlowOfFlows",
    "metadata": {
        "name": "impact-pipeline",
        "namespace": "accelerators",
        "annotations": {"lume.dev/project": "impact"},
    },
    "spec": {
        "labels": ["cpu"],
        "steps": [
            {
                "name": "make-distgen",
                "flowRef": {"name": "make-distgen"},
                "parameters": {"n_particles": 10000},
            },
            {
                "name": "run-impact",
                "flowRef": {"name": "run-impact"},
                "parameters": {"timeout": 600},
                "mappedParameters": {
                    "input_file": {
                        "parentFlow": "make-distgen",
                        "parentTask": "save_file",
                        "mapType": "file",
                    }
                },
            },
            {
                "name": "summarize",
                "flowRef": {"name": "summarize"},
                "mappedParameters": {
                    "distribution_path": {
                        "parentFlow": "make-distgen",
                        "mapType": "raw",
                        "attributeIndex": ["outputs", 0],
                    },
                    "impact_archive": {"parentFlow": "run-impact", "mapType": "db"},
                },
            },
        ],
    },
}


def legacy() -> dict[str, Any]:
    return yaml.safe_load(LEGACY.read_text())


def problems(document: Any) -> list[tuple[str, str]]:
    with pytest.raises(LegacyFormatError) as caught:
        convert(document)
    return caught.value.problems


@pytest.mark.unit
def test_example_converts_to_exactly_the_expected_manifest():
    document = legacy()
    assert is_legacy(document)
    manifest = convert(document, namespace="accelerators")
    assert manifest == EXPECTED
    # Key order is what users read in the dumped YAML.
    assert list(manifest) == ["apiVersion", "kind", "metadata", "spec"]
    assert list(manifest["spec"]["steps"][1]) == [
        "name",
        "flowRef",
        "parameters",
        "mappedParameters",
    ]
    assert FlowOfFlows.model_validate(manifest).to_wire()["spec"] == EXPECTED["spec"]


@pytest.mark.unit
def test_convert_does_not_modify_its_input():
    document = legacy()
    before = copy.deepcopy(document)
    convert(document)
    assert document == before


@pytest.mark.unit
def test_dump_round_trips_with_the_header_first():
    text = dump(convert(legacy()))
    assert text.splitlines()[0] == HEADER
    assert text.startswith(
        "# Converted from the lume-services flow-of-flows format by lume-operator convert\n"
        "apiVersion: lume.dev/v1alpha1\nkind: FlowOfFlows\n"
    )
    assert yaml.safe_load(text) == {
        **EXPECTED,
        "metadata": {**EXPECTED["metadata"], "namespace": "default"},
    }


@pytest.mark.unit
def test_minimal_document_has_no_optional_keys():
    manifest = convert({"name": "Solo_Run", "composing_flows": [{"name": "only.flow"}]})
    assert manifest == {
        "apiVersion": "lume.dev/v1alpha1",
        "kind": "FlowOfFlows",
        "metadata": {"name": "solo-run", "namespace": "default"},
        # The step name must be a DNS label; the LumeFlow name may keep its dot.
        "spec": {"steps": [{"name": "only-flow", "flowRef": {"name": "only.flow"}}]},
    }


@pytest.mark.unit
@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"name": "x", "composing_flows": []}, True),
        ({"apiVersion": "lume.dev/v1alpha1", "composing_flows": []}, False),
        ({"apiVersion": "lume.dev/v1alpha1", "kind": "FlowOfFlows"}, False),
        ({"name": "x"}, False),
        (["composing_flows"], False),
    ],
)
def test_is_legacy(document, expected):
    assert is_legacy(document) is expected


@pytest.mark.unit
def test_missing_composing_flows():
    assert problems({"name": "impact-pipeline"}) == [
        ("composing_flows", "required field is missing")
    ]


@pytest.mark.unit
def test_empty_composing_flows():
    [(path, message)] = problems({"name": "impact-pipeline", "composing_flows": []})
    assert path == "composing_flows"
    assert "at least 1 item" in message


@pytest.mark.unit
def test_typo_fields_are_named_at_their_old_paths():
    """lume-services ignored keys its models did not declare: a typo of a required field is
    still an error (the field is missing); any other unknown key is accepted and named."""
    from lume_operator.flows.convert import convert, ignored_keys

    document = legacy()
    document["composing_flow"] = document.pop("composing_flows")
    assert problems(document) == [("composing_flows", "required field is missing")]
    assert ignored_keys(document) == ["composing_flow"]
    document = legacy()
    mapping = document["composing_flows"][1]["mapped_parameters"]["input_file"]
    mapping["parent_task"] = mapping.pop("parent_task_name")
    convert(document)  # accepted, as lume-services accepted it
    assert ignored_keys(document) == ["composing_flows[1].mapped_parameters.input_file.parent_task"]


@pytest.mark.unit
def test_bad_map_type():
    document = legacy()
    document["composing_flows"][1]["mapped_parameters"]["input_file"]["map_type"] = "files"
    assert problems(document) == [
        (
            "composing_flows[1].mapped_parameters.input_file.map_type",
            "'files' is not one of 'raw', 'file' or 'db'",
        )
    ]


@pytest.mark.unit
def test_every_problem_is_reported_at_once():
    document = legacy()
    del document["composing_flows"][2]["mapped_parameters"]["impact_archive"]["map_type"]
    document["composing_flows"][0]["paramaters"] = document["composing_flows"][0].pop("parameters")
    # The unknown key is ignored, as lume-services ignored it (named by ignored_keys).
    assert problems(document) == [
        (
            "composing_flows[2].mapped_parameters.impact_archive.map_type",
            "required field is missing",
        ),
    ]


@pytest.mark.unit
def test_unknown_parent_names_the_known_flows():
    document = legacy()
    document["composing_flows"][2]["mapped_parameters"]["impact_archive"]["parent_flow_name"] = (
        "run-impact"  # the converted name, not the one written in this file
    )
    assert problems(document) == [
        (
            "composing_flows[2].mapped_parameters.impact_archive.parent_flow_name",
            "'run-impact' is not a composing flow (known: make-distgen, run_impact, summarize)",
        )
    ]


@pytest.mark.unit
def test_a_later_flow_may_be_the_parent():
    document = {
        "name": "backwards",
        "composing_flows": [
            {
                "name": "child",
                "mapped_parameters": {"x": {"parent_flow_name": "parent", "map_type": "raw"}},
            },
            {"name": "parent"},
        ],
    }
    step = convert(document)["spec"]["steps"][0]
    assert step["mappedParameters"] == {"x": {"parentFlow": "parent", "mapType": "raw"}}


@pytest.mark.unit
def test_self_parent_and_cycles():
    document = {
        "name": "loop",
        "composing_flows": [
            {"name": "a", "mapped_parameters": {"x": {"parent_flow_name": "a", "map_type": "raw"}}},
        ],
    }
    assert problems(document) == [
        (
            "composing_flows[0].mapped_parameters.x.parent_flow_name",
            "'a' cannot map a parameter from itself",
        )
    ]
    document["composing_flows"] = [
        {"name": "a", "mapped_parameters": {"x": {"parent_flow_name": "b", "map_type": "raw"}}},
        {"name": "b", "mapped_parameters": {"y": {"parent_flow_name": "a", "map_type": "file"}}},
    ]
    [(path, message)] = problems(document)
    assert path == "composing_flows"
    assert message in (
        "mapped parameters form a cycle: a -> b -> a",
        "mapped parameters form a cycle: b -> a -> b",
    )


@pytest.mark.unit
def test_names_that_collide_or_cannot_be_kubernetes_names():
    document = {
        "name": "Bad Name!",
        "composing_flows": [
            {"name": "make_distgen"},
            {"name": "make-distgen"},
            {"name": "make_distgen"},
            {"name": "run impact"},
        ],
    }
    assert problems(document) == [
        ("name", "'Bad Name!' cannot be made a Kubernetes name (letters, digits, '-', '.')"),
        (
            "composing_flows[1].name",
            "'make-distgen' becomes 'make-distgen', as 'make_distgen' does (composing_flows[0])",
        ),
        ("composing_flows[2].name", "'make_distgen' appears twice (composing_flows[0])"),
        (
            "composing_flows[3].name",
            "'run impact' cannot be made a step name (at most 63 letters, digits, '-', '_' or '.')",
        ),
    ]


@pytest.mark.unit
def test_not_a_mapping_or_already_a_manifest():
    assert problems(["composing_flows"]) == [("", "a flow-of-flows file must be a mapping")]
    [(path, message)] = problems(EXPECTED)
    assert path == "apiVersion"
    assert "nothing to convert" in message


@pytest.mark.unit
def test_error_message_lists_every_problem():
    document = legacy()
    document["composing_flows"][1]["mapped_parameters"]["input_file"]["map_type"] = "hdf5"
    document["lables"] = ["cpu"]
    with pytest.raises(LegacyFormatError) as caught:
        convert(document)
    assert isinstance(caught.value, ValueError)
    assert str(caught.value).splitlines() == [
        "composing_flows[1].mapped_parameters.input_file.map_type: "
        "'hdf5' is not one of 'raw', 'file' or 'db'",
    ]  # `lables` is ignored (with a note), as lume-services ignored it


@pytest.mark.unit
def test_legacy_model_reads_the_example():
    model = LegacyFlowOfFlows.model_validate(legacy())
    assert [flow.name for flow in model.composing_flows] == [
        "make-distgen",
        "run_impact",
        "summarize",
    ]
    summarize = model.composing_flows[2].mapped_parameters or {}
    assert summarize["distribution_path"].attribute_index == ["outputs", 0]


def test_convert_and_graph_commands(tmp_path):
    """The CLI prints the converted manifest, which validates and draws as a DAG."""
    from .conftest import run_cli

    result = run_cli("convert", "-f", str(LEGACY))
    assert result.returncode == 0, result.stdout + result.stderr
    converted = tmp_path / "pipeline.yaml"
    converted.write_text(result.stdout)
    manifest = yaml.safe_load(result.stdout)
    assert manifest["kind"] == "FlowOfFlows"
    assert [s["name"] for s in manifest["spec"]["steps"]] == [
        "make-distgen",
        "run-impact",
        "summarize",
    ]
    drawn = run_cli("graph", "-f", str(converted))
    assert drawn.returncode == 0, drawn.stdout
    assert '"make-distgen" -> "run-impact" [label="input_file (file) from task ' in drawn.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: p\ncomposing_flows:\n  - name: a\n    mapped_parameters:\n"
        "      x: {parent_flow_name: nope, map_type: raw}\n"
    )
    failed = run_cli("convert", "-f", str(bad))
    assert failed.returncode == 1
    # Errors go to stderr, so stdout stays YAML to redirect.
    assert "composing_flows[0].mapped_parameters.x.parent_flow_name" in failed.stderr
    assert "Traceback" not in failed.stderr
