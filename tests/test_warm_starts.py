"""Warm starts: flow runs forked from the fork server, on a real Prefect server, by the real
(warm) process worker, seen from Prefect's side: states, logs, exit codes, cancellation."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.k8s.prefect_server import PrefectServer

pytestmark = pytest.mark.prefect

FLOWS = """
import os, signal, subprocess, sys, time
from prefect import flow, get_run_logger
from prefect.settings import get_current_settings


@flow(name="report")
def report() -> dict:
    get_run_logger().info("hello from a warm start")
    print("printed by the flow", flush=True)
    return {
        "pid": os.getpid(), "ppid": os.getppid(), "sid": os.getsid(0), "cwd": os.getcwd(),
        "marker": os.environ.get("WARM_MARKER"), "api": get_current_settings().api.url,
        "argv0": sys.argv[0], "path0": sys.path[0],
    }


@flow(name="fails")
def fails() -> None:
    raise ValueError("the flow's own error")


@flow(name="exits")
def exits(code: int = 3) -> None:
    sys.stdout.flush()
    os._exit(code)


@flow(name="killed")
def killed() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@flow(name="sleeps")
def sleeps(pidfile: str) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    with open(pidfile, "w") as out:
        out.write(f"{os.getpid()} {child.pid}")
    time.sleep(300)
"""


# Return values are read back by the tests.
PERSIST = {"PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true"}


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    server = PrefectServer(tmp_path_factory.mktemp("warm-prefect")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def api(prefect_server: PrefectServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The module's server, for this process (its settings, however early Prefect was
    imported) and for the flow-run processes (the environment)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("PREFECT_API_URL", prefect_server.api_url)
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
        yield prefect_server.api_url


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "flows.py").write_text(textwrap.dedent(FLOWS))
    return tmp_path / "project"


async def _deploy(
    client: Any,
    pool: str,
    project: Path,
    flow: str,
    env: dict[str, str],
    name: str = "warm",
    working_dir: Path | None = None,
) -> Any:
    """`working_dir`: the run's directory as a job variable alone (as lume-operator deploys a
    process run); by default the project, reached by a pull step too."""
    flow_id = await client.create_flow_from_name(flow)
    return await client.create_deployment(
        flow_id=flow_id,
        name=name,
        entrypoint=f"flows.py:{flow}",
        work_pool_name=pool,
        pull_steps=[
            {"prefect.deployments.steps.set_working_directory": {"directory": str(project)}}
        ]
        if working_dir is None
        else None,
        job_variables={"env": env, "working_dir": str(working_dir or project)},
    )


def run_flows(
    project: Path,
    runs: list[tuple[str, dict[str, Any]]],
    env: dict[str, str] | None = None,
    on_running: Any = None,
    warm: bool = True,
    working_dirs: list[Path] | None = None,
) -> tuple[list[Any], int | None]:
    """Deploy each flow, create its run, and let one warm worker execute them all.

    `working_dirs`: each run's `working_dir` job variable and no pull step (as lume-operator
    deploys a process run); by default the project with a pull step.

    Returns the final flow runs (in order) and the fork server's pid.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from lume_operator.prefect.worker import WarmProcessWorker

    pool = f"warm-{os.urandom(4).hex()}"
    result: dict[str, Any] = {}

    async def main() -> None:
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            ids = []
            for index, (flow, parameters) in enumerate(runs):
                deployment = await _deploy(
                    client,
                    pool,
                    project,
                    flow,
                    {"WARM_MARKER": "set-by-job", **PERSIST, **(env or {})},
                    name=f"warm-{index}",
                    working_dir=working_dirs[index] if working_dirs else None,
                )
                run = await client.create_flow_run_from_deployment(
                    deployment, parameters=parameters
                )
                ids.append(run.id)
            async with WarmProcessWorker(work_pool_name=pool, warm_starts=warm) as worker:
                server = worker._fork_server
                result["server_pid"] = server.process.pid if server and server.process else None
                deadline = time.monotonic() + 120
                handled = False
                while time.monotonic() < deadline:
                    await worker.get_and_submit_flow_runs()
                    flow_runs = [await client.read_flow_run(i) for i in ids]
                    if on_running and not handled:
                        handled = await on_running(client, flow_runs)
                    if all(r.state and r.state.is_final() for r in flow_runs):
                        break
                    await anyio.sleep(0.3)
            result["runs"] = [await client.read_flow_run(i) for i in ids]
            result["logs"] = {i: await _logs(client, i) for i in ids}

    anyio.run(main)
    return [Finished(run, result["logs"][run.id]) for run in result["runs"]], result["server_pid"]


