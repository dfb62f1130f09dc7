"""`lume-operator results list|show|get` on the status file of a real local run.

One FlowOfFlows run (tests/data/fof/db.yaml: a DB document in step t, a TextFile in step r, the
child reading the parent's document through a `db` mapping) is shared by the module, since
running it costs most of a minute; each test only reads it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from subprocess import CompletedProcess

import numpy as np
import pytest
import yaml

from lume_operator.results import HDF5File
from tests.k8s.prefect_server import PrefectServer

from .conftest import emptied, run_cli

DATA = Path(__file__).parent / "data" / "fof"


@dataclass(frozen=True)
class LocalRun:
    root: Path  # the run's cwd: lume-results/status.yaml is the default status file there
    status_file: Path
    steps: dict[str, dict]


@pytest.fixture(scope="module")
def local_run(
    tmp_path_factory: pytest.TempPathFactory, _session_prefect_server: PrefectServer
) -> Iterator[LocalRun]:
    """The via-db FlowOfFlows, run once through `lume-operator run --status-out`.

    Module-scoped, so it sets up what the function-scoped `shared_prefect_api` fixture does
    itself: a private Prefect home, the session's Prefect server (emptied) as PREFECT_API_URL.
    """
    root = tmp_path_factory.mktemp("results-cli")
    home = root / "prefect-home"
    home.mkdir()
    shutil.copytree(DATA, root / "project")
    status_file = root / "lume-results" / "status.yaml"
    server = emptied(_session_prefect_server)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PREFECT_HOME", str(home))
        patch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        patch.setenv("PREFECT_API_URL", server.api_url)
        patch.delenv("LUME_RESULT_STORE_URL", raising=False)
        result = run_cli(
            "run",
            *[
                arg
                for name in ("backend", "flows", "record", "db")
                for arg in ("-f", str(root / "project" / f"{name}.yaml"))
            ],
            "--status-out",
            str(status_file),
            "--results-dir",
            str(root / "lume-results"),
            "--timeout",
            "400",
            cwd=root,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        [document] = yaml.safe_load_all(status_file.read_text())
        steps = {step["name"]: step for step in document["status"]["steps"]}
        yield LocalRun(root, status_file, steps)


def results(*args: str, cwd: Path, status: Path | None = None):
    where = ["--status", str(status)] if status is not None else []
    return run_cli("results", *args, *where, cwd=cwd)


def side_by_side(
    *commands: tuple[str, ...], cwd: Path, status: Path | None
) -> list[CompletedProcess[str]]:
    """Independent `results` commands, each its own process as users run it, side by side:
    each spends seconds importing."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda args: results(*args, cwd=cwd, status=status), commands))


