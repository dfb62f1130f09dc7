"""`lume-operator run`: real flows on a real Prefect server (embedded, or one already running)
through a real process worker."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from lume_operator.results import load_file

from .conftest import EXAMPLES, run_cli


def statuses(path: Path) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc["status"] for doc in yaml.safe_load_all(path.read_text())}


@pytest.mark.prefect
def test_example_runs_and_its_results_load_back(prefect_home, tmp_path):
    status_file = tmp_path / "status.yaml"
    result = run_cli(
        "run",
        "-f",
        str(EXAMPLES / "beam"),
        "--status-out",
        str(status_file),
        "--results-dir",
        str(tmp_path / "results"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(embedded server)" in result.stdout  # the README's command, as on a laptop
    assert "flow run" in result.stdout and "is Completed" in result.stdout
    status = statuses(status_file)["beam-stats"]
    assert status["phase"] == "Completed"
    assert (
        status["conditions"][0]["type"] == "Ready" and status["conditions"][0]["status"] == "True"
    )
    assert status["lastRun"]["stateType"] == "COMPLETED" and status["deploymentId"]
    results = {r["name"]: r for r in status["results"]}
    assert set(results) == {"beam", "report", "emittance"}
    beam_path = results["beam"]["location"]
    assert beam_path.endswith(".h5") and results["beam"]["type"] == "HDF5File"
    assert results["report"]["location"].endswith(".txt")
    assert beam_path in result.stdout  # printed for the user
    beam = load_file(
        {"filename": beam_path, "filesystem_identifier": "local", "file_type_string": "HDF5File"}
    ).read()
    assert beam["particles"]["x"].shape == (200_000,)
    # The flow really computed: the recorded emittance matches the particles it saved.
    x, px = beam["particles"]["x"], beam["particles"]["px"]
    x, px = x - x.mean(), px - px.mean()
    emittance = np.sqrt(np.mean(x * x) * np.mean(px * px) - np.mean(x * px) ** 2)
    assert beam["stats"]["emittance"] == pytest.approx(emittance)
    report = load_file(
        {
            "filename": results["report"]["location"],
            "filesystem_identifier": "local",
            "file_type_string": "TextFile",
        }
    ).read()
    assert report.startswith("particles: 200000\n") and "emittance" in report


PROJECT_FLOWS = """
from prefect import flow
from lume_operator.results import TextFile, result_path


@flow
def ok(n: int = 1) -> dict:
    f = TextFile(filename=result_path("ok.txt"))
    f.write("ok " * n)
    return {"out": f.description(), "n": n}


@flow
def boom(n: int = 1) -> dict:
    raise ValueError(f"n={n} is out of range")


@flow
def lost() -> dict:
    return {"out": {"filename": "/nonexistent/lost.h5", "filesystem_identifier": "local",
                    "file_type_string": "HDF5File"}}


@flow
def elsewhere() -> dict:
    return {"out": {"filename": "/x.h5", "filesystem_identifier": "nfs",
                    "file_type_string": "HDF5File"}}


@flow
def strange() -> dict:
    return {"out": {"filename": "/x.nc", "filesystem_identifier": "local",
                    "file_type_string": "NetCDFFile"}}
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


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "flows.py").write_text(PROJECT_FLOWS)
    (tmp_path / "backend.yaml").write_text(
        "apiVersion: lume.dev/v1alpha1\nkind: SchedulingBackend\nmetadata: {name: local}\n"
        "spec: {type: process}\n"
    )
    return tmp_path