class Finished:
    """A final flow run and the log lines Prefect holds for it."""

    def __init__(self, run: Any, logs: list[str]) -> None:
        self.run, self.logs = run, logs
        self.state, self.id = run.state, run.id


async def _logs(client: Any, flow_run_id: Any) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    for _ in range(20):  # logs reach the server in batches, a moment after the state
        logs = await client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
        if any("hello" in log.message or "Process exited" in log.message for log in logs):
            break
        await anyio.sleep(0.25)
    return [log.message for log in logs]


def test_a_run_starts_in_its_working_dir_and_a_missing_one_crashes_it_naming_it(api, project):
    """As lume-operator deploys a process run: its directory a job variable, no pull step."""
    missing = project / "not-in-this-image"
    (here, nowhere), _ = run_flows(
        project, [("report", {}), ("report", {})], working_dirs=[project, missing]
    )
    assert here.state.is_completed(), here.state
    value = anyio.run(here.state.aresult)
    assert value["cwd"] == str(project) and value["path0"] == str(project)
    assert not any("pull step" in line for line in here.logs), here.logs
    assert nowhere.state.type.value == "CRASHED", nowhere.state
    message = nowhere.state.message or ""
    assert f"working directory '{missing}' does not exist on this worker" in message, message


def test_a_warm_run_is_its_own_process_with_its_env_cwd_and_logs(api, project):
    [run], server_pid = run_flows(project, [("report", {})])
    assert run.state.is_completed(), run.state
    value = anyio.run(run.state.aresult)
    # Forked by the fork server: not a new interpreter started by the worker.
    assert server_pid and value["ppid"] == server_pid
    assert value["pid"] not in (os.getpid(), server_pid)
    assert value["sid"] == value["pid"]  # its own session: a group signal reaches its children
    assert value["cwd"] == str(project) and value["path0"] == str(project)
    assert value["marker"] == "set-by-job"
    assert value["api"] == api
    assert value["argv0"].endswith(os.path.join("prefect", "engine.py"))
    assert "hello from a warm start" in run.logs, run.logs


def test_failing_flow_fails_and_dying_processes_crash(api, project):
    runs, _ = run_flows(
        project, [("fails", {}), ("exits", {"code": 3}), ("killed", {}), ("report", {})]
    )
    failed, exited, killed, ok = runs
    assert failed.state.type.value == "FAILED", failed.state
    assert "the flow's own error" in failed.state.message
    assert exited.state.type.value == "CRASHED", exited.state
    assert "status code: 3" in exited.state.message
    assert killed.state.type.value == "CRASHED", killed.state
    assert "-9" in killed.state.message or "SIGKILL" in killed.state.message, killed.state.message
    assert ok.state.is_completed()  # one run's death takes no other with it


def test_cancelling_kills_the_run_and_its_children(api, project, tmp_path):
    pidfile = tmp_path / "pids"
    seen: dict[str, int] = {}

    async def cancel_once_started(client: Any, flow_runs: list[Any]) -> bool:
        from prefect.states import Cancelling

        if not pidfile.exists() or not pidfile.read_text().strip():
            return False
        engine, child = map(int, pidfile.read_text().split())
        seen.update(engine=engine, child=child)
        await client.set_flow_run_state(flow_runs[0].id, Cancelling())
        return True

    [run], _ = run_flows(
        project, [("sleeps", {"pidfile": str(pidfile)})], on_running=cancel_once_started
    )
    assert run.state.type.value == "CANCELLED", run.state
    assert seen, "the flow never started"
    for pid in seen.values():
        assert _gone(pid), f"process {pid} still running after the cancel"


def _gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie waits for its parent: still counts as gone once it is no longer running.
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z"):
                return True
        except OSError:
            return True
        time.sleep(0.2)
    return False


