"""The shape the architecture promises (docs/architecture.md), checked on the source itself."""

from __future__ import annotations

import ast
import os
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


@pytest.mark.parametrize(
    "module",
    ["lume_operator.handlers.operator", "lume_operator.cli", "lume_operator.local.runner"],
)
def test_the_operator_and_the_cli_start_without_lume_base(module):
    """lume-base imports scipy and matplotlib (about 2 s of a local run's start, and of every
    operator start); only code that reads or writes a File needs it, and imports it then."""
    import subprocess
    import sys

    code = (
        f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'lume'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]", f"{module} imports lume-base: {result.stdout}"


def test_the_operators_start_takes_its_imports_out_of_the_collectors_full_passes(tmp_path):
    """kopf's startup (`startup`) ends with what the imports made frozen: a full collection,
    several in a mass apply, otherwise walks those 300,000 objects each time."""
    import subprocess
    import sys

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: c, cluster: {server: 'http://127.0.0.1:9'}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\n"
    )
    code = (
        "import gc, kopf; from lume_operator.handlers import operator as o; "
        "o.startup(settings=kopf.OperatorSettings(), memo=kopf.Memo()); "
        "print(gc.get_freeze_count(), len(gc.get_objects()))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
    )
    assert result.returncode == 0, result.stderr
    frozen, walked = map(int, result.stdout.split())
    assert frozen > 100_000 and walked < frozen / 10, result.stdout
