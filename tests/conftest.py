"""Shared test setup: every test gets its own PREFECT_HOME, and nothing phones home.

- `prefect_home`: a private Prefect home; with it alone, `lume-operator run` starts its
  embedded server, as on a laptop.
- `shared_prefect_server`: one real Prefect server for the whole session, emptied (no flow
  runs, deployments, flows or work pools) before each test that asks for it.
- `shared_prefect_api`: both, with PREFECT_API_URL naming the shared server, so the CLI runs
  there as it does for a user who started `prefect server start`: no embedded server start
  (10 s or more) in each test that does not test that start.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.k8s.prefect_server import PrefectServer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# Before Prefect is imported: a throwaway home for anything that starts an ephemeral server.
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="lume-tests-prefect-")
os.environ.pop("PREFECT_API_URL", None)


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


@pytest.fixture(scope="session")
def _session_prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    server = PrefectServer(tmp_path_factory.mktemp("shared-prefect-server")).start()
    yield server
    server.stop()


def emptied(server: PrefectServer) -> PrefectServer:
    """`server` up and empty: what a test finds there (runs, deployments, flows, work pools,
    counted or by name) is only what it made itself."""
    if not server.alive:  # a test must not stop it; if one did, fail that one, not the rest
        server.start()
    server.reset()
    return server


@pytest.fixture
def shared_prefect_server(_session_prefect_server: PrefectServer) -> PrefectServer:
    """The session's Prefect server, emptied for this test."""
    return emptied(_session_prefect_server)


@pytest.fixture
def shared_prefect_api(
    prefect_home: Path, shared_prefect_server: PrefectServer, monkeypatch: pytest.MonkeyPatch
) -> PrefectServer:
    """`lume-operator run` (and Prefect's client) in this test use the shared server."""
    monkeypatch.setenv("PREFECT_API_URL", shared_prefect_server.api_url)
    return shared_prefect_server


@pytest.fixture(autouse=True, scope="session")
def _stop_ephemeral_prefect():
    """Stop the server Prefect starts by itself in-process, before pytest closes its output."""
    yield
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    if server.running:
        server.stop()