def test_an_interpreter_setting_it_cannot_change_starts_cold(api, project):
    """PYTHONHASHSEED is fixed when an interpreter starts: a fork cannot honour another."""
    [run], server_pid = run_flows(project, [("report", {})], env={"PYTHONHASHSEED": "123"})
    assert run.state.is_completed(), run.state
    value = anyio.run(run.state.aresult)
    assert value["ppid"] != server_pid and value["marker"] == "set-by-job"


def test_launcher_dying_kills_its_run(tmp_path):
    """SIGKILL of the launcher (a worker's last resort after a cancel's grace) takes the run
    with it: the fork server kills the run's process group when its launcher's end closes."""
    from lume_operator.prefect.forkserver import fork_server

    pidfile = tmp_path / "pid"
    script = tmp_path / "sleeper.py"
    script.write_text(f"import os, time\nopen({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
                      "time.sleep(300)\n")  # fmt: skip
    with fork_server() as server:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "lume_operator.prefect.warmstart", "sleeper"],
            cwd=tmp_path,
            env={**os.environ, **server.env},
        )
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        run_pid = int(pidfile.read_text())
        assert Path(f"/proc/{run_pid}/status").exists()
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        assert _gone(run_pid), "the run outlived its launcher"


def test_launcher_exits_as_its_run(tmp_path):
    """Exit code, and death by signal, reach the worker as they would from the run itself."""
    from lume_operator.prefect.forkserver import fork_server

    (tmp_path / "ends.py").write_text(
        "import os, signal, sys\n"
        "mode = sys.argv[1]\n"
        "print('cwd', os.getcwd(), os.environ.get('ONLY_HERE'), flush=True)\n"
        "if mode == 'signal': os.kill(os.getpid(), signal.SIGTERM)\n"
        "sys.exit(int(mode))\n"
    )
    with fork_server() as server:
        env = {**os.environ, **server.env, "ONLY_HERE": "yes"}
        launch = [sys.executable, "-m", "lume_operator.prefect.warmstart", "ends"]
        done = subprocess.run([*launch, "7"], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 7, done.stderr
        assert done.stdout.strip() == f"cwd {tmp_path} yes"
        assert "warm start" not in done.stderr  # it was not a cold fallback
        killed = subprocess.run([*launch, "signal"], cwd=tmp_path, env=env, capture_output=True)
        assert killed.returncode == -signal.SIGTERM
    # No server: a cold start, same outcome.
    cold = subprocess.run(
        [*launch, "5"],
        cwd=tmp_path,
        env={**env, "LUME_FORK_SERVER": str(tmp_path / "nothing")},
        capture_output=True,
        text=True,
    )
    assert cold.returncode == 5 and "starting a new interpreter" in cold.stderr


def test_a_warm_run_finds_prefects_client_models_built(tmp_path):
    """Pydantic builds Prefect's client models at first use; the fork server builds them once,
    so a warm run does not build FlowRun, Deployment and the rest again (a cold one does)."""
    from lume_operator.prefect.forkserver import fork_server

    (tmp_path / "models.py").write_text(
        "from prefect.client.schemas.actions import FlowRunUpdate\n"
        "from prefect.client.schemas.objects import FlowRun\n"
        "from prefect.client.schemas.responses import DeploymentResponse\n"
        "print([m.__pydantic_complete__ for m in (FlowRun, DeploymentResponse, FlowRunUpdate)])\n"
    )
    launch = [sys.executable, "-m", "lume_operator.prefect.warmstart", "models"]
    with fork_server() as server:
        warm = subprocess.run(
            launch, cwd=tmp_path, env={**os.environ, **server.env}, capture_output=True, text=True
        )
    assert warm.returncode == 0 and "warm start" not in warm.stderr, warm.stderr
    assert warm.stdout.strip() == "[True, True, True]"
    cold = subprocess.run(
        [sys.executable, "models.py"], cwd=tmp_path, capture_output=True, text=True
    )
    assert cold.stdout.strip() == "[False, False, False]", cold.stderr


HEARTBEATS = """\
import threading
from types import SimpleNamespace

from prefect import flow_engine

engine = SimpleNamespace(
    heartbeat_seconds=30,
    flow_run=None,
    logger=SimpleNamespace(debug=lambda *args, **kwargs: None),
    _build_heartbeat_event_template=lambda: ({}, []),
    _emit_flow_run_heartbeat=lambda resource, related: None,
)
with flow_engine._send_heartbeats(engine):
    pass
# Stopped either way; joined (gone) only where the engine waited for it.
print([t.is_alive() for t in threading.enumerate() if t is not threading.main_thread()])
"""


def _run_warm(directory: Path, module: str, code: str) -> subprocess.CompletedProcess[str]:
    """`code` as module `module` in `directory`, run as a warm flow run is (its launcher)."""
    from lume_operator.prefect.forkserver import fork_server

    (directory / f"{module}.py").write_text(code)
    with fork_server() as server:
        return subprocess.run(
            [sys.executable, "-m", "lume_operator.prefect.warmstart", module],
            cwd=directory,
            env={**os.environ, **server.env},
            capture_output=True,
            text=True,
        )


def test_a_warm_run_ends_without_waiting_for_prefects_heartbeat_thread(tmp_path):
    """A synchronous flow's engine joins its heartbeat thread, which sleeps in 1 s steps: the
    process (and the worker waiting for it) lingered up to 1 s after each run's final state.
    Warm runs leave the stopped thread to end with the process; cold ones are Prefect's own."""
    warm = _run_warm(tmp_path, "heartbeats", HEARTBEATS)
    assert warm.returncode == 0 and warm.stderr == "", warm.stderr
    assert warm.stdout.strip() == "[True]"
    cold = subprocess.run(
        [sys.executable, "heartbeats.py"], cwd=tmp_path, capture_output=True, text=True
    )
    assert cold.stdout.strip() == "[]", cold.stderr


FULL_COLLECTION = """
import gc

gc.collect()
print(gc.get_freeze_count(), len(gc.get_objects()))
"""


def test_a_warm_runs_full_collection_walks_only_what_the_run_made(tmp_path):
    """What a run inherits from the fork server (Prefect, imported) is frozen: a full
    collection in the run would otherwise walk all of it and write to every object's header,
    copying the server's pages into the run (27 MB more private memory per run, measured)."""
    warm = _run_warm(tmp_path, "full_collection", FULL_COLLECTION)
    assert warm.returncode == 0 and warm.stderr == "", warm.stderr
    frozen, walked = map(int, warm.stdout.split())
    assert frozen > 50_000 and walked < frozen / 10, warm.stdout


def test_a_preloaded_module_runs_warm_without_runpys_warning(tmp_path):
    """The preload imports Prefect's engine, which each warm run then runs as __main__: runpy's
    "found in sys.modules" warning is the normal case there, not a line of every run's log."""
    from lume_operator.prefect.forkserver import fork_server

    with fork_server(["json.tool"]) as server:
        done = subprocess.run(
            [sys.executable, "-m", "lume_operator.prefect.warmstart", "json.tool"],
            input='{"a": 1}',
            env={**os.environ, **server.env},
            capture_output=True,
            text=True,
        )
    assert done.returncode == 0 and done.stdout == '{\n    "a": 1\n}\n'
    assert done.stderr == ""


def test_fork_server_socket_is_private(tmp_path):
    from lume_operator.prefect.forkserver import fork_server

    with fork_server() as server:
        assert server.path is not None
        mode = os.stat(server.path).st_mode & 0o777
        assert mode == 0o600 and os.stat(os.path.dirname(server.path)).st_mode & 0o077 == 0
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(server.path)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("command", "configured", "warm"),
    [
        (None, False, ["prefect.engine"]),
        (f"{sys.executable} -m prefect.engine", True, ["prefect.engine"]),
        (f"{sys.executable} -m lume_operator.local.engine", True, ["lume_operator.local.engine"]),
        ("/usr/bin/python3.9 -m prefect.engine", True, None),  # another interpreter
        (f"{sys.executable} -m my_module", True, None),  # not the engine: run as configured
        ("bash -c 'echo hi'", True, None),
    ],
)
def test_only_engine_commands_of_this_interpreter_start_warm(command, configured, warm):
    from prefect.workers.process import ProcessJobConfiguration

    from lume_operator.prefect.worker import LAUNCHER, warm_command

    configuration = ProcessJobConfiguration(command=command)
    configuration._command_configured = configured
    got = warm_command(configuration)
    if warm is None:
        assert got is None
    else:
        assert got is not None and got.split()[1:] == ["-m", LAUNCHER, *warm]


