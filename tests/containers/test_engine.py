"""The harness's Docker Engine and images: isolated, shared between sessions, cached by content."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BUILD_TIMEOUT, _unavailable
from tests.containers import images
from tests.containers.engine import DockerEngine, acquire, release

ROOT = Path(__file__).resolve().parents[2]


def test_engine_is_our_own_and_touches_no_network(docker_engine: DockerEngine) -> None:
    client = docker_engine.client
    info = client.info()
    assert info["DockerRootDir"] == str(docker_engine.root)
    assert docker_engine.socket_path.is_socket()
    # --bridge=none: no bridge network (so no iptables rules); containers use the host's.
    assert {n.name for n in client.networks.list()} <= {"host", "none"}
    import docker

    over_tcp = docker.DockerClient(base_url=docker_engine.tcp_host)
    assert over_tcp.info()["ID"] == info["ID"]
    assert docker_engine.tcp_host.startswith("tcp://127.0.0.1:")


def test_a_second_session_reuses_the_engine_and_leaves_it_running(
    docker_engine: DockerEngine,
) -> None:
    """Another pytest session (a process) gets the same engine and, leaving while this one
    still holds its lease, does not stop it; a second lease in this process is the same."""
    code = (
        "from tests.containers.engine import acquire, release\n"
        "e = acquire(); print(e.pid, e.tcp_port); print(release(e))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "operator")])}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True
    ).stdout.split()
    assert out == [str(docker_engine.pid), str(docker_engine.tcp_port), "False"]
    assert docker_engine.healthy()
    again = acquire(docker_engine.root)
    assert again.pid == docker_engine.pid and again.lease != docker_engine.lease
    assert release(again) is False  # the fixture's lease still holds it
    assert docker_engine.healthy()


@pytest.mark.unit
def test_no_engine_fails_in_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="(?s)dockerd exited.*CI: container tests must"):
        _unavailable("no Docker Engine for the container tests: dockerd exited")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="dockerd exited"):
        _unavailable("no Docker Engine for the container tests: dockerd exited")


def test_images_are_cached_by_content(
    docker_engine: DockerEngine, examples_image: str, request: pytest.FixtureRequest
) -> None:
    """Built once (by the fixture): asked again, nothing is built; each key changes with what
    went into its image. A test that may build them has time for it."""
    assert request.node.get_closest_marker("timeout").args == (BUILD_TIMEOUT,)
    built = images.ensure_examples(docker_engine)
    assert built.tag == examples_image
    assert set(built.timings().values()) == {0.0}, built.timings()
    tags = list(built.timings())
    assert [t.split(":")[0] for t in tags] == [
        "lume-test-base",
        "lume-test-python",
        "lume-operator",
        "lume-examples",
    ]
    image = docker_engine.client.images.get(examples_image)
    assert image.labels[images.KEY_LABEL] == examples_image.split(":")[1]
    operator = tags[2]
    assert images.examples_key(operator) == examples_image.split(":")[1]
    assert images.examples_key(operator + "x") != images.examples_key(operator)


def test_examples_image_runs_flows_as_the_operator_image_would(
    docker_engine: DockerEngine, examples_image: str
) -> None:
    """The image a LumeFlow names has the examples and everything their flows import; it runs
    as its non-root user; Debian's Python 3.11.2 passes `pip check` (async-timeout pinned)."""
    script = (
        "import os, h5py, numpy, lume.serializers.hdf5, prefect, lume_operator.results;"
        "print(os.getuid(), sorted(os.listdir('/opt/examples')))"
    )
    out = docker_engine.client.containers.run(
        examples_image,
        entrypoint=["sh", "-c", f'python -c "{script}" && pip check'],
        network_mode="none",
        remove=True,
    ).decode()
    assert out.splitlines()[0] == "10001 ['beam', 'legacy', 'pipeline']"
    assert "No broken requirements found." in out
    # A worker's command (`prefect flow-run execute`) runs as given: no operator entrypoint.
    config = docker_engine.client.images.get(examples_image).attrs["Config"]
    assert not config["Entrypoint"], config["Entrypoint"]