@pytest.mark.prefect
def test_failures_are_reported_per_flow(shared_prefect_api, project):
    """One run of five flows: each failure names its cause; the good flow still completes.

    On a Prefect server already running (PREFECT_API_URL), as with `prefect server start`."""
    (project / "flows.yaml").write_text(
        "---\n".join(
            [
                lumeflow("ok", "ok", "  parameters: {n: 3}\n"),
                lumeflow("boom", "boom", "  parameters: {n: 7}\n"),
                lumeflow("lost", "lost"),
                lumeflow("elsewhere", "elsewhere"),
                lumeflow("strange", "strange"),
            ]
        )
    )
    status_file = project / "status.yaml"
    result = run_cli(
        "run",
        "-f",
        str(project),
        "--status-out",
        str(status_file),
        "--results-dir",
        str(project / "results"),
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"Prefect API: {shared_prefect_api.api_url}\n" in result.stdout  # not embedded
    # The failing flow's own traceback is streamed from its run; none comes from lume-operator.
    assert "lume_operator/local" not in result.stdout + result.stderr
    assert "lume_operator/cli" not in result.stdout + result.stderr
    found = statuses(status_file)
    assert found["ok"]["phase"] == "Completed"
    assert found["ok"]["results"][0]["location"].endswith("ok.txt")
    # Undeclared results: every File the flow returns, and only those.
    assert {r["name"]: r["type"] for r in found["ok"]["results"]} == {"out": "TextFile"}
    assert found["boom"]["phase"] == "Failed"
    assert "ValueError: n=7 is out of range" in found["boom"]["lastRun"]["message"]
    assert "n=7 is out of range" in result.stdout
    assert found["lost"]["phase"] == "Failed"
    assert found["lost"]["conditions"][0]["message"] == (
        "result 'out': file '/nonexistent/lost.h5' (filesystem 'local') does not exist"
    )
    assert "unknown filesystem identifier 'nfs'" in found["elsewhere"]["conditions"][0]["message"]
    assert "unknown file type 'NetCDFFile'" in found["strange"]["conditions"][0]["message"]


@pytest.mark.parametrize(
    ("flow", "expected"),
    [
        (
            lumeflow("p", "ok", "  parameters: {n: many}\n"),
            "spec.parameters.n: 'many' is not of type 'integer'",
        ),
        (
            lumeflow("p", "ok", "  parameters: {m: 1}\n"),
            "spec.parameters.m: flow 'ok' takes no parameter 'm' (it takes: n)",
        ),
        (lumeflow("p", "nothere"), "spec.entrypoint: function 'nothere' not found in"),
        (
            lumeflow("p", "ok").replace("flows.py", "missing.py"),
            "spec.entrypoint: file 'missing.py' not found in project directory",
        ),
        (
            lumeflow("p", "ok").replace("{name: local}", "{name: cluster}"),
            "spec.backendRef.name: SchedulingBackend 'cluster' is not in the manifests given",
        ),
        (
            lumeflow("p", "ok", "  labels: [gpu]\n"),
            "spec.labels[0]: 'gpu' is not a label of backend 'local'",
        ),
        (
            lumeflow("p", "ok", "  runConfig: {memoryLimit: 2 gigs}\n"),
            "spec.runConfig.memoryLimit: '2 gigs' is not a Kubernetes quantity",
        ),
    ],
)
def test_bad_manifests_stop_before_anything_runs(prefect_home, project, flow, expected):
    (project / "flows.yaml").write_text(flow)
    result = run_cli("run", "-f", str(project), "--results-dir", str(project / "results"))
    assert result.returncode == 1
    assert expected in result.stdout, result.stdout
    assert "nothing was run" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert not (project / "results").exists()
    assert not list(prefect_home.iterdir())  # Prefect was never started


def test_validate_cli_reports_every_problem(tmp_path):
    (tmp_path / "bad.yaml").write_text(
        textwrap.dedent("""\
        apiVersion: lume.dev/v1alpha1
        kind: SchedulingBackend
        metadata: {name: b}
        spec: {type: slurm}
        ---
        apiVersion: lume.dev/v1alpha1
        kind: LumeFlow
        metadata: {name: f}
        spec:
          backendRef: {name: b}
          runConfig: {memoryLimit: 2 gigs}
        """)
    )
    result = run_cli("validate", "-f", str(tmp_path))
    assert result.returncode == 1
    assert "(SchedulingBackend b): spec.type: 'slurm' is not one of" in result.stdout
    assert "(LumeFlow f): spec.entrypoint: required field is missing" in result.stdout
    assert (
        "(LumeFlow f): spec.runConfig.memoryLimit: '2 gigs' is not a Kubernetes quantity"
        in result.stdout
    )
    assert "3 problem(s)" in result.stdout
    assert "Traceback" not in result.stderr


def test_validate_cli_accepts_the_examples():
    result = run_cli("validate", "-f", str(EXAMPLES))
    assert result.returncode == 0, result.stdout
    assert "resource(s) valid" in result.stdout


def test_missing_manifest_path(tmp_path):
    result = run_cli("validate", "-f", str(tmp_path / "nope.yaml"))
    assert result.returncode == 1
    assert "nope.yaml: no such file or directory" in result.stdout
