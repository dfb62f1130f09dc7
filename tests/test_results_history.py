"""`results` addresses any run a LumeFlow's history keeps, by its id (issue 12)."""

from __future__ import annotations

import json

import pytest
import yaml

from .conftest import run_cli

pytestmark = pytest.mark.unit

OLD, NEW = "11111111-2222-3333-4444-555555555555", "66666666-7777-8888-9999-000000000000"


def _result(name: str) -> dict[str, str]:
    return {"name": name, "type": "TextFile", "filesystem": "local", "location": f"/r/{name}.txt"}


def test_an_older_run_is_found_by_its_id(tmp_path):
    newest = {"id": NEW, "index": 2, "stateType": "COMPLETED", "results": [_result("new")]}
    older = {"id": OLD, "index": 1, "stateType": "COMPLETED", "results": [_result("old")]}
    document = {
        "apiVersion": "lume.dev/v1alpha1",
        "kind": "LumeFlow",
        "metadata": {"name": "scan", "namespace": "default"},
        "status": {
            "phase": "Completed",
            "lastRun": newest,
            "runs": [newest, older],
            "results": [_result("new")],
        },
    }
    status = tmp_path / "status.yaml"
    status.write_text(yaml.safe_dump(document))
    found = run_cli("results", "list", OLD, "--status", str(status), "-o", "json")
    assert found.returncode == 0, found.stdout + found.stderr
    assert [r["location"] for r in json.loads(found.stdout)] == ["/r/old.txt"]
    latest = run_cli("results", "list", "lf/scan", "--status", str(status), "-o", "json")
    assert [r["location"] for r in json.loads(latest.stdout)] == ["/r/new.txt"]
    missing = run_cli("results", "list", OLD.replace("1", "9"), "--status", str(status))
    assert (
        missing.returncode == 1
        and "looked at each LumeFlow's runs" in missing.stdout + missing.stderr
    )
