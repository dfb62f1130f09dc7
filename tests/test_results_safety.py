"""Stored data is data: a result written by another serializer is refused, never unpickled.

A flow that returns an object whose `__reduce__` runs a command, persisted with Prefect's
pickle serializer, is the attack: whoever deserializes it (the operator, with its cluster-wide
rights, or a user's `results get`) runs the command.
"""

from __future__ import annotations

import json
import pickle
import textwrap
from pathlib import Path

import pytest
import yaml

from lume_operator.prefect.records import ResultRefused, json_result

from .conftest import run_cli

MARKER = "lume-pickle-ran"

FLOWS = f"""
import os
from pathlib import Path

from prefect import flow


class Payload:
    def __reduce__(self):
        # Unpickling this writes the marker file: proof that a reader ran stored code.
        return (Path.touch, (Path(os.environ["LUME_MARKER_DIR"]) / "{MARKER}",))


@flow(result_serializer="pickle")
def crafted() -> object:
    return Payload()
"""


class _Payload:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


@pytest.mark.unit
def test_a_pickled_record_is_refused_without_running_it(tmp_path):
    marker = tmp_path / MARKER
    record = {
        "metadata": {"storage_key": "k", "serializer": {"type": "pickle"}},
        "result": pickle.dumps(_Payload(marker)).hex(),
    }
    with pytest.raises(ResultRefused, match="stored with the 'pickle' serializer"):
        json_result(json.dumps(record).encode(), "the result of flow run x")
    assert not marker.exists()


@pytest.mark.unit
def test_a_json_record_is_read_without_importing_what_it_names():
    # Prefect's JSON decoder imports the class a value names under "__class__"; ours leaves
    # it as data.
    value = {"__class__": "os.system", "data": "true"}
    record = {
        "metadata": {"storage_key": "k", "serializer": {"type": "json"}},
        "result": json.dumps({"x": value}),
    }
    assert json_result(json.dumps(record).encode(), "w") == {"x": value}
    with pytest.raises(ResultRefused, match="is not JSON"):
        json_result(b"\x80\x04garbage", "w")


@pytest.mark.prefect
def test_a_pickled_flow_result_is_refused_and_its_payload_never_runs(
    shared_prefect_api, tmp_path, monkeypatch
):
    project = tmp_path / "project"
    project.mkdir()
    (project / "flows.py").write_text(FLOWS)
    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setenv("LUME_MARKER_DIR", str(markers))
    (tmp_path / "manifests.yaml").write_text(
        textwrap.dedent("""\
        apiVersion: lume.dev/v1alpha1
        kind: SchedulingBackend
        metadata: {name: local}
        spec:
          type: process
          runConfig: {env: {PREFECT_RESULTS_DEFAULT_SERIALIZER: pickle}}
        ---
        apiVersion: lume.dev/v1alpha1
        kind: LumeFlow
        metadata: {name: crafted}
        spec:
          backendRef: {name: local}
          entrypoint: flows.py:crafted
          source: {path: project}
        """)
    )
    status_file = tmp_path / "status.yaml"
    result = run_cli(
        "run",
        "-f",
        str(tmp_path / "manifests.yaml"),
        "--results-dir",
        str(tmp_path / "results"),
        "--status-out",
        str(status_file),
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "stored with the 'pickle' serializer" in output, output
    assert "never unpickles" in output
    (document,) = yaml.safe_load_all(status_file.read_text())
    ready = next(c for c in document["status"]["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "ResultsInvalid" and "pickle" in ready["message"]
    assert list(markers.iterdir()) == [], "the pickled payload ran"


@pytest.mark.unit
def test_a_custom_file_type_named_in_a_result_is_not_imported(tmp_path, monkeypatch):
    """Checking a completed run's results reads descriptions as data: the module a
    `File[module:Serializer]` names is not imported (its top-level code would run in the
    operator)."""
    from lume_operator.api.flow import ResultSpec
    from lume_operator.reconcile.flowrun import result_statuses

    marker = tmp_path / "imported"
    (tmp_path / "evil_serializer.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "data.bin"
    data.write_text("x")
    description = {
        "filename": str(data),
        "filesystem_identifier": "local",
        "file_type_string": "File[evil_serializer:Serializer]",
    }
    (status,) = result_statuses({"out": description}, [ResultSpec(name="out")], None)
    assert status.type == "File[evil_serializer:Serializer]" and status.location == str(data)
    assert not marker.exists(), "the module a stored description names was imported"
