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
import socket
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.containers.engine import DockerEngine, EngineUnavailable
from tests.k8s.prefect_server import PrefectServer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# Before Prefect is imported: a throwaway home for anything that starts an ephemeral server.
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="lume-tests-prefect-")
os.environ.pop("PREFECT_API_URL", None)
# AWS clients (s3fs, boto3) look for credentials at the EC2 metadata address when none are
# given: tests reach only loopback, and never a user's own AWS profile.
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
for _name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
    os.environ.pop(_name, None)
os.environ["AWS_CONFIG_FILE"] = os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
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


class S3:
    """moto's S3 server on loopback (the stand-in s3fs's own tests use), as a store users
    reach through an endpoint URL, with keys that tests pass only by reference."""

    access_key_id = "AKIALUMETEST0000KEY1"
    secret_access_key = "lume-test-secret-0f3c9a7d5e2b4c61"
    region = "us-east-1"

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
        )

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def get(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()


@pytest.fixture(scope="session")
def _moto() -> Iterator[str]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(_moto: str) -> S3:
    """An empty S3 store (moto's state reset) for one test."""
    urllib.request.urlopen(urllib.request.Request(f"{_moto}/moto-api/reset", method="POST"))
    return S3(_moto)


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


# ---- containers ---------------------------------------------------------------------------------


# The first test that needs an image may build them all: about 5 minutes cold on 2 cores (the
# operator image's pip install is most of it), more than the 300 s every test gets otherwise.
IMAGE_FIXTURES = frozenset({"base_image", "operator_image", "examples_image"})
BUILD_TIMEOUT = 1500


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        uses = set(getattr(item, "fixturenames", ()))
        if uses & IMAGE_FIXTURES and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(BUILD_TIMEOUT))


def _unavailable(message: str) -> None:
    """Where containers cannot run: a skip that says why, but in CI a failure, never silent."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{message}\n(CI: container tests must run, not skip)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[DockerEngine]:
    """The tests' own Docker Engine (`tests/containers/engine.py`): `.unix_host`, `.tcp_host`
    (for a worker with host networking, by DOCKER_HOST), `.client` (docker SDK). Shared with
    other pytest sessions on this machine; the last one to finish stops it."""
    from tests.containers.engine import acquire, release

    try:
        engine = acquire()
    except EngineUnavailable as error:
        _unavailable(f"no Docker Engine for the container tests: {error}")
    yield engine
    release(engine)


def _image(engine: DockerEngine, ensure_name: str) -> str:
    from tests.containers import images

    try:
        return getattr(images, ensure_name)(engine).tag
    except EngineUnavailable as error:  # a tool missing (debootstrap), not a failed build
        _unavailable(f"cannot build the test images: {error}")
        raise


@pytest.fixture(scope="session")
def base_image(docker_engine: DockerEngine) -> str:
    """`lume-test-base:<key>`: Debian with python3 (debootstrap), user root, no entrypoint."""
    return _image(docker_engine, "ensure_base")


@pytest.fixture(scope="session")
def operator_image(docker_engine: DockerEngine) -> str:
    """`lume-operator:<key>`: the project's Dockerfile built on the test engine (cached)."""
    return _image(docker_engine, "ensure_operator")


@pytest.fixture(scope="session")
def examples_image(docker_engine: DockerEngine) -> str:
    """`lume-examples:<key>`: examples/Dockerfile on the operator image, examples in
    /opt/examples (cached)."""
    return _image(docker_engine, "ensure_examples")
