"""The CLI as a scientist meets it (issue 13), each case through `lume-operator` in a subprocess
with a real Prefect server: validate means what run means, values come back, Ctrl-C and
--timeout leave nothing running, status accumulates, the original format as it was written.

Ctrl-C runs on the embedded server, as on a laptop; the other runs use the session's shared
server (PREFECT_API_URL), as with `prefect server start`, and skip its start-up.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from tests.k8s.prefect_server import PrefectServer

from .conftest import EXAMPLES, run_cli

FLOWS = """
import os
import time

import numpy as np
from prefect import flow


@flow
def ok(n: int = 1) -> dict:
    return {"n": n}


@flow
def needs(n: int) -> dict:
    return {"n": n}


@flow
def sleepy(seconds: float = 300) -> dict:
    with open(os.environ["LUME_RESULTS_DIR"] + "/pid", "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)
    return {"slept": seconds}


@flow
def arrays() -> dict:
    return {"grid": np.arange(6.0).reshape(2, 3), "peak": np.float32(1.5), "label": "beam"}


@flow
def odd() -> dict:
    return {"stats": {"seen": {1, 2}}}
"""

BACKEND = """\
apiVersion: lume.dev/v1alpha1
kind: SchedulingBackend
metadata: {name: local}
spec: {type: process}
"""


def lumeflow(name: str, function: str, extra: str = "") -> str:
    return (
        textwrap.dedent(f"""\
        apiVersion: lume.dev/v1alpha1
        kind: LumeFlow
        metadata: {{name: {name}}}
        spec:
          backendRef: {{name: local}}
          entrypoint: flows.py:{function}
          source: {{path: project}}
        """)
        + extra
    )


def composition(parameters: str) -> str:
    return textwrap.dedent(f"""\
        apiVersion: lume.dev/v1alpha1
        kind: FlowOfFlows
        metadata: {{name: pipe}}
        spec:
          steps:
            - name: first
              flowRef: {{name: needs}}
              parameters: {parameters}
        """)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "flows.py").write_text(FLOWS)
    (tmp_path / "backend.yaml").write_text(BACKEND)
    return tmp_path


def write(project: Path, *documents: str) -> Path:
    path = project / "flows.yaml"
    path.write_text("---\n".join(documents))
    return path


def statuses(path: Path) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc["status"] for doc in yaml.safe_load_all(path.read_text())}


# --- 1. validate checks what run checks ---------------------------------------------------------

CODE_CASES = [
    (lumeflow("p", "ok").replace("flows.py", "missing.py"), "spec.entrypoint: file 'missing.py'"),
    (lumeflow("p", "nothere"), "spec.entrypoint: function 'nothere' not found"),
    (lumeflow("p", "ok", "  parameters: {m: 1}\n"), "spec.parameters.m: flow 'ok' takes no"),
    (lumeflow("p", "needs"), "spec.parameters: missing required parameter 'n'"),
    (lumeflow("p", "ok", "  parameters: {n: ten}\n"), "spec.parameters.n: 'ten' is not of type"),
    (
        lumeflow("p", "ok").replace("{path: project}", "{path: elsewhere}"),
        "spec.source.path: project directory",
    ),
]
REFERENCE_CASES = [
    (
        lumeflow("p", "ok").replace("{name: local}", "{name: cluster}"),
        "spec.backendRef.name: SchedulingBackend 'cluster' is not in the manifests given",
    ),
]
STEP_CASES = [
    (
        lumeflow("needs", "needs") + "---\n" + composition("{n: ten}"),
        "spec.steps[0].parameters.n: 'ten' is not of type",
    ),
    (
        lumeflow("needs", "needs") + "---\n" + composition("{m: 1}"),
        "spec.steps[0].parameters.m: flow 'needs' takes no parameter 'm'",
    ),
]


@pytest.mark.parametrize(("flow", "expected"), CODE_CASES + REFERENCE_CASES + STEP_CASES)
def test_validate_reports_what_run_rejects(prefect_home, project, flow, expected):
    write(project, flow)
    # Two processes side by side: each spends seconds importing.
    with ThreadPoolExecutor(max_workers=2) as pool:
        checking = pool.submit(run_cli, "validate", "-f", str(project))
        ran = run_cli("run", "-f", str(project), "--results-dir", str(project / "results"))
        checked = checking.result()
    assert checked.returncode == 1 and ran.returncode == 1, checked.stdout
    assert expected in checked.stdout, checked.stdout
    assert expected in ran.stdout and "nothing was run" in ran.stdout
    # The same lines, in the same words.
    problems = [line for line in checked.stdout.splitlines() if line.startswith("error")]
    assert problems == [line for line in ran.stdout.splitlines() if line.startswith("error")]


@pytest.mark.parametrize(("flow", "expected"), CODE_CASES)
def test_validate_no_code_skips_only_the_code_checks(project, flow, expected):
    write(project, flow)
    (project / "other").mkdir()
    (project / "other" / "backend.yaml").write_text(BACKEND)
    (project / "other" / "flows.yaml").write_text(flow.replace("{name: local}", "{name: cluster}"))
    with ThreadPoolExecutor(max_workers=2) as pool:
        checking = pool.submit(run_cli, "validate", "--no-code", "-f", str(project / "other"))
        result = run_cli(
            "validate",
            "--no-code",
            "-f",
            str(project / "backend.yaml"),
            "-f",
            str(project / "flows.yaml"),
        )
        other = checking.result()
    assert result.returncode == 0, result.stdout
    assert "2 resource(s) valid" in result.stdout
    assert other.returncode == 1 and "SchedulingBackend 'cluster'" in other.stdout


def test_nothing_to_validate_is_an_error(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "notes.txt").write_text("hello")
    for path in (tmp_path / "empty.yaml", tmp_path / "dir"):
        result = run_cli("validate", "-f", str(path))
        assert result.returncode == 1, result.stdout
        assert "no lume.dev manifests here" in result.stdout


# --- 3. interrupts and timeouts -----------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _prefect_state(results: Path, run_id: str) -> str:
    """The run's state type in the Prefect database under the results directory."""
    with sqlite3.connect(results / "prefect" / "prefect.db") as db:
        rows = db.execute(
            "select state_type from flow_run where id in (?, ?)", (run_id, run_id.replace("-", ""))
        ).fetchall()
    assert rows, f"flow run {run_id} is not in the results directory's Prefect database"
    return rows[0][0]


def _isolated_env(project: Path) -> dict[str, str]:
    """No PREFECT_HOME, no PREFECT_API_URL, a fresh HOME: as a user's shell on a laptop."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "PREFECT_API_URL")}
    env["HOME"] = str(project / "home")
    (project / "home").mkdir()
    return env


@pytest.mark.prefect
def test_ctrl_c_cancels_the_run_and_leaves_nothing_behind(project):
    write(project, lumeflow("sleepy", "sleepy"))
    env = _isolated_env(project)
    results = project / "lume-results"
    process = subprocess.Popen(
        [sys.executable, "-m", "lume_operator.cli", "run", "-f", str(project)],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    started = time.monotonic()
    pid_files: list[Path] = []
    while time.monotonic() - started < 240 and not pid_files:
        pid_files = list(results.glob("default/sleepy/*/pid"))
        time.sleep(0.5)
    assert pid_files, "the flow never started"
    time.sleep(1)
    flow_pid = int(pid_files[0].read_text())
    assert _alive(flow_pid)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=180)
    assert process.returncode == 130, output
    assert "interrupted" in output
    assert "Traceback" not in output
    status = statuses(results / "status.yaml")["sleepy"]
    assert status["phase"] == "Failed"
    assert status["lastRun"]["stateType"] == "CANCELLED"
    ready = status["conditions"][0]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "False", "Interrupted")
    # Prefect's own record, in the database under the results directory, says Cancelled.
    assert _prefect_state(results, status["lastRun"]["id"]) == "CANCELLED"
    assert not _alive(flow_pid)
    assert not (project / "home" / ".prefect").exists()
    assert (results / "prefect.log").is_file()


def _run_on(server: PrefectServer, run_id: str) -> dict:
    """The flow run, as the Prefect server it ran on records it."""
    with urllib.request.urlopen(f"{server.api_url}/flow_runs/{run_id}", timeout=30) as reply:
        return json.load(reply)


def _state_on(server: PrefectServer, run_id: str) -> str:
    return _run_on(server, run_id)["state"]["type"]


@pytest.mark.prefect
def test_timeout_cancels_with_its_own_message(shared_prefect_api, project):
    write(project, lumeflow("sleepy", "sleepy"))
    result = run_cli("run", "-f", str(project), "--timeout", "5", cwd=project, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "timed out after 5 s" in result.stdout
    results = project / "lume-results"
    status = statuses(results / "status.yaml")["sleepy"]
    assert status["lastRun"]["stateType"] == "CANCELLED"
    assert status["conditions"][0]["reason"] == "Timeout"
    run = _run_on(shared_prefect_api, status["lastRun"]["id"])
    assert run["state"]["type"] == "CANCELLED"
    # The process the worker started for it (its pid recorded once started, before the flow's
    # own code: 5 s may end the run while Python still imports) is gone.
    assert run["infrastructure_pid"], run
    assert not _alive(int(run["infrastructure_pid"].rsplit(":", 1)[-1]))


@pytest.mark.prefect
def test_run_uses_the_server_the_users_prefect_profile_names(shared_prefect_server, project):
    """`prefect server start` tells users to `prefect config set PREFECT_API_URL=...`: that
    profile (in ~/.prefect) names the server to run on, though Prefect's home moves to the
    results directory."""
    write(project, lumeflow("ok", "ok", "  parameters: {n: 2}\n"))
    env = _isolated_env(project)
    profiles = project / "home" / ".prefect" / "profiles.toml"
    profiles.parent.mkdir()
    url = shared_prefect_server.api_url
    profiles.write_text(f'active = "lab"\n\n[profiles.lab]\nPREFECT_API_URL = "{url}"\n')
    result = subprocess.run(
        [sys.executable, "-m", "lume_operator.cli", "run", "-f", str(project)],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Prefect API: {url}\n" in result.stdout  # not an embedded server
    status = statuses(project / "lume-results" / "status.yaml")["ok"]
    assert _state_on(shared_prefect_server, status["lastRun"]["id"]) == "COMPLETED"
    assert sorted(p.name for p in profiles.parent.iterdir()) == ["profiles.toml"]
    assert not (project / "lume-results" / "prefect" / "prefect.db").exists()


@pytest.mark.parametrize("timeout", ["-5", "0"])
def test_invalid_timeouts_are_usage_errors(project, timeout):
    write(project, lumeflow("p", "ok"))
    result = run_cli("run", "-f", str(project), "--timeout", timeout)
    assert result.returncode == 2
    assert "--timeout" in result.stderr


# --- 2 and 4. values come back; status accumulates ---------------------------------------------


def declared(*names: str) -> str:
    """Plain values are recorded as results when declared."""
    return "  results: [" + ", ".join(f"{{name: {name}}}" for name in names) + "]\n"


@pytest.mark.prefect
def test_numpy_values_come_back_and_status_holds_every_run(shared_prefect_api, project):
    first = project / "first"
    first.mkdir()
    (first / "flows.yaml").write_text(
        "---\n".join(
            [
                BACKEND,
                lumeflow("arrays", "arrays", declared("grid", "peak")),
                lumeflow("odd", "odd"),
            ]
        ).replace("{path: project}", "{path: ../project}")
    )
    second = project / "second"
    second.mkdir()
    (second / "flows.yaml").write_text(
        "---\n".join(
            [BACKEND, lumeflow("ok", "ok", "  parameters: {n: 4}\n" + declared("n"))]
        ).replace("{path: project}", "{path: ../project}")
    )
    ran = run_cli("run", "-f", str(first), cwd=project)
    assert ran.returncode == 1, ran.stdout + ran.stderr  # `odd` fails, and says why
    assert "does not exist" not in ran.stdout
    assert "INFO" not in ran.stdout  # Prefect's lines are in the log file
    assert "prefect.log" in ran.stdout
    ran = run_cli("run", "-f", str(second), cwd=project)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    found = statuses(project / "lume-results" / "status.yaml")
    assert set(found) == {"arrays", "odd", "ok"}
    assert found["arrays"]["phase"] == "Completed" and found["ok"]["phase"] == "Completed"
    assert found["odd"]["phase"] == "Failed"
    assert found["odd"]["conditions"][0]["message"] == (
        "the flow's return value at 'stats.seen' is a set, which cannot be stored as JSON: "
        "return JSON types (dict, list, str, int, float, bool, None), numpy arrays or scalars, "
        "or a File description (File.description()) for anything else"
    )
    gets = [("lf/arrays", "grid", "--format", "json"), ("lf/arrays", "peak"), ("lf/ok", "n")]
    with ThreadPoolExecutor(max_workers=3) as pool:  # each process spends seconds importing
        grid, peak, n = pool.map(lambda args: run_cli("results", "get", *args, cwd=project), gets)
    assert grid.returncode == 0, grid.stderr
    assert yaml.safe_load(grid.stdout) == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert peak.stdout.strip() == "1.5"
    assert n.returncode == 0 and n.stdout.strip() == "4", n.stderr


# A plain value of a composition through `results get`: in test_flows_run.py, on the example
# pipeline's run there.


# --- 6. the original format ---------------------------------------------------------------------

ORIGINAL = """\
name: study
project_name: beam
composing_flows:
  - name: make-beam
    project_name: beam
  - name: beam-report
    project_name: beam
    mapped_parameters:
      particles:
        parent_flow_name: make-beam
        parent_project_name: beam
        parent_task_name: save
        map_type: file
"""


def test_original_format_keys_lume_services_ignored_are_noted(tmp_path):
    (tmp_path / "legacy").mkdir()
    (tmp_path / "legacy" / "study.yaml").write_text(ORIGINAL)
    converted = run_cli("convert", "-f", str(tmp_path / "legacy"))
    assert converted.returncode == 0, converted.stdout + converted.stderr
    assert yaml.safe_load(converted.stdout)["kind"] == "FlowOfFlows"
    assert "composing_flows[1].mapped_parameters.particles.parent_project_name" in converted.stderr
    drawn = run_cli("graph", "-f", str(tmp_path / "legacy"))
    assert '"make-beam" [label="make-beam"]' in drawn.stdout
    assert 'label="particles (file) from task save"' in drawn.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(ORIGINAL.replace("map_type: file", "map_type: pickle"))
    refused = run_cli("convert", "-f", str(bad))
    assert refused.returncode == 1
    assert "composing_flows[1].mapped_parameters.particles.map_type" in refused.stderr


def test_original_example_validates_with_a_note():
    result = run_cli(
        "validate",
        "-f",
        str(EXAMPLES / "beam" / "backend.yaml"),
        "-f",
        str(EXAMPLES / "pipeline" / "flows.yaml"),
        "-f",
        str(EXAMPLES / "legacy"),
    )
    assert result.returncode == 0, result.stdout


# --- 7. results list at 80 columns --------------------------------------------------------------


def test_results_list_keeps_paths_whole_at_80_columns(tmp_path):
    location = "/data/lume-results/default/beam-study/20260101T000000-abcdef01/beam-envelope/x.h5"
    status = {
        "apiVersion": "lume.dev/v1alpha1",
        "kind": "LumeFlow",
        "metadata": {"name": "f", "namespace": "default"},
        "status": {"results": [{"name": "beam", "type": "HDF5File", "location": location}]},
    }
    path = tmp_path / "status.yaml"
    path.write_text(yaml.safe_dump(status))
    env = {**os.environ, "COLUMNS": "80"}
    args = [sys.executable, "-m", "lume_operator.cli", "results", "list", "lf/f"]
    table = subprocess.run(
        [*args, "--status", str(path)], env=env, capture_output=True, text=True, check=True
    )
    lines = table.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), table.stdout
    row = next(line for line in lines if "HDF5File" in line)
    assert "/data/lume-results/" in row and row.rstrip().endswith("x.h5") and "…" in row
    wide = subprocess.run(
        [*args, "--status", str(path), "-o", "wide"], env=env, capture_output=True, text=True
    )
    assert location in wide.stdout
