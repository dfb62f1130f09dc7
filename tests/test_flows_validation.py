"""FlowOfFlows validation: every mistake found before anything runs, each at its path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from lume_operator.flows.convert import load_manifests as load
from lume_operator.flows.validation import find_cycle
from lume_operator.local.checks import composition_problems_local

from .conftest import run_cli

FLOWS = """
from prefect import flow


@flow
def make(n: int = 10) -> dict:
    return {"values": list(range(n))}


@flow
def total(values: list, scale: float = 1.0) -> float:
    return sum(values) * scale
"""

PREAMBLE = textwrap.dedent("""\
    apiVersion: lume.dev/v1alpha1
    kind: SchedulingBackend
    metadata: {name: local}
    spec: {type: process}
    ---
    apiVersion: lume.dev/v1alpha1
    kind: LumeFlow
    metadata: {name: make}
    spec: {backendRef: {name: local}, entrypoint: "flows.py:make"}
    ---
    apiVersion: lume.dev/v1alpha1
    kind: LumeFlow
    metadata: {name: total}
    spec: {backendRef: {name: local}, entrypoint: "flows.py:total"}
    ---
    apiVersion: lume.dev/v1alpha1
    kind: FlowOfFlows
    metadata: {name: pipe}
    spec:
      steps:
    """)


def problems(tmp_path: Path, steps: str) -> list[str]:
    (tmp_path / "flows.py").write_text(FLOWS)
    (tmp_path / "all.yaml").write_text(PREAMBLE + textwrap.indent(textwrap.dedent(steps), "    "))
    manifests = load([tmp_path])
    found = manifests.problems + composition_problems_local(manifests)
    return [f"{p.path}: {p.message}" for p in found]


GOOD = """\
- name: make
  flowRef: {name: make}
  parameters: {n: 5}
- name: total
  flowRef: {name: total}
  mappedParameters:
    values: {parentFlow: make, attributeIndex: [values]}
"""


@pytest.mark.unit
def test_a_valid_composition_has_no_problems(tmp_path):
    assert problems(tmp_path, GOOD) == []


@pytest.mark.unit
def test_unknown_parent_flow(tmp_path):
    assert problems(tmp_path, GOOD.replace("parentFlow: make", "parentFlow: mkae")) == [
        "spec.steps[1].mappedParameters.values.parentFlow: unknown parent flow 'mkae' "
        "(steps: make, total)"
    ]


@pytest.mark.unit
def test_mapping_onto_a_parameter_the_child_does_not_take(tmp_path):
    assert problems(tmp_path, GOOD.replace("    values: {", "    vals: {")) == [
        "spec.steps[1].mappedParameters.vals: the flow of step 'total' takes no parameter "
        "'vals' (it takes: values, scale)"
    ]


@pytest.mark.unit
def test_parameter_both_set_and_mapped(tmp_path):
    steps = GOOD.replace(
        "  flowRef: {name: total}\n", "  flowRef: {name: total}\n  parameters: {values: [1]}\n"
    )
    assert problems(tmp_path, steps) == [
        "spec.steps[1].parameters.values: parameter 'values' is both set and mapped from "
        "'make'; keep one"
    ]


@pytest.mark.unit
def test_duplicate_step_names(tmp_path):
    steps = GOOD.replace("- name: total", "- name: make")
    assert "spec.steps: step names must be unique: make repeated" in problems(tmp_path, steps)


@pytest.mark.unit
def test_cycle(tmp_path):
    steps = GOOD.replace(
        "  parameters: {n: 5}\n",
        "  mappedParameters:\n    n: {parentFlow: total}\n",
    )
    assert problems(tmp_path, steps) == [
        "spec.steps: the steps form a cycle: make -> total -> make"
    ]


@pytest.mark.unit
def test_unknown_flow_ref(tmp_path):
    assert problems(tmp_path, GOOD.replace("flowRef: {name: total}", "flowRef: {name: sum}")) == [
        "spec.steps[1].flowRef.name: LumeFlow 'sum' not found in namespace 'default' "
        "(have: make, total)"
    ]


@pytest.mark.unit
def test_db_mapping_is_valid(tmp_path):
    assert (
        problems(tmp_path, GOOD.replace("parentFlow: make,", "parentFlow: make, mapType: db,"))
        == []
    )


@pytest.mark.unit
def test_step_needs_exactly_one_flow(tmp_path):
    steps = GOOD.replace("  flowRef: {name: make}\n", "")
    assert problems(tmp_path, steps) == [
        "spec.steps[0]: a step needs exactly one of flowRef or flow"
    ]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("parents", "cycle"),
    [
        ({"a": set(), "b": {"a"}, "c": {"a", "b"}}, None),
        ({"a": {"c"}, "b": {"a"}, "c": {"b"}}, ["a", "b", "c", "a"]),
        ({"a": {"a"}}, ["a", "a"]),
        ({"a": {"ghost"}}, None),
    ],
)
def test_find_cycle(parents, cycle):
    found = find_cycle(parents)
    if cycle is None:
        assert found is None
    else:
        assert found is not None and set(found) == set(cycle) and found[0] == found[-1]
        assert len(found) == len(cycle)


def test_validate_cli_reports_composition_problems(tmp_path):
    problems(tmp_path, GOOD.replace("parentFlow: make", "parentFlow: mkae"))
    result = run_cli("validate", "-f", str(tmp_path))
    assert result.returncode == 1
    assert (
        "(FlowOfFlows pipe): spec.steps[1].mappedParameters.values.parentFlow: unknown parent flow 'mkae'"
        in result.stdout
    )
