"""FlowOfFlows checks that need more than one step: parents, parameters, cycles.

Everything that can be checked before anything runs is checked here, so a pipeline author
learns of every mistake at once, each at its field path.
"""

from __future__ import annotations

import graphlib
from collections.abc import Callable
from typing import Any

from lume_operator.api.flow import LumeFlow, LumeFlowSpec
from lume_operator.api.flowofflows import FlowOfFlows
from lume_operator.flows.graph import parents


def find_cycle(parents: dict[str, set[str]]) -> list[str] | None:
    """A cycle as [a, b, ..., a], or None."""
    try:
        graphlib.TopologicalSorter(parents).prepare()
    except graphlib.CycleError as error:
        return list(error.args[1])
    return None


def composition_problems(
    fof: FlowOfFlows,
    flows: dict[str, LumeFlow],
    parameter_schema: Callable[[LumeFlowSpec], dict[str, Any] | None] | None = None,
) -> list[tuple[str, str]]:
    """(field path, why) for every problem of a composition.

    `flows` are the LumeFlows of the composition's namespace by name; `parameter_schema`
    returns a step flow's parameter schema when its signature can be known (code importable
    here, or a Prefect deployment's schema), else None.
    """
    problems: list[tuple[str, str]] = []
    names = [step.name for step in fof.spec.steps]
    for index, step in enumerate(fof.spec.steps):
        at = f"spec.steps[{index}]"
        spec: LumeFlowSpec | None = step.flow
        if step.flow_ref is not None:
            flow = flows.get(step.flow_ref.name)
            if flow is None:
                problems.append(
                    (
                        f"{at}.flowRef.name",
                        f"LumeFlow {step.flow_ref.name!r} not found in namespace "
                        f"{fof.metadata.namespace!r} (have: {', '.join(sorted(flows)) or 'none'})",
                    )
                )
            else:
                spec = flow.spec
        mapped = step.mapped_parameters or {}
        for param, mapping in mapped.items():
            where = f"{at}.mappedParameters.{param}"
            if mapping.parent_flow not in names:
                problems.append(
                    (
                        f"{where}.parentFlow",
                        f"unknown parent flow {mapping.parent_flow!r} (steps: {', '.join(names)})",
                    )
                )
            elif mapping.parent_flow == step.name:
                problems.append((f"{where}.parentFlow", "a step cannot map its own output"))
            if param in (step.parameters or {}):
                problems.append(
                    (
                        f"{at}.parameters.{param}",
                        f"parameter {param!r} is both set and mapped from "
                        f"{mapping.parent_flow!r}; keep one",
                    )
                )
        schema = parameter_schema(spec) if (spec is not None and parameter_schema) else None
        if schema is not None:
            takes = schema.get("properties", {})
            for param in mapped:
                if param not in takes:
                    problems.append(
                        (
                            f"{at}.mappedParameters.{param}",
                            f"the flow of step {step.name!r} takes no parameter {param!r} "
                            f"(it takes: {', '.join(takes) or 'no parameters'})",
                        )
                    )
    cycle = find_cycle(parents(fof.spec))
    if cycle:
        problems.append(("spec.steps", f"the steps form a cycle: {' -> '.join(cycle)}"))
    return problems
