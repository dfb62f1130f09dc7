"""A FlowOfFlows as a graph: who feeds whom, and a Graphviz picture of it for reviews and docs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from lume_operator.api.flowofflows import FlowOfFlows, FlowOfFlowsSpec, Step

RENDERED_FORMATS = ("png", "svg")


class GraphvizNotFound(RuntimeError):
    """Images need the `dot` program; the .dot text does not."""


def parents(spec: FlowOfFlowsSpec) -> dict[str, set[str]]:
    """Each step's parents (steps it maps parameters from); unknown parents are validation's job."""
    names = {step.name for step in spec.steps}
    return {
        step.name: {
            mapping.parent_flow
            for mapping in (step.mapped_parameters or {}).values()
            if mapping.parent_flow in names
        }
        for step in spec.steps
    }


def _quote(text: str) -> str:
    """A DOT double-quoted string: any name survives, whatever characters it has."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _flow(step: Step) -> str:
    if step.flow_ref is not None:
        return step.flow_ref.name
    assert step.flow is not None  # the model requires one of the two
    return f"inline: {step.flow.entrypoint}"


def _label(*lines: str) -> str:
    # Lines are quoted one by one, then joined by DOT's own line break escape.
    return '"' + "\\n".join(_quote(line)[1:-1] for line in lines) + '"'


def to_dot(fof: FlowOfFlows) -> str:
    """Graphviz DOT of the composition's DAG, byte-identical for the same spec."""
    names = [step.name for step in fof.spec.steps]
    lines = [f"digraph {_quote(fof.metadata.name)} {{", "  rankdir=LR;", "  node [shape=box];"]
    for step in fof.spec.steps:
        # A step named after its flow (every converted original-format step) is named once.
        shown = [step.name] if _flow(step) == step.name else [step.name, _flow(step)]
        lines.append(f"  {_quote(step.name)} [label={_label(*shown)}];")
    edges: list[tuple[str, str, str]] = []
    for step in fof.spec.steps:
        for param, mapping in (step.mapped_parameters or {}).items():
            label = f"{param} ({mapping.map_type})"
            if mapping.parent_task:
                label += f" from task {mapping.parent_task}"
            if mapping.attribute_index:
                label += f" [{'.'.join(str(key) for key in mapping.attribute_index)}]"
            edges.append((mapping.parent_flow, step.name, label))
    # A parent that is no step would otherwise vanish from the picture; show it as missing.
    for missing in sorted({parent for parent, _, _ in edges} - set(names)):
        lines.append(
            f"  {_quote(missing)} [label={_label(missing, '(no such step)')}, "
            "style=dashed, color=red];"
        )
    for parent, child, label in sorted(edges):
        lines.append(f"  {_quote(parent)} -> {_quote(child)} [label={_quote(label)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(dot: str, output: Path) -> None:
    """Write DOT text to a .dot file, or an image (.png, .svg) drawn by Graphviz."""
    output = Path(output)
    fmt = output.suffix.lower().lstrip(".")
    if fmt in ("dot", "gv"):
        output.write_text(dot)
        return
    if fmt not in RENDERED_FORMATS:
        raise ValueError(
            f"cannot render {output.name!r}: use a .dot, .png or .svg output (got {output.suffix!r})"
        )
    program = shutil.which("dot")
    if program is None:
        raise GraphvizNotFound(
            f"Graphviz's `dot` program is needed to draw {output.name}: install Graphviz "
            "(e.g. `apt-get install graphviz` or `brew install graphviz`) or write a .dot output"
        )
    result = subprocess.run(
        [program, f"-T{fmt}", "-o", str(output)],
        input=dot,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"dot failed to draw {output.name}: {result.stderr.strip()}")