def ok(result) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def error(result) -> str:
    """The one-line message of a failed command."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    message = result.stderr.strip()
    assert message.startswith("error "), message
    return " ".join(message.split())  # rich may wrap long lines


@pytest.mark.prefect
def test_a_db_mapping_reads_the_parents_stored_document(local_run):
    steps = local_run.steps
    [summary] = steps["t"]["results"]
    assert summary["name"] == "summary"
    assert summary["type"] == "DBResult" and "results.sqlite#" in summary["location"]
    # The store beside the run's results holds the document; the child got stats.total.
    assert (local_run.root / "lume-results" / "results.sqlite").exists()
    assert Path(steps["r"]["results"][0]["location"]).read_text() == "70\n"


@pytest.mark.prefect
def test_list_shows_each_steps_results_from_the_default_status_file(local_run):
    report = local_run.steps["r"]["results"][0]
    summary = local_run.steps["t"]["results"][0]
    table = ok(results("list", "fof/via-db", cwd=local_run.root))
    assert "FlowOfFlows default/via-db" in table
    lines = {line.split()[0]: line.split() for line in table.splitlines() if line.strip()}
    assert lines["t"][1:] == ["summary", "DBResult", summary["location"]]
    assert lines["r"][1:] == ["report", "TextFile", report["location"]]
    listed = yaml.safe_load(
        ok(results("list", "flowofflows/via-db", "-o", "yaml", cwd=local_run.root))
    )
    assert listed == [{"step": "t", **summary}, {"step": "r", **report}]
    as_json = ok(
        results(
            "list", "fof/via-db", "-o", "json", cwd=local_run.root, status=local_run.status_file
        )
    )
    assert json.loads(as_json) == listed


@pytest.mark.prefect
def test_a_flow_run_id_selects_the_step_or_the_whole(local_run, tmp_path):
    step_run = local_run.steps["t"]["run"]["id"]
    parent_run = yaml.safe_load(local_run.status_file.read_text())["status"]["run"]["id"]
    by_step, by_parent, outputs = side_by_side(
        ("list", step_run, "-o", "yaml"),
        ("list", parent_run, "-o", "yaml"),
        # By the step's run id, the result's own name is enough.
        ("get", step_run, "summary"),
        cwd=tmp_path,
        status=local_run.status_file,
    )
    listed = yaml.safe_load(ok(by_step))
    assert [(item["step"], item["name"]) for item in listed] == [("t", "summary")]
    listed = yaml.safe_load(ok(by_parent))
    assert [item["name"] for item in listed] == ["summary", "report"]
    assert yaml.safe_load(ok(outputs)) == {"stats": {"total": 70, "items": [7]}}


@pytest.mark.prefect
def test_show_gives_where_a_result_is_and_the_documents_metadata(local_run, tmp_path):
    report, summary = side_by_side(
        ("show", "fof/via-db", "r/report"),
        ("show", "fof/via-db", "t/summary"),
        cwd=tmp_path,
        status=local_run.status_file,
    )
    shown = yaml.safe_load(ok(report))
    location = local_run.steps["r"]["results"][0]["location"]
    assert shown["type"] == "TextFile" and shown["filesystem"] == "local"
    assert shown["path"] == location and shown["exists"] is True and shown["size"] == 3
    shown = yaml.safe_load(ok(summary))
    store, document_id = local_run.steps["t"]["results"][0]["location"].rsplit("#", 1)
    assert shown["store"] == store and shown["id"] == document_id
    document = shown["document"]
    assert document["flow"] == "tally"
    assert document["runId"] == local_run.steps["t"]["run"]["id"]
    assert document["inputs"] == {"value": 7} and document["created"]
    assert "outputs" not in document and "stats" not in json.dumps(shown)


@pytest.mark.prefect
def test_get_copies_a_file_result_and_refuses_to_overwrite(local_run, tmp_path):
    source = Path(local_run.steps["r"]["results"][0]["location"])
    result = results("get", "fof/via-db", "report", cwd=tmp_path, status=local_run.status_file)
    ok(result)
    copied = tmp_path / "value.txt"
    assert copied.read_bytes() == source.read_bytes() == b"70\n"
    assert str(copied) in " ".join(result.stderr.split())
    copied.write_text("changed\n")
    again = error(
        results("get", "fof/via-db", "report", cwd=tmp_path, status=local_run.status_file)
    )
    assert f"'{copied}' exists; pass --force to overwrite it" in again
    assert copied.read_text() == "changed\n"
    ok(
        results(
            "get", "fof/via-db", "report", "--force", cwd=tmp_path, status=local_run.status_file
        )
    )
    assert copied.read_bytes() == b"70\n"
    (tmp_path / "out").mkdir()
    ok(
        results(
            "get", "fof/via-db", "r/report", "-o", "out", cwd=tmp_path, status=local_run.status_file
        )
    )
    assert (tmp_path / "out" / "value.txt").read_bytes() == b"70\n"


@pytest.mark.prefect
def test_get_prints_a_db_documents_outputs_as_yaml_or_json(local_run, tmp_path):
    as_yaml, as_json = side_by_side(
        ("get", "fof/via-db", "t/summary"),
        ("get", "fof/via-db", "summary", "--format", "json"),
        cwd=tmp_path,
        status=local_run.status_file,
    )
    printed = ok(as_yaml)
    assert printed.startswith("stats:\n  total: 70\n")
    assert yaml.safe_load(printed) == {"stats": {"total": 70, "items": [7]}}
    assert json.loads(ok(as_json)) == {"stats": {"total": 70, "items": [7]}}
    # Reading the store neither creates ./results nor an empty database anywhere.
    assert sorted(path.name for path in tmp_path.iterdir()) == []


@pytest.mark.prefect
def test_every_failure_is_one_line_naming_what_is_wrong(local_run, tmp_path):
    status = local_run.status_file
    missing = tmp_path / "nowhere.yaml"
    # Status pointing where nothing is: a moved file, a deleted document, a store that is gone,
    # a store whose file was deleted.
    text = status.read_text()
    store, document_id = local_run.steps["t"]["results"][0]["location"].rsplit("#", 1)
    report = local_run.steps["r"]["results"][0]["location"]
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        text.replace(report, str(tmp_path / "moved.txt")).replace(document_id, "no-such-id")
    )
    gone = tmp_path / "gone.yaml"
    gone.write_text(text.replace(store, "sqlite:////nonexistent-dir/results.sqlite"))
    deleted = tmp_path / "deleted.yaml"
    deleted.write_text(text.replace(store, f"sqlite:///{tmp_path}/deleted.sqlite"))
    unknown_run = "00000000-0000-0000-0000-000000000000"
    cases = [
        (("list", "flow/via-db"), status, "unknown target 'flow/via-db'"),
        (("list", "fof/other"), status, f"no FlowOfFlows 'other' in status file '{status}'"),
        (("list", "lf/via-db"), status, "(there: FlowOfFlows default/via-db)"),
        (
            ("get", "fof/via-db", "nope"),
            status,
            "no result 'nope' in FlowOfFlows default/via-db (its results: t/summary, r/report)",
        ),
        (("list", unknown_run), status, f"flow run {unknown_run} is in no status"),
        (("list", "fof/via-db"), missing, f"status file '{missing}' does not exist"),
        # No status file given and none at the default place.
        (("list", "fof/via-db"), None, "status file 'lume-results/status.yaml' does not exist"),
        (
            ("get", "fof/via-db", "report"),
            broken,
            f"result 'r/report': file '{tmp_path / 'moved.txt'}' (filesystem 'local') "
            "does not exist",
        ),
        (
            ("get", "fof/via-db", "summary"),
            broken,
            f"no result document with id 'no-such-id' in result store {store}",
        ),
        (
            ("show", "fof/via-db", "t/summary"),
            gone,
            "cannot open result store sqlite:////nonexistent-dir/results.sqlite: "
            "directory '/nonexistent-dir' does not exist",
        ),
        (
            ("get", "fof/via-db", "t/summary"),
            deleted,
            f"cannot open result store sqlite:///{tmp_path}/deleted.sqlite: "
            f"file '{tmp_path}/deleted.sqlite' does not exist",
        ),
    ]
    # Each command is its own process, as users run it; side by side, since each one spends
    # seconds importing.
    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = list(
            pool.map(lambda case: results(*case[0], cwd=tmp_path, status=case[1]), cases)
        )
    for (args, _, expected), outcome in zip(cases, outcomes, strict=True):
        assert expected in error(outcome), args
    assert not (tmp_path / "deleted.sqlite").exists() and not (tmp_path / "results").exists()


def test_hdf5_results_are_checked_to_load_and_values_are_read_from_prefect(tmp_path):
    # A hand-written status (no flow run): a LumeFlow with a good and a corrupt HDF5 result,
    # and a plain value persisted as Prefect persists a flow's return value.
    from prefect.results import ResultRecord, ResultRecordMetadata
    from prefect.serializers import JSONSerializer

    record = tmp_path / "prefect-result"
    metadata = ResultRecordMetadata(storage_key=str(record), serializer=JSONSerializer())
    value = {"stats": {"emittance": 1.5e-8}, "beam": "..."}
    record.write_bytes(ResultRecord(metadata=metadata, result=value).serialize())
    good = HDF5File(filename=str(tmp_path / "beam.h5")).write({"x": np.arange(5.0)})
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"not hdf5 at all")
    status = tmp_path / "status.yaml"
    status.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "lume.dev/v1alpha1",
                "kind": "LumeFlow",
                "metadata": {"name": "beam", "namespace": "lab"},
                "status": {
                    "phase": "Completed",
                    "lastRun": {"id": "9041e088-0000-4000-8000-000000000001"},
                    "results": [
                        {
                            "name": "beam",
                            "type": "HDF5File",
                            "filesystem": "local",
                            "location": good.filename,
                        },
                        {
                            "name": "stats.emittance",
                            "type": "value",
                            "location": f"{record}#stats.emittance",
                        },
                        {
                            "name": "bad",
                            "type": "HDF5File",
                            "filesystem": "local",
                            "location": str(corrupt),
                        },
                    ],
                },
            }
        )
    )
    work = tmp_path / "work"
    work.mkdir()
    copied, refused, printed, elsewhere = side_by_side(
        ("get", "9041e088-0000-4000-8000-000000000001", "beam"),
        ("get", "lf/beam", "bad", "-o", "x.h5"),
        ("get", "lf/beam", "stats.emittance"),
        ("list", "lf/beam", "-n", "default"),
        cwd=work,
        status=status,
    )
    ok(copied)
    assert (work / "beam.h5").read_bytes() == Path(good.filename).read_bytes()
    message = error(refused)
    assert f"result 'bad': '{corrupt}' does not load as a HDF5File" in message
    assert not (work / "x.h5").exists()
    assert ok(printed) == "1.5e-08\n"
    assert "no LumeFlow 'beam' in status file" in error(elsewhere)
