"""Shared test setup: every test gets its own PREFECT_HOME, and nothing phones home."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# Before Prefect is imported: a throwaway home for anything that starts an ephemeral server.
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="lume-tests-prefect-")
os.environ.pop("PREFECT_API_URL", None)
# The embedded server's migrated-database copy: one per test session, not the user's.
os.environ["LUME_OPERATOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="lume-tests-cache-")


@pytest.fixture
def prefect_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private Prefect home (database, result storage) for one test."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    return home


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """The real `lume-operator` command, in a subprocess, as users run it."""
    return subprocess.run(
        [sys.executable, "-m", "lume_operator.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
    )


@pytest.fixture(autouse=True, scope="session")
def _stop_ephemeral_prefect():
    """Stop the server Prefect starts by itself in-process, before pytest closes its output."""
    yield
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    if server.running:
        server.stop()
