"""FlowOfFlows execution: a parent flow on the real Prefect server runs each step as a child run.

The example pipeline runs on the embedded server (the README's first command); the other runs
on the session's shared server (PREFECT_API_URL), which spares each its server start.
"""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import yaml

from lume_operator.api.flowofflows import FlowOfFlows
from lume_operator.flows.composition import MappingError, index_into
from lume_operator.flows.convert import load_manifests as load
from lume_operator.flows.plan import plan_steps, step_flows, steps_with_mapped_tasks
from lume_operator.results import load_file

from .conftest import EXAMPLES, run_cli

DATA = Path(__file__).parent / "data" / "fof"


def documents(path: Path) -> dict[tuple[str, str], dict]:
    return {
        (doc["kind"], doc["metadata"]["name"]): doc["status"]
        for doc in yaml.safe_load_all(path.read_text())
    }


def run_files(tmp_path: Path, *paths: Path) -> tuple[object, dict[tuple[str, str], dict]]:
    status_file = tmp_path / "status.yaml"
    result = run_cli(
        "run",
        *[arg for path in paths for arg in ("-f", str(path))],
        "--status-out",
        str(status_file),
        "--results-dir",
        str(tmp_path / "results"),
        "--timeout",
        "400",
    )
    assert status_file.exists(), result.stdout + result.stderr
    return result, documents(status_file)


def when(text: str) -> datetime:
    return datetime.fromisoformat(text)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    target = tmp_path / "project"
    shutil.copytree(DATA, target)
    return target


@pytest.mark.prefect
def test_example_pipeline_runs_with_its_branches_at_the_same_time(prefect_home, tmp_path):
    # The example as it is, but with the branches given enough work (several seconds each) that
    # their overlap does not hang on how fast two processes start on a busy 2-core machine.
    pipeline = tmp_path / "pipeline"
    shutil.copytree(EXAMPLES / "pipeline", pipeline)
    manifest = yaml.safe_load((pipeline / "pipeline.yaml").read_text())
    steps_spec = {step["name"]: step for step in manifest["spec"]["steps"]}
    steps_spec["envelope"]["parameters"]["n_points"] = 4000
    steps_spec["emittance"]["parameters"] = {"n_resamples": 600}
    (pipeline / "pipeline.yaml").write_text(yaml.safe_dump(manifest))
    result, status = run_files(tmp_path, EXAMPLES / "beam" / "backend.yaml", pipeline)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(embedded server)" in result.stdout  # the README's first command, as on a laptop
    fof = status[("FlowOfFlows", "beam-study")]
    assert fof["phase"] == "Completed" and fof["run"]["stateType"] == "COMPLETED"
    steps = {step["name"]: step for step in fof["steps"]}
    assert {name: step["phase"] for name, step in steps.items()} == dict.fromkeys(
        ["beam", "envelope", "emittance", "report"], "Completed"
    )
    # Live progress, per step, as it happened.
    for name in steps:
        assert f"default/beam-study/{name}: flow run" in result.stdout
    # Prefect's own start and end times: the two branches overlapped, and ran after their
    # parent and before the join.
    times = {
        name: (when(step["run"]["startTime"]), when(step["run"]["endTime"]))
        for name, step in steps.items()
    }
    envelope, emittance = times["envelope"], times["emittance"]
    assert envelope[0] < emittance[1] and emittance[0] < envelope[1], times
    assert times["beam"][1] <= min(envelope[0], emittance[0])
    assert times["report"][0] >= max(envelope[1], emittance[1])
    # The results: the file mapping carried the particles, the raw mapping the emittance.
    results = {
        (name, r["name"]): r for name, step in steps.items() for r in step.get("results", [])
    }
    particles = load_file(
        {
            "filename": results[("beam", "particles")]["location"],
            "filesystem_identifier": "local",
            "file_type_string": "HDF5File",
        }
    ).read()
    x, px = particles["x"] - particles["x"].mean(), particles["px"] - particles["px"].mean()
    emittance_value = np.sqrt(np.mean(x * x) * np.mean(px * px) - np.mean(x * px) ** 2)
    report = load_file(
        {
            "filename": results[("report", "report")]["location"],
            "filesystem_identifier": "local",
            "file_type_string": "TextFile",
        }
    ).read()
    assert f"emittance: {emittance_value:.6e}" in report
    assert results[("report", "report")]["location"] in result.stdout
    envelope_file = Path(results[("envelope", "envelope")]["location"])
    assert envelope_file.exists() and envelope_file.parent.name == "envelope"
    # A plain value a step returned, read back by `results get` from the status file.
    got = run_cli(
        "results",
        "get",
        "fof/beam-study",
        "emittance/emittance",
        "--status",
        str(tmp_path / "status.yaml"),
        cwd=tmp_path,
    )
    assert got.returncode == 0, got.stderr
    assert "ResultRecord" not in got.stderr
    assert 0 < float(got.stdout) < 1


