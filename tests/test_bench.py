"""The benchmark scripts start as users run them (`python bench/NAME.py`), and none of them
shadows a standard-library module (the script's folder comes first on sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import ROOT

BENCH = ROOT / "bench"
SCRIPTS = sorted(BENCH.glob("*.py"))


def test_there_are_bench_scripts():
    assert SCRIPTS, f"no scripts in {BENCH}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_bench_script_answers_help(script):
    """`--help` exits 0 and prints usage: the script imports cleanly as a script."""
    result = subprocess.run(
        [sys.executable, str(script), "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
    )
    assert result.returncode == 0, f"{script.name} --help failed:\n{result.stderr}"
    assert "usage:" in result.stdout.lower(), result.stdout


def test_no_bench_module_shadows_the_standard_library():
    """`python bench/x.py` puts bench/ first on sys.path: a bench/operator.py would be imported
    by `collections` in place of the standard library's `operator`."""
    names = {path.stem for path in BENCH.rglob("*.py")} | {
        path.name for path in BENCH.rglob("*") if path.is_dir() and path.name != "__pycache__"
    }
    shadowing = sorted(names & sys.stdlib_module_names)
    assert not shadowing, f"bench/ modules named like standard-library modules: {shadowing}"
