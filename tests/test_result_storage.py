"""Result storage both sides reach: File results and Prefect records in an S3 object store
(moto's server on loopback, through s3fs) or a shared volume, written by a run's environment
and read by a reader with its own credentials, every key resolved against the declared storage."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest

from lume_operator.api.backend import ResultStorage
from lume_operator.results import (
    FileDescriptionError,
    HDF5File,
    ResultFileNotFoundError,
    TextFile,
    described_file,
    load_file,
    reset_filesystems,
    result_path,
)
from lume_operator.results.filesystems import (
    ObjectStoreFilesystem,
    PathOutsideMountError,
    StorageAccessDeniedError,
    StorageUnreachableError,
)
from lume_operator.results.storage import (
    RecordOutsideStorage,
    block_fields,
    reader_storage,
    run_env,
)
from tests.conftest import S3

RUN_ID = "0b6f3c1e-2d4a-4f5b-8c7d-9e0f1a2b3c4d"


def object_store(s3: S3, url: str = "s3://lume-results/beam") -> ResultStorage:
    return ResultStorage.model_validate(
        {
            "objectStore": {
                "url": url,
                "endpointUrl": s3.endpoint,
                "region": s3.region,
                "credentialsSecretRef": {"name": "s3-credentials"},
            }
        }
    )


@pytest.fixture
def run_side(monkeypatch: pytest.MonkeyPatch):
    """This process as a flow run of a backend: its environment from `run_env`, its
    credentials as the Secret reference would give them."""

    def become(storage: ResultStorage, s3: S3 | None = None) -> dict[str, str]:
        env = run_env(storage, "lume-results-default-b-12345678")
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("PREFECT__FLOW_RUN_ID", RUN_ID)
        if s3 is not None:
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key_id)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_access_key)
        reset_filesystems()
        return env

    yield become
    reset_filesystems()


def test_a_run_writes_files_to_the_object_store_and_a_reader_reads_them(s3, run_side):
    bucket = s3.bucket("lume-results")
    storage = object_store(s3)
    env = run_side(storage, s3)
    assert env["LUME_RESULTS_FILESYSTEM"] == "s3://lume-results/beam"
    assert env["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] == (
        "remote-file-system/lume-results-default-b-12345678"
    )
    assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(env) and s3.secret_access_key not in str(env)

    # The flow's own code, unchanged: result_path + HDF5File land in the store.
    particles = {"x": np.arange(5.0), "px": np.ones(5)}
    beam = HDF5File(filename=result_path("beam.h5")).write(particles)
    report = TextFile(filename=result_path("out/report.txt")).write("emittance: 1e-8\n")
    assert beam.filename == f"s3://lume-results/beam/{RUN_ID}/beam.h5"
    assert beam.filesystem_identifier == "s3://lume-results/beam"
    assert s3.keys(bucket) == [f"beam/{RUN_ID}/beam.h5", f"beam/{RUN_ID}/out/report.txt"]
    assert s3.get(bucket, f"beam/{RUN_ID}/out/report.txt") == b"emittance: 1e-8\n"
    # Another step of the run side loads it back from its description.
    again = load_file(json.loads(json.dumps(beam.description()))).read()
    np.testing.assert_array_equal(again["x"], particles["x"])
    assert load_file(report.description()).read() == "emittance: 1e-8\n"
    missing = HDF5File(filename=result_path("nothing.h5"))
    assert not missing.exists()
    with pytest.raises(ResultFileNotFoundError, match="nothing.h5.*does not exist"):
        missing.read()

    # A reader outside the run: its own credentials, given explicitly, never in a dump.
    reader = reader_storage(storage, credentials=(s3.access_key_id, s3.secret_access_key))
    for text in (repr(reader), str(reader.filesystem.model_dump())):
        assert s3.secret_access_key not in text and s3.access_key_id not in text
    file = described_file(beam.description(), on=reader.filesystem)
    assert (file.exists, file.filename) == (True, beam.filename)
    assert not described_file(missing.description(), on=reader.filesystem).exists


def test_a_reader_refuses_files_outside_the_declared_storage(s3):
    reader = reader_storage(object_store(s3), credentials=("a", "b"))
    desc = {"filename": "", "filesystem_identifier": "", "file_type_string": "HDF5File"}
    for filename, identifier, message in [
        ("s3://other-bucket/x.h5", "s3://other-bucket", "is on filesystem 's3://other-bucket', "
         "not the backend's result storage 's3://lume-results/beam'"),
        ("s3://lume-results/beam/../secrets/x.h5", "s3://lume-results/beam",
         "is outside the backend's result storage 's3://lume-results/beam'"),
        ("s3://lume-results/beamline/x.h5", "s3://lume-results/beam", "is outside"),
        ("/etc/passwd", "s3://lume-results/beam", "is outside"),
        ("s3://lume-results/beam/x.h5", "local", "is on filesystem 'local'"),
    ]:  # fmt: skip
        with pytest.raises(FileDescriptionError, match=message):
            described_file({**desc, "filename": filename, "filesystem_identifier": identifier},
                           on=reader.filesystem)  # fmt: skip


def test_record_keys_resolve_inside_the_storage_only(s3, tmp_path):
    reader = reader_storage(object_store(s3), credentials=("a", "b"))
    assert reader.record_location("5f1e0c") == "s3://lume-results/beam/prefect/5f1e0c"
    for key in ("../../other/x", "/abs/key", "s3://other/key", "a/../../b", "", "a//b"):
        with pytest.raises(RecordOutsideStorage, match="outside the backend's result storage"):
            reader.record_location(key)
    volume = ResultStorage.model_validate({"volume": {"claimName": "res", "mountPath": "/results"}})
    local = reader_storage(volume, volume_path=tmp_path)
    assert local.record_location("/results/prefect/abc") == "/results/prefect/abc"
    for key in ("/results/prefect/../x", "/etc/passwd", "relative", "/results/prefectx/a"):
        with pytest.raises(RecordOutsideStorage):
            local.record_location(key)


def test_a_shared_volume_is_read_where_the_reader_mounts_it(tmp_path, run_side):
    # The run sees the claim at its mountPath; the reader at another path (here: a symlink
    # to the same directory, as two pods mount one volume at two paths).
    claim = tmp_path / "claim"
    claim.mkdir()
    volume = ResultStorage.model_validate({"volume": {"claimName": "res", "mountPath": str(claim)}})
    env = run_side(volume)
    assert env["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] == f"{claim}/prefect"
    written = TextFile(filename=result_path("report.txt")).write("hi\n")
    assert written.filename == f"{claim}/{RUN_ID}/report.txt"
    assert written.filesystem_identifier == "pvc/res"
    (claim / "prefect").mkdir()
    (claim / "prefect" / "rec").write_bytes(b'{"result": 1}')
    elsewhere = tmp_path / "operator-mount"
    elsewhere.symlink_to(claim)
    reader = reader_storage(volume, volume_path=elsewhere)
    assert reader.filesystem.resolve(written.filename) == elsewhere / RUN_ID / "report.txt"
    assert described_file(written.description(), on=reader.filesystem).exists
    assert reader.read_record(f"{claim}/prefect/rec") == b'{"result": 1}'
    with pytest.raises(FileNotFoundError, match="not in the backend's result storage"):
        reader.read_record(f"{claim}/prefect/gone")


def test_the_block_holds_where_and_how_but_no_credential(s3):
    fields = block_fields(object_store(s3))
    assert fields == {
        "basepath": "s3://lume-results/beam/prefect",
        "settings": {"endpoint_url": s3.endpoint, "client_kwargs": {"region_name": "us-east-1"}},
    }


def test_store_failures_are_named_and_bounded(s3, monkeypatch):
    s3.bucket("lume-results")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    down = ObjectStoreFilesystem(
        identifier="x", url="s3://lume-results/beam", endpoint_url=dead
    ).with_credentials("a", "b")
    started = time.monotonic()
    with pytest.raises(StorageUnreachableError, match=f"cannot reach the object store at {dead}"):
        down.exists("s3://lume-results/beam/x.h5")
    assert time.monotonic() - started < 30
    anonymous = ObjectStoreFilesystem(identifier="x", url="s3://lume-results/beam",
                                      endpoint_url=s3.endpoint)  # fmt: skip
    with pytest.raises(StorageAccessDeniedError, match="no credentials"):
        anonymous.read_bytes("s3://lume-results/beam/x")
    with pytest.raises(PathOutsideMountError):
        anonymous.key("s3://lume-results/other")


def test_result_path_without_storage_stays_local(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("LUME_RESULTS_FILESYSTEM", raising=False)
    monkeypatch.setenv("LUME_RESULTS_DIR", str(tmp_path))
    assert result_path("a/b.h5") == str(tmp_path / "a" / "b.h5")
    assert HDF5File(filename=result_path("b.h5")).filesystem_identifier == "local"