@pytest.mark.prefect
def test_a_failed_step_skips_its_dependents_and_fails_the_whole(
    shared_prefect_api, tmp_path, project
):
    result, status = run_files(
        tmp_path, project / "backend.yaml", project / "flows.yaml", project / "failing.yaml"
    )
    assert result.returncode == 1, result.stdout + result.stderr
    fof = status[("FlowOfFlows", "failing")]
    phases = {step["name"]: step["phase"] for step in fof["steps"]}
    assert phases == {
        "a": "Completed",
        "b": "Failed",
        "c": "Skipped",
        "e": "Skipped",
        "d": "Completed",
        "f": "Failed",
    }
    assert fof["phase"] == "Failed"
    ready = fof["conditions"][0]
    assert ready["status"] == "False" and ready["reason"] == "StepFailed"
    assert "step 'b'" in ready["message"] and "boom: cannot handle 3" in ready["message"]
    # An unknown parent task can only be known at run time: named with the tasks there were.
    assert "parentTask 'triple'" in ready["message"] and "double" in ready["message"]
    steps = {step["name"]: step for step in fof["steps"]}
    assert "run" not in steps["c"] and "run" not in steps["f"]
    assert steps["b"]["run"]["stateType"] == "FAILED"
    assert "boom" in steps["b"]["run"]["message"]
    # d took items[1] of a's output (4) plus its own right=10; its run was recorded as such.
    assert steps["d"]["run"]["stateType"] == "COMPLETED"
    # The summary names each step's end, and the progress lines came as it happened.
    assert "step b: Failed" in result.stdout and "step c: Skipped" in result.stdout
    assert "default/failing/c: not run: parent step 'b' did not complete" in result.stdout


