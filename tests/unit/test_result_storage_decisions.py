"""Decisions about result storage (issue 11, item 5): the block of an object-store backend, what
runs get (env, volumes, credentials by reference only), where the operator reads a finished
run's results, and `ResultsAvailable` when a backend has no storage anyone can read."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from lume_operator.api.backend import SchedulingBackend, SchedulingBackendStatus
from lume_operator.api.flow import LumeFlowStatus, ResultStatus
from lume_operator.api.flowofflows import FlowOfFlowsStatus
from lume_operator.backends.agent import agent_objects
from lume_operator.prefect.port import PrefectNotConfigured
from lume_operator.reconcile.backend import delete_backend, reconcile_backend
from lume_operator.reconcile.deploy import flow_deployment
from lume_operator.reconcile.flowofflows import reconcile_composition
from lume_operator.reconcile.lumeflow import follow_flow, reconcile_flow
from lume_operator.results.filesystems import MountedFilesystem, StorageUnreachableError
from lume_operator.results.storage import RunStorage, reader_storage
from tests.unit.conftest import (
    backend_manifest,
    composition_manifest,
    cond,
    events,
    lumeflow_manifest,
    pipeline_flows,
    ready_backend,
)

pytestmark = pytest.mark.unit

NOW = datetime(2026, 1, 1, 0, 0, 30, tzinfo=UTC)
S3 = {
    "objectStore": {
        "url": "s3://lume-results/beam",
        "endpointUrl": "http://minio.storage:9000",
        "region": "us-east-1",
        "credentialsSecretRef": {"name": "s3-credentials", "accessKeyIdKey": "id"},
    }
}
BLOCK = SchedulingBackend.model_validate(backend_manifest()).result_block_name


def backend_with(storage: dict[str, Any] | None, type_: str = "process") -> dict[str, Any]:
    body = backend_manifest(type=type_, resultStorage=storage)
    if storage is None:
        body["spec"].pop("resultStorage")
    if type_ != "process":
        body["spec"].pop("runConfig", None)
    return body


def secrets_in(obj: Any) -> list[str]:
    """Every plain `value` of an AWS key variable: none may exist anywhere."""
    text = json.dumps(obj)
    return [
        name for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if f'"{name}": "' in text
    ]


# ---- the backend: its block, its agent ------------------------------------------------------


@pytest.mark.asyncio
async def test_an_object_store_backend_keeps_a_block_without_credentials(
    fake, connect, cluster, settings
):
    body = backend_with(S3)
    outcome = await reconcile_backend(
        body, SchedulingBackendStatus(), connect=connect, cluster=cluster, settings=settings
    )
    assert fake.blocks == {
        BLOCK: {
            "basepath": "s3://lume-results/beam/prefect",
            "settings": {
                "endpoint_url": "http://minio.storage:9000",
                "client_kwargs": {"region_name": "us-east-1"},
            },
        }
    }
    status = outcome.status
    assert status.result_storage_block == f"remote-file-system/{BLOCK}"
    assert cond(status, "WorkPoolReady") == ("True", "WorkPoolReady")
    # A resync writes nothing.
    writes = fake.writes
    await reconcile_backend(body, status, connect=connect, cluster=cluster, settings=settings)
    assert fake.writes == writes
    # A process agent's runs inherit its environment: the keys by reference, never a value.
    deployment = cluster.applied[-1]
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e}
    assert refs["AWS_ACCESS_KEY_ID"] == {"name": "s3-credentials", "key": "id"}
    assert refs["AWS_SECRET_ACCESS_KEY"] == {
        "name": "s3-credentials",
        "key": "AWS_SECRET_ACCESS_KEY",
    }
    assert secrets_in(cluster.applied) == []

    # Storage changed to a volume: the block goes; deletion of a backend takes its block.
    volume = backend_with({"volume": {"claimName": "results", "mountPath": "/results"}})
    outcome = await reconcile_backend(
        volume, status, connect=connect, cluster=cluster, settings=settings
    )
    assert fake.blocks == {} and outcome.status.result_storage_block is None
    outcome = await reconcile_backend(
        body, SchedulingBackendStatus(), connect=connect, cluster=cluster, settings=settings
    )
    await delete_backend(body, outcome.status, connect=connect, settings=settings)
    assert fake.blocks == {} and fake.pools == {}


def test_a_process_agent_mounts_the_claim_its_runs_write_to():
    backend = SchedulingBackend.model_validate(
        backend_with({"volume": {"claimName": "results", "mountPath": "/results"}})
    )
    pod = agent_objects(backend, "http://prefect/api")[-1]["spec"]["template"]["spec"]
    assert {"name": "lume-result-storage", "persistentVolumeClaim": {"claimName": "results"}} in (
        pod["volumes"]
    )
    assert {"name": "lume-result-storage", "mountPath": "/results"} in pod["containers"][0][
        "volumeMounts"
    ]
    # A kubernetes agent gets neither: its Jobs get their own.
    k8s = SchedulingBackend.model_validate(backend_with(S3, "kubernetes"))
    pod = agent_objects(k8s, "http://prefect/api")[-1]["spec"]["template"]["spec"]
    assert "AWS_ACCESS_KEY_ID" not in json.dumps(pod) and len(pod["volumes"]) == 1


# ---- what runs get ------------------------------------------------------------------------


def variables_of(storage: dict[str, Any], type_: str) -> dict[str, Any]:
    from lume_operator.api.flow import LumeFlow

    flow = LumeFlow.model_validate(lumeflow_manifest(runConfig=None))
    backend = SchedulingBackend.model_validate(backend_with(storage, type_))
    return flow_deployment(flow, backend).spec.job_variables


def test_kubernetes_jobs_get_the_store_and_its_keys_by_reference_only():
    variables = variables_of(S3, "kubernetes")
    env = variables["env"]
    assert env["LUME_RESULTS_FILESYSTEM"] == "s3://lume-results/beam"
    assert env["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] == f"remote-file-system/{BLOCK}"
    assert json.loads(env["LUME_FILESYSTEMS"]) == [
        {
            "identifier": "s3://lume-results/beam",
            "type": "objectStore",
            "url": "s3://lume-results/beam",
            "endpoint_url": "http://minio.storage:9000",
            "region": "us-east-1",
        }
    ]
    assert variables["env_refs"] == [
        {
            "name": "AWS_ACCESS_KEY_ID",
            "valueFrom": {"secretKeyRef": {"name": "s3-credentials", "key": "id"}},
        },
        {
            "name": "AWS_SECRET_ACCESS_KEY",
            "valueFrom": {
                "secretKeyRef": {"name": "s3-credentials", "key": "AWS_SECRET_ACCESS_KEY"}
            },
        },
    ]
    assert secrets_in(variables) == []


def test_a_volume_is_mounted_in_jobs_and_containers():
    volume = {"volume": {"claimName": "results", "mountPath": "/results"}}
    k8s = variables_of(volume, "kubernetes")
    assert k8s["volumes"] == [
        {"name": "tmp", "emptyDir": {}},
        {"name": "lume-result-storage", "persistentVolumeClaim": {"claimName": "results"}},
    ]
    assert k8s["volume_mounts"] == [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "lume-result-storage", "mountPath": "/results"},
    ]
    assert k8s["env"]["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] == "/results/prefect"
    assert k8s["env"]["LUME_RESULTS_FILESYSTEM"] == "pvc/results"
    docker = variables_of(volume, "docker")
    assert docker["volumes"] == ["results:/results:rw"]
    process = variables_of(volume, "process")
    assert "volumes" not in process and process["env"]["LUME_RESULTS_FILESYSTEM"] == "pvc/results"


def test_local_runs_keep_their_results_directory():
    from lume_operator.api.flow import LumeFlow

    flow = LumeFlow.model_validate(lumeflow_manifest())
    backend = SchedulingBackend.model_validate(backend_with(S3))
    made = flow_deployment(flow, backend, backend_type="process", storage=False)
    assert "LUME_RESULTS_FILESYSTEM" not in made.env and "env_refs" not in made.spec.job_variables
    assert any("declares resultStorage" in note for note in made.notes)


# ---- ResultsAvailable ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_kubernetes_backend_without_storage_says_so_and_runs_still_complete(
    fake, connect, settings
):
    backend = ready_backend(backend_with(None, "kubernetes"))
    body = lumeflow_manifest(runConfig=None)
    outcome = await reconcile_flow(
        body, LumeFlowStatus(), backend=backend, connect=connect, settings=settings
    )
    status = outcome.status
    assert cond(status, "ResultsAvailable") == ("False", "NoResultStorage")
    message = next(c.message for c in status.conditions if c.type == "ResultsAvailable")
    assert "declares no spec.resultStorage" in message and "s3://bucket/prefix" in message
    assert ("Warning", "NoResultStorage") in events(outcome)
    assert status.phase == "Running"  # the run was started all the same
    run_id = status.last_run.id
    fake.set_state(run_id, "COMPLETED")
    done = await follow_flow(body, status, backend=backend, connect=connect, now=NOW)
    assert done is not None
    assert done.status.phase == "Completed" and done.status.results == []
    assert cond(done.status) == ("True", "FlowRunCompleted")
    assert cond(done.status, "ResultsAvailable") == ("False", "NoResultStorage")
    assert "its results were not read" in done.events[0].message
    assert "result_of" not in fake.calls  # nothing read from a pod's own disk


@pytest.mark.asyncio
async def test_backends_with_storage_or_local_results_say_where(fake, connect, settings):
    for storage, type_, reason in [
        (S3, "kubernetes", "ResultStorage"),
        (None, "process", "LocalResults"),
    ]:
        outcome = await reconcile_flow(
            lumeflow_manifest(runConfig=None),
            LumeFlowStatus(),
            backend=ready_backend(backend_with(storage, type_)),
            connect=connect,
            settings=settings,
        )
        assert cond(outcome.status, "ResultsAvailable") == ("True", reason)


@pytest.mark.asyncio
async def test_a_flow_of_flows_on_a_backend_without_storage_says_so(fake, connect, settings):
    flows = {
        name: ready_backend(doc, deploymentId=f"dep-{name}")
        for name, doc in pipeline_flows().items()
    }
    outcome = await reconcile_composition(
        composition_manifest(),
        FlowOfFlowsStatus(),
        flows=flows,
        backends={"local": ready_backend(backend_with(None, "docker"))},
        connect=connect,
        settings=settings,
    )
    assert cond(outcome.status, "ResultsAvailable") == ("False", "NoResultStorage")


# ---- reading a finished run's results from the declared storage -----------------------------


class Volume:
    """A volume storage as the runs see it (/results) and the operator reads it (tmp_path)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.body = backend_with({"volume": {"claimName": "results", "mountPath": "/results"}})
        backend = SchedulingBackend.model_validate(self.body)
        self.storage = reader_storage(backend.spec.result_storage, volume_path=root)
        self.opened: list[str] = []

    async def open(self, backend: SchedulingBackend) -> RunStorage:
        self.opened.append(backend.metadata.name)
        return self.storage

    def record(self, value: Any, serializer: str = "json") -> str:
        (self.root / "prefect").mkdir(exist_ok=True)
        record = {"metadata": {"serializer": {"type": serializer}}, "result": json.dumps(value)}
        (self.root / "prefect" / "rec1").write_text(json.dumps(record))
        return "/results/prefect/rec1"

    def file(self, name: str, text: str = "report") -> dict[str, str]:
        path = self.root / "run-1" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        return {
            "filename": f"/results/run-1/{name}",
            "filesystem_identifier": "pvc/results",
            "file_type_string": "TextFile",
        }


