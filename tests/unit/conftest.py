"""Unit tier of the decision layer: FakePrefect behind the port, an in-memory cluster, manifests.

Every decision (`lume_operator.reconcile`) is called directly with a manifest, its typed
status, the index entries it needs and these fakes; nothing touches Kubernetes or a Prefect
server, so the whole directory runs in seconds.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from lume_operator.prefect.fake import FakePrefect
from lume_operator.prefect.port import PrefectError
from lume_operator.reconcile.outcome import Found, NameTaken
from lume_operator.settings import OperatorSettings

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NAMESPACE = "default"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "unit: fast tests of one layer, with fakes only")


# ---- fakes --------------------------------------------------------------------------------


class FakeCluster:
    """The `Cluster` a decision needs: applied objects recorded, ready replicas configurable."""

    def __init__(self, ready: int | None = 1, taken: set[str] | None = None) -> None:
        self.applied: list[dict[str, Any]] = []
        self.ready: int | None = ready
        self.asked: list[tuple[str, str]] = []
        # Names of objects that exist and belong to someone else: applying one is NameTaken.
        self.taken: set[str] = set(taken or ())

    async def apply(self, body: dict[str, Any]) -> None:
        name = body["metadata"]["name"]
        if name in self.taken:
            raise NameTaken(
                f"{body['kind']} {body['metadata'].get('namespace')}/{name} exists and is not "
                "owned by this SchedulingBackend"
            )
        self.applied.append(copy.deepcopy(body))

    async def ready_replicas(self, namespace: str, name: str) -> int | None:
        self.asked.append((namespace, name))
        return self.ready

    def kinds(self) -> list[str]:
        return [obj["kind"] for obj in self.applied]


class Connector:
    """`connect`: yields the FakePrefect, or raises `error` (e.g. PrefectNotConfigured) when
    set; records the backend each call was made for."""

    def __init__(self, prefect: FakePrefect) -> None:
        self.prefect = prefect
        self.error: PrefectError | None = None
        self.backends: list[Any] = []

    @asynccontextmanager
    async def __call__(self, backend: Any) -> AsyncIterator[FakePrefect]:
        self.backends.append(backend)
        if self.error is not None:
            raise self.error
        yield self.prefect


@pytest.fixture
def fake() -> FakePrefect:
    return FakePrefect()


@pytest.fixture
def cluster() -> FakeCluster:
    return FakeCluster()


@pytest.fixture
def connect(fake: FakePrefect) -> Connector:
    return Connector(fake)


def make_settings(default_api_url: str | None = None, **values: Any) -> OperatorSettings:
    """Settings independent of the environment. The default API URL goes in by its alias:
    `OperatorSettings(default_api_url=...)` is silently ignored (no populate_by_name)."""
    return OperatorSettings(LUME_PREFECT_API_URL=default_api_url, **values)


@pytest.fixture
def settings() -> OperatorSettings:
    return make_settings()


# ---- manifests ----------------------------------------------------------------------------


def _example(path: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((EXAMPLES / path).read_text()) if doc]


def _with_meta(doc: dict[str, Any], uid: str, generation: int) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    doc["metadata"].update(uid=uid, generation=generation)
    doc["metadata"].setdefault("namespace", NAMESPACE)
    return doc


def backend_manifest(
    *, generation: int = 1, uid: str = "uid-backend-local", **spec: Any
) -> dict[str, Any]:
    """examples/beam/backend.yaml (process, labels [cpu]) with `spec` keys replaced."""
    doc = _with_meta(_example("beam/backend.yaml")[0], uid, generation)
    doc["spec"].update(spec)
    return doc


def lumeflow_manifest(
    *,
    generation: int = 1,
    uid: str = "uid-flow-beam-stats",
    annotations: dict[str, str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """examples/beam/lumeflow.yaml (OnChange, declared results) with `spec` keys replaced."""
    doc = _with_meta(_example("beam/lumeflow.yaml")[0], uid, generation)
    doc["spec"].update(spec)
    if annotations:
        doc["metadata"]["annotations"] = dict(annotations)
    return doc


def pipeline_flows() -> dict[str, dict[str, Any]]:
    """The four LumeFlows of examples/pipeline/flows.yaml by name."""
    return {
        doc["metadata"]["name"]: _with_meta(doc, f"uid-flow-{doc['metadata']['name']}", 1)
        for doc in _example("pipeline/flows.yaml")
    }


def composition_manifest(
    *, generation: int = 1, uid: str = "uid-fof-beam-study", **spec: Any
) -> dict[str, Any]:
    """examples/pipeline/pipeline.yaml (beam -> envelope || emittance -> report)."""
    doc = _with_meta(_example("pipeline/pipeline.yaml")[0], uid, generation)
    doc["spec"].update(spec)
    return doc


def ready_backend(body: dict[str, Any] | None = None, **status: Any) -> Found:
    """A backend as the index holds it once its work pool is ready."""
    body = body or backend_manifest()
    pool = f"{body['metadata']['namespace']}-{body['metadata']['name']}"
    return Found(
        body,
        {
            "workPoolName": pool,
            "workPoolId": "pool-id",
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "Reconciled"},
                {"type": "WorkPoolReady", "status": "True", "reason": "WorkPoolReady"},
            ],
            **status,
        },
    )


def cond(status: Any, type_: str = "Ready") -> tuple[str, str]:
    """(status, reason) of a typed status's condition."""
    found = [c for c in status.conditions or [] if c.type == type_]
    assert len(found) == 1, f"{type_} in {status.conditions}"
    return found[0].status, found[0].reason


def kstatus(status: Any) -> dict[str, tuple[str, str]]:
    """{type: (status, reason)} of Ready, Reconciling and Stalled."""
    return {t: cond(status, t) for t in ("Ready", "Reconciling", "Stalled")}


def events(outcome: Any) -> list[tuple[str, str]]:
    return [(e.type, e.reason) for e in outcome.events]


@pytest.fixture(autouse=True, scope="session")
def _stop_ephemeral_prefect():
    """Overrides tests/conftest.py's: no unit test starts a Prefect server, and importing
    Prefect's server only to find none running costs ~2 s of the tier's budget."""
    yield