@pytest.mark.prefect
def test_the_original_format_runs_as_it_is(shared_prefect_api, tmp_path, project):
    result, status = run_files(
        tmp_path,
        project / "backend.yaml",
        project / "flows.yaml",
        project / "record.yaml",
        project / "legacy.yaml",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    fof = status[("FlowOfFlows", "legacy-chain")]
    assert fof["phase"] == "Completed"
    steps = {step["name"]: step for step in fof["steps"]}
    report = steps["record"]["results"][0]["location"]
    # source doubled 5 in its task `double`; add took that task's result and added 100.
    assert Path(report).read_text() == "110\n"


# A `db` mapping (tests/data/fof/db.yaml) runs once, in test_results_cli.py, whose commands read
# what it stored.


def test_the_original_format_validates_and_graphs(project):
    result = run_cli(
        "validate",
        "-f",
        str(project / "backend.yaml"),
        "-f",
        str(project / "flows.yaml"),
        "-f",
        str(project / "record.yaml"),
        "-f",
        str(project / "legacy.yaml"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FlowOfFlows" in result.stdout or "valid" in result.stdout
    graph = run_cli("graph", "-f", str(project / "legacy.yaml"))
    assert graph.returncode == 0, graph.stdout + graph.stderr
    assert '"source" -> "add"' in graph.stdout and '"add" -> "record"' in graph.stdout


def test_a_bad_original_format_file_names_its_own_fields(tmp_path):
    bad = tmp_path / "old.yaml"
    bad.write_text(
        "name: x\ncomposing_flows:\n  - name: a\n    mapped_parameters:\n"
        "      p: {parent_flow_name: nowhere, map_type: raw}\n"
    )
    result = run_cli("validate", "-f", str(bad))
    assert result.returncode == 1
    assert "composing_flows[0].mapped_parameters.p.parent_flow_name" in result.stdout
    assert "'nowhere' is not a composing flow" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_a_step_must_supply_what_its_flow_requires(tmp_path, project):
    (project / "pipe.yaml").write_text(
        """
apiVersion: lume.dev/v1alpha1
kind: FlowOfFlows
metadata: {name: pipe, namespace: default}
spec:
  steps:
    - name: a
      flowRef: {name: source}
      parameters: {value: not-a-number}
    - name: b
      flowRef: {name: add}
"""
    )
    result = run_cli(
        "run",
        "-f",
        str(project / "backend.yaml"),
        "-f",
        str(project / "flows.yaml"),
        "-f",
        str(project / "pipe.yaml"),
    )
    assert result.returncode == 1
    out = result.stdout.replace("\n", " ")
    assert "spec.steps[0].parameters.value" in out and "is not of type 'integer'" in out
    assert "spec.steps[1]: step 'b': flow 'add' needs parameter 'left'" in out
    assert "nothing was run" in out


def fof_of(text: str) -> FlowOfFlows:
    return FlowOfFlows.model_validate(yaml.safe_load(text))


def test_plan_keys_are_stable_per_step_and_generation(project):
    manifests = load([project / "flows.yaml", project / "failing.yaml"])
    fof = manifests.compositions[0]
    flows = step_flows(fof, {f.metadata.name: f for f in manifests.flows})
    first = plan_steps(fof, flows, "uid-1")
    again = plan_steps(fof, flows, "uid-1")
    assert [s["key"] for s in first] == [s["key"] for s in again]
    assert len({s["key"] for s in first}) == len(first)
    fof.metadata.generation = 2
    assert plan_steps(fof, flows, "uid-1")[0]["key"] != first[0]["key"]
    assert plan_steps(fof, flows, "uid-2")[0]["key"] != first[0]["key"]
    by_name = {s["name"]: s for s in first}
    assert by_name["d"]["deployment"] == "add/default"
    assert by_name["d"]["parameters"] == {"right": 10}
    assert by_name["d"]["mapped"]["left"] == {
        "parent": "a",
        "task": None,
        "type": "raw",
        "index": ["items", 1],
    }
    assert steps_with_mapped_tasks(fof) == {"a"}


def test_inline_steps_become_flows_named_after_the_composition():
    fof = fof_of(
        """
apiVersion: lume.dev/v1alpha1
kind: FlowOfFlows
metadata: {name: pipe, namespace: lab, uid: u1}
spec:
  steps:
    - name: only
      flow: {backendRef: {name: local}, entrypoint: "flows.py:source"}
"""
    )
    flow = step_flows(fof, {})["only"]
    assert (flow.metadata.namespace, flow.metadata.name) == ("lab", "pipe-only")
    assert plan_steps(fof, {"only": flow}, "u1")[0]["deployment"] == "pipe-only/lab"


@pytest.mark.parametrize(
    ("value", "index", "message"),
    [
        ({"a": 1}, ["b"], "attributeIndex ['b']: no key 'b' (has 'a')"),
        (
            {"a": [1, 2]},
            ["a", 5],
            "attributeIndex ['a'][5]: index 5 is out of range (the list has 2 items)",
        ),
        ({"a": [1]}, ["a", "x"], "'x' indexes a list, which needs a number"),
        ({"a": 3}, ["a", "b"], "attributeIndex ['a']['b']: cannot index a int"),
    ],
)
def test_attribute_index_errors_name_the_step_and_key(value, index, message):
    with pytest.raises(MappingError) as error:
        index_into(value, index, "step 'c', parameter 'p'")
    assert str(error.value).startswith("step 'c', parameter 'p': ")
    assert message in str(error.value)


def test_attribute_index_resolves_keys_and_positions():
    value = {"outputs": [{"x": 1}, {"x": 2}], "1": "string key"}
    assert index_into(value, ["outputs", -1, "x"], "w") == 2
    assert index_into(value, ["outputs", "0", "x"], "w") == 1
    assert index_into(value, [1], "w") == "string key"
    assert index_into(value, [], "w") is value