async def finished(fake, connect, settings, volume: Volume, value: Any, key: str, **kw: Any):
    body = lumeflow_manifest(results=None)
    backend = ready_backend(volume.body)
    outcome = await reconcile_flow(
        body, LumeFlowStatus(), backend=backend, connect=connect, settings=settings
    )
    run_id = outcome.status.last_run.id
    fake.set_result(run_id, value, key=key, **kw)
    fake.set_state(run_id, "COMPLETED")
    fake.calls.clear()
    return await follow_flow(
        body, outcome.status, backend=backend, connect=connect, now=NOW, open_storage=volume.open
    )


@pytest.mark.asyncio
async def test_results_are_read_from_the_declared_storage(fake, connect, settings, tmp_path):
    volume = Volume(tmp_path)
    report = volume.file("report.txt")
    key = volume.record({"report": report, "n": 3})
    outcome = await finished(fake, connect, settings, volume, None, key)
    assert outcome is not None and outcome.status.phase == "Completed", outcome.status
    assert outcome.status.results == [
        ResultStatus(
            name="report",
            type="TextFile",
            filesystem="pvc/results",
            location="/results/run-1/report.txt",
        )
    ]
    assert "result_of" not in fake.calls and volume.opened == ["local"]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("key outside", "Prefect result key '/etc/passwd' is outside the backend's result storage"),
        ("file elsewhere", "is on filesystem 'local', not the backend's result storage"),
        ("file outside", "is outside the backend's result storage '/results'"),
        ("pickle", "is stored with the 'pickle' serializer; lume-operator reads only JSON"),
        ("missing record", "was never stored"),
    ],
)  # fmt: skip
async def test_what_the_storage_does_not_hold_is_refused(
    fake, connect, settings, tmp_path, case, message
):
    volume = Volume(tmp_path)
    report = volume.file("report.txt")
    value = {"report": report}
    key, kw = volume.record(value), {}
    if case == "key outside":
        key = "/etc/passwd"
    elif case == "file elsewhere":
        key = volume.record({"report": {**report, "filesystem_identifier": "local"}})
    elif case == "file outside":
        key = volume.record({"report": {**report, "filename": "/etc/passwd"}})
    elif case == "pickle":
        kw = {"serializer": "pickle"}
    elif case == "missing record":
        key = "/results/prefect/nothing"
    outcome = await finished(fake, connect, settings, volume, None, key, **kw)
    assert outcome is not None and outcome.status.phase == "Failed"
    assert cond(outcome.status) == ("False", "ResultsInvalid")
    assert message in outcome.status.conditions[0].message


