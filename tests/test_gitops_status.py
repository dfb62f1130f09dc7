"""What GitOps tools read from the status the decisions write: kstatus (Flux, `kubectl wait`)
and the Argo CD health scripts (in Lua, as Argo CD runs them) agree with what happened.

Each case is produced by the real decision functions against the in-memory Prefect, not
written by hand, so a change in the status shape that hides a failure fails here.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

from lume_operator.api.flow import LumeFlowStatus
from lume_operator.prefect.fake import FakePrefect
from lume_operator.prefect.port import PrefectRejected, PrefectUnreachable
from lume_operator.reconcile.lumeflow import follow_flow, reconcile_flow
from lume_operator.reconcile.outcome import Found
from lume_operator.settings import OperatorSettings
from tests.test_argo_health import health

pytestmark = pytest.mark.unit

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "beam"
NOW = datetime(2026, 1, 1, 0, 0, 30, tzinfo=UTC)


def kstatus(manifest: dict[str, Any]) -> str:
    """The kstatus result of a custom resource with standard conditions (cli-utils' rules)."""
    status = manifest.get("status") or {}
    generation = manifest["metadata"].get("generation")
    observed = status.get("observedGeneration")
    if generation is not None and (observed is None or observed < generation):
        return "InProgress"
    conditions = {c["type"]: c["status"] for c in status.get("conditions") or []}
    if conditions.get("Reconciling") == "True":
        return "InProgress"
    if conditions.get("Stalled") == "True":
        return "Failed"
    return "Current"


def _flow(**run: Any) -> dict[str, Any]:
    body = yaml.safe_load((EXAMPLE / "lumeflow.yaml").read_text())
    body["metadata"].update(uid="uid-1", generation=1, namespace="default")
    body["spec"]["run"] = {"policy": "OnChange", **run}
    body["spec"].pop("results", None)  # the run returns plain values here
    return body


def _backend() -> Found:
    body = yaml.safe_load((EXAMPLE / "backend.yaml").read_text())
    body["metadata"].update(uid="uid-b", generation=1, namespace="default")
    ready = {"type": "WorkPoolReady", "status": "True"}
    return Found(body, {"conditions": [ready], "workPoolName": "default-local"})


async def _scenario(name: str) -> dict[str, Any]:
    """The LumeFlow manifest with the status the decisions wrote for `name`."""
    fake = FakePrefect(now=(NOW - timedelta(seconds=20)).isoformat())

    @asynccontextmanager
    async def connect(_backend: Any) -> AsyncIterator[FakePrefect]:
        yield fake

    settings = OperatorSettings()
    run = {"timeoutSeconds": 10} if name == "deadline" else {}
    run |= {"retries": 1} if name == "retrying" else {}
    body = _flow(**run)
    if name == "rejected":
        fake.failure = PrefectRejected("deployment: Prefect answered 422: bad entrypoint", 422)
    if name == "unreachable":
        fake.failure = PrefectUnreachable("ConnectError: connection refused")
    outcome = await reconcile_flow(
        body, LumeFlowStatus(), backend=_backend(), connect=connect, settings=settings
    )
    status = outcome.status
    run_id = status.last_run.id if status.last_run else None
    if run_id:
        terminal = {
            "completed": "COMPLETED",
            "failed": "FAILED",
            "retrying": "FAILED",
            "crashed": "CRASHED",
        }
        fake.set_state(run_id, "RUNNING")
        if name in terminal:
            fake.set_state(run_id, terminal[name], message="ValueError: boom")
            fake.set_result(run_id, {})
        followed = await follow_flow(body, status, backend=_backend(), connect=connect, now=NOW)
        status = followed.status if followed else status
    manifest = copy.deepcopy(body)
    manifest["status"] = status.to_wire()
    return manifest


@pytest.mark.parametrize(
    ("name", "argo", "k"),
    [
        ("completed", "Healthy", "Current"),
        ("running", "Progressing", "InProgress"),
        ("retrying", "Progressing", "InProgress"),
        ("failed", "Degraded", "Failed"),
        ("crashed", "Degraded", "Failed"),
        ("deadline", "Degraded", "Failed"),
        ("rejected", "Degraded", "Failed"),
        ("unreachable", "Progressing", "InProgress"),
    ],
)
def test_gitops_tools_see_what_happened(name, argo, k):
    manifest = anyio.run(_scenario, name)
    assert kstatus(manifest) == k, manifest["status"]
    assert health("LumeFlow", manifest)["status"] == argo, manifest["status"]
    for condition in manifest["status"]["conditions"]:
        assert condition["observedGeneration"] == 1


def test_a_new_generation_is_in_progress_until_observed():
    manifest = anyio.run(_scenario, "failed")
    manifest["metadata"]["generation"] = 2
    assert kstatus(manifest) == "InProgress"
    assert health("LumeFlow", manifest)["status"] == "Progressing"
