"""The shape the architecture promises (docs/architecture.md), checked on the source itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[1] / "operator" / "lume_operator"


def _kopf_handlers() -> list[tuple[str, int]]:
    """(name, lines) of every function decorated by kopf in the package."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            decorators = [ast.unparse(d) for d in node.decorator_list]
            if any(d.startswith("kopf.") for d in decorators):
                start = node.lineno  # the def line; decorators are not the handler's body
                found.append((f"{path.name}:{node.name}", node.end_lineno - start + 1))
    return found


def test_kopf_handlers_only_gather_call_and_apply():
    handlers = _kopf_handlers()
    assert len(handlers) >= 12  # 3 kinds x (reconcile, follow/health, delete) + indexes + ops
    too_long = [(name, lines) for name, lines in handlers if lines > 30]
    assert not too_long, f"kopf handlers over 30 lines (decide in reconcile/ instead): {too_long}"


def test_no_kopf_handler_outside_the_adapter():
    places = {name.split(":")[0] for name, _ in _kopf_handlers()}
    assert places == {"operator.py"}
