"""The FlowOfFlows DAG: parents, DOT text, and rendering with or without Graphviz."""

from __future__ import annotations

import html
import shutil
import subprocess
from pathlib import Path

import pytest

from lume_operator.api.flowofflows import FlowOfFlows
from lume_operator.flows import graph
from lume_operator.flows.graph import GraphvizNotFound, parents, render, to_dot

pytestmark = pytest.mark.unit


def mapping(parent: str, map_type: str = "raw", **extra: object) -> dict[str, object]:
    return {"parentFlow": parent, "mapType": map_type, **extra}


def fan_out_join() -> FlowOfFlows:
    """make-distgen feeds two branches, which both feed report."""
    return FlowOfFlows.model_validate(
        {
            "apiVersion": "lume.dev/v1alpha1",
            "kind": "FlowOfFlows",
            "metadata": {"name": "impact-scan"},
            "spec": {
                "steps": [
                    {"name": "make-distgen", "flowRef": {"name": "make-distgen"}},
                    {
                        "name": "run-impact",
                        "flowRef": {"name": "run-impact"},
                        "mappedParameters": {"input_file": mapping("make-distgen", "file")},
                    },
                    {
                        "name": "run-bmad",
                        "flow": {
                            "backendRef": {"name": "local"},
                            "entrypoint": "flows/bmad.py:track",
                        },
                        "mappedParameters": {
                            "particles": mapping("make-distgen", attributeIndex=["outputs", 0])
                        },
                    },
                    {
                        "name": "report",
                        "flowRef": {"name": "report"},
                        "mappedParameters": {
                            "impact": mapping("run-impact", "db"),
                            "bmad": mapping("run-bmad", "file"),
                            "seed": mapping("make-distgen", parentTask="draw"),
                        },
                    },
                ]
            },
        }
    )


EXPECTED_DOT = """\
digraph "impact-scan" {
  rankdir=LR;
  node [shape=box];
  "make-distgen" [label="make-distgen"];
  "run-impact" [label="run-impact"];
  "run-bmad" [label="run-bmad\\ninline: flows/bmad.py:track"];
  "report" [label="report"];
  "make-distgen" -> "report" [label="seed (raw) from task draw"];
  "make-distgen" -> "run-bmad" [label="particles (raw) [outputs.0]"];
  "make-distgen" -> "run-impact" [label="input_file (file)"];
  "run-bmad" -> "report" [label="bmad (file)"];
  "run-impact" -> "report" [label="impact (db)"];
}
"""


def test_parents_of_a_fan_out_and_join():
    assert parents(fan_out_join().spec) == {
        "make-distgen": set(),
        "run-impact": {"make-distgen"},
        "run-bmad": {"make-distgen"},
        "report": {"run-impact", "run-bmad", "make-distgen"},
    }


def test_parents_ignores_unknown_parents():
    fof = fan_out_join()
    fof.spec.steps[1].mapped_parameters["input_file"].parent_flow = "nowhere"  # type: ignore[index]
    assert parents(fof.spec)["run-impact"] == set()


def test_to_dot_fan_out_and_join():
    assert to_dot(fan_out_join()) == EXPECTED_DOT


def test_to_dot_is_deterministic_whatever_the_mapping_order():
    fof = fan_out_join()
    report = fof.spec.steps[3]
    report.mapped_parameters = dict(reversed(list((report.mapped_parameters or {}).items())))
    assert to_dot(fof) == EXPECTED_DOT


def test_to_dot_escapes_quotes_and_backslashes():
    fof = fan_out_join()
    fof.metadata.name = 'say "hi"'
    fof.spec.steps[1].mapped_parameters = {  # type: ignore[assignment]
        'in"put\\': fof.spec.steps[1].mapped_parameters["input_file"]  # type: ignore[index]
    }
    text = to_dot(fof)
    assert text.startswith('digraph "say \\"hi\\"" {\n')
    assert '  "make-distgen" -> "run-impact" [label="in\\"put\\\\ (file)"];\n' in text


def test_to_dot_shows_an_unknown_parent_as_missing():
    fof = fan_out_join()
    fof.spec.steps[1].mapped_parameters["input_file"].parent_flow = "nowhere"  # type: ignore[index]
    text = to_dot(fof)
    assert '  "nowhere" [label="nowhere\\n(no such step)", style=dashed, color=red];\n' in text
    assert '  "nowhere" -> "run-impact" [label="input_file (file)"];\n' in text


def test_render_dot_writes_the_text_as_is(tmp_path: Path):
    output = tmp_path / "pipeline.dot"
    render(EXPECTED_DOT, output)
    assert output.read_text() == EXPECTED_DOT


def test_render_svg_with_graphviz(tmp_path: Path):
    if shutil.which("dot") is None:
        pytest.skip("Graphviz is not installed; the missing-dot branch is tested below")
    output = tmp_path / "pipeline.svg"
    render(to_dot(fan_out_join()), output)
    svg = html.unescape(output.read_text())  # Graphviz writes '-' as &#45;
    assert "<svg" in svg
    for name in ("make-distgen", "run-impact", "run-bmad", "report", "inline: flows/bmad.py:track"):
        assert name in svg
    # The escaped text is valid DOT too: Graphviz accepts it.
    fof = fan_out_join()
    fof.metadata.name = 'say "hi" \\'
    subprocess.run(["dot", "-Tsvg"], input=to_dot(fof), text=True, check=True, capture_output=True)


def test_render_image_without_graphviz(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(graph.shutil, "which", lambda name: None)
    output = tmp_path / "pipeline.svg"
    with pytest.raises(GraphvizNotFound, match=r"apt-get install graphviz.*\.dot output"):
        render(EXPECTED_DOT, output)
    assert not output.exists()
    # .dot needs no Graphviz.
    render(EXPECTED_DOT, tmp_path / "pipeline.dot")
    assert (tmp_path / "pipeline.dot").read_text() == EXPECTED_DOT


def test_render_rejects_other_suffixes(tmp_path: Path):
    with pytest.raises(ValueError, match=r"\.dot, \.png or \.svg"):
        render(EXPECTED_DOT, tmp_path / "pipeline.pdf")


def test_render_reports_graphviz_errors(tmp_path: Path):
    if shutil.which("dot") is None:
        pytest.skip("Graphviz is not installed")
    with pytest.raises(RuntimeError, match="dot failed to draw broken.png"):
        render("digraph {", tmp_path / "broken.png")