@pytest.mark.unit
def test_preload_takes_installed_packages_never_the_projects_own(tmp_path):
    from lume_operator.local.preload import installed_imports

    (tmp_path / "helpers.py").write_text("X = 1\n")
    flow = tmp_path / "flow.py"
    flow.write_text(
        "from __future__ import annotations\n"
        "import os, json\n"
        "import numpy as np\n"
        "from prefect import flow\n"
        "from helpers import X\n"
        "from .relative import y\n"
        "def f():\n    import h5py\n"
    )
    assert installed_imports(flow, tmp_path) == ["numpy", "prefect"]


@pytest.mark.unit
def test_the_workers_base_environment_is_prefects_made_once_per_settings():
    """Prefect's settings as variables, as its process worker gives every run, but made once
    for the settings in force (again when they change), each run getting its own copy."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings
    from prefect.workers.process import ProcessJobConfiguration

    from lume_operator.prefect.worker import (
        WarmJobConfiguration,
        WarmProcessWorker,
        _SettingsEnvironment,
    )

    assert WarmProcessWorker.job_configuration is WarmJobConfiguration
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:1/api"}):
        first = WarmJobConfiguration._base_environment()
        assert first == ProcessJobConfiguration._base_environment()
        assert first["PREFECT_API_URL"] == "http://127.0.0.1:1/api"
        settings = get_current_settings()
        first["MINE"] = "changed by one run"
        again = WarmJobConfiguration._base_environment()
        assert "MINE" not in again and _SettingsEnvironment.made_for[0] is settings
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:2/api"}):
        assert WarmJobConfiguration._base_environment()["PREFECT_API_URL"].endswith(":2/api")


@pytest.mark.unit
def test_the_engine_starter_of_a_warm_run_reuses_the_settings_environment(monkeypatch):
    """Prefect's engine command starter makes the same variables again for every run it
    starts: inside a WarmProcessWorker's run it gets them made once; anywhere else (Prefect's
    own ProcessWorker in the same process) it gets the settings themselves."""
    from prefect.runner import _starter_engine
    from prefect.settings import (
        PREFECT_API_URL,
        Settings,
        get_current_settings,
        temporary_settings,
    )

    from lume_operator.prefect.worker import _IN_WARM_RUN, _starter_settings_once

    made: list[Settings] = []
    original = Settings.to_environment_variables

    def counted(self: Settings, *args: Any, **kwargs: Any) -> dict[str, str]:
        made.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Settings, "to_environment_variables", counted)
    _starter_settings_once()
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:3/api"}):
        settings = get_current_settings()
        assert _starter_engine.get_current_settings() is settings
        token = _IN_WARM_RUN.set(True)
        try:
            starter_settings = _starter_engine.get_current_settings()
            variables = [starter_settings.to_environment_variables(exclude_unset=True)]
            variables.append(starter_settings.to_environment_variables(exclude_unset=True))
            assert starter_settings.api.url == "http://127.0.0.1:3/api"
        finally:
            _IN_WARM_RUN.reset(token)
        assert variables[0] == variables[1] == original(settings, exclude_unset=True)
        assert variables[0] is not variables[1]
        assert variables[0]["PREFECT_API_URL"] == "http://127.0.0.1:3/api"
        assert made.count(settings) == 1


@pytest.mark.unit
def test_a_workers_integrations_are_found_once_per_process(monkeypatch):
    """Prefect finds the installed integrations (every distribution's metadata read, every
    Prefect collection imported) at each worker's start, while the first run waits; warm
    workers of one process find them once and each tells Prefect's server the same."""
    from prefect.workers.base import BaseWorker

    from lume_operator.prefect.worker import WarmProcessWorker

    found = BaseWorker._worker_metadata
    calls: list[object] = []

    async def counted(self: object) -> object:
        calls.append(self)
        return await found(self)

    monkeypatch.setattr(BaseWorker, "_worker_metadata", counted)
    monkeypatch.setattr(WarmProcessWorker, "_metadata", [])

    async def both() -> list[object]:
        workers = [WarmProcessWorker(work_pool_name=name) for name in ("a", "b")]
        return [await worker._worker_metadata() for worker in workers]

    first, second = anyio.run(both)
    assert len(calls) == 1 and first is second
    assert first is not None and "prefect-kubernetes" in {i.name for i in first.integrations}