class Unreachable(MountedFilesystem):
    def read_bytes(self, filename: str) -> bytes:
        raise StorageUnreachableError("cannot reach the object store at http://minio:9000")


@pytest.mark.asyncio
async def test_an_unreachable_storage_is_read_again_later(fake, connect, settings, tmp_path):
    volume = Volume(tmp_path)
    key = volume.record({"n": 1})
    good = volume.storage
    volume.storage = RunStorage(Unreachable(**good.filesystem.model_dump(exclude={"type"})))
    outcome = await finished(fake, connect, settings, volume, None, key)
    assert outcome is not None
    assert cond(outcome.status) == ("False", "ResultStorageUnreachable")
    assert cond(outcome.status, "Reconciling") == ("True", "ResultStorageUnreachable")
    assert outcome.status.phase != "Completed"
    assert "Prefect API" not in outcome.status.conditions[0].message
    # Back: the results are read on the next follow.
    volume.storage = good
    body = lumeflow_manifest(results=None)
    again = await follow_flow(
        body,
        outcome.status,
        backend=ready_backend(volume.body),
        connect=connect,
        now=NOW,
        open_storage=volume.open,
    )
    assert again is not None and again.status.phase == "Completed"


@pytest.mark.asyncio
async def test_storage_that_cannot_be_opened_waits_with_its_reason(
    fake, connect, settings, tmp_path
):
    volume = Volume(tmp_path)

    async def missing(backend: SchedulingBackend) -> RunStorage:
        raise PrefectNotConfigured("SecretNotFound", "result storage credentials: Secret gone")

    volume.open = missing  # type: ignore[method-assign]
    outcome = await finished(fake, connect, settings, volume, None, volume.record({}))
    assert outcome is not None
    assert cond(outcome.status) == ("False", "SecretNotFound")
    assert outcome.status.phase != "Completed"
