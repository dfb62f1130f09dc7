"""Results layer: File types, serializers, filesystems, description loading and Prefect tasks."""

from __future__ import annotations

import csv
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from lume.serializers.base import SerializerBase

from lume_operator.results import (
    File,
    FileDescriptionError,
    FilesystemConfigError,
    FileTypeImportError,
    HDF5File,
    HDF5Serializer,
    MountedFilesystem,
    PathOutsideMountError,
    ResultFileNotFoundError,
    TextFile,
    TextSerializer,
    UnknownFilesystemError,
    UnknownFileTypeError,
    configured_filesystems,
    find_file_descriptions,
    get_filesystem,
    load_file,
    register_file_type,
    register_filesystem,
    reset_filesystems,
    result_path,
    results_dir,
)
from tests.k8s.prefect_server import PrefectServer


class CSVSerializer(SerializerBase):
    def serialize(self, filename: str, data: list[list[str]]) -> None:
        with open(filename, "w", newline="") as handle:
            csv.writer(handle).writerows(data)

    @classmethod
    def deserialize(cls, filename: str) -> list[list[str]]:
        with open(filename, newline="") as handle:
            return list(csv.reader(handle))


CSVFile = File[CSVSerializer]

USER_MODULE = """
import csv

from lume.serializers.base import SerializerBase

from lume_operator.results import File


class CSVSerializer(SerializerBase):
    def serialize(self, filename, data):
        with open(filename, "w", newline="") as handle:
            csv.writer(handle).writerows(data)

    @classmethod
    def deserialize(cls, filename):
        with open(filename, newline="") as handle:
            return list(csv.reader(handle))


CSVFile = File[CSVSerializer]
"""


@pytest.fixture(autouse=True)
def _isolated_filesystems(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.delenv("LUME_FILESYSTEMS", raising=False)
    reset_filesystems()
    yield
    reset_filesystems()


def test_text_file_round_trip_and_description(tmp_path: Path) -> None:
    text = "héllo\r\nwörld\n"
    file = TextFile(filename=str(tmp_path / "nested" / "dir" / "out.txt")).write(text)

    assert file.read() == text
    assert (tmp_path / "nested" / "dir" / "out.txt").read_bytes() == text.encode("utf-8")
    description = file.description()
    assert description == {
        "filename": str(tmp_path / "nested" / "dir" / "out.txt"),
        "filesystem_identifier": "local",
        "file_type_string": "TextFile",
    }
    assert file.model_dump() == description
    loaded = load_file(json.dumps(description))
    assert type(loaded) is TextFile
    assert loaded == file
    assert pickle.loads(pickle.dumps(file)) == file
    assert TextFile.model_validate(description) == file
    with pytest.raises(ValueError, match="does not match 'TextFile'"):
        TextFile.model_validate({**description, "file_type_string": "HDF5File"})


def test_parametrized_file_types_are_cached_named_and_checked() -> None:
    assert File[TextSerializer] is TextFile
    assert File[HDF5Serializer] is HDF5File
    assert File[CSVSerializer] is CSVFile
    assert CSVFile.type_string() == f"File[{__name__}:CSVSerializer]"
    assert HDF5File.type_string() == "HDF5File"
    with pytest.raises(TypeError, match="File has no serializer"):
        File(filename="x.txt")
    with pytest.raises(TypeError, match="needs a SerializerBase subclass"):
        File[int]  # type: ignore[type-var]


class NamedCSVFile(File[CSVSerializer]):
    pass


register_file_type(NamedCSVFile, "NamedCSVFile")


def test_user_file_types_round_trip_in_process(tmp_path: Path) -> None:
    rows = [["a", "b"], ["1", "x,y"]]
    file = CSVFile(filename=str(tmp_path / "table.csv")).write(rows)
    named = NamedCSVFile(filename=str(tmp_path / "named.csv")).write(rows)

    loaded = load_file(file.description())
    loaded_named = load_file(named.description())

    assert type(loaded) is CSVFile
    assert loaded.read() == rows
    assert named.file_type_string == "NamedCSVFile"
    assert type(loaded_named) is NamedCSVFile
    assert loaded_named.read() == rows
    with pytest.raises(ValueError, match="'NamedCSVFile' is already registered"):
        register_file_type(CSVFile, "NamedCSVFile")


def test_user_file_type_loads_in_fresh_subprocess(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "user_csv_types.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import user_csv_types

    rows = [["x", "y"], ["1", "2"]]
    description = user_csv_types.CSVFile(filename=str(tmp_path / "t.csv")).write(rows).description()
    assert description["file_type_string"] == "File[user_csv_types:CSVSerializer]"

    script = textwrap.dedent(
        """
        import json, sys
        from lume_operator.results import load_file
        file = load_file(sys.argv[1])
        import user_csv_types
        print(json.dumps({
            "same_type": type(file) is user_csv_types.CSVFile,
            "rows": file.read(),
            "prefect_imported": "prefect" in sys.modules,
        }))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    completed = subprocess.run(
        [sys.executable, "-c", script, json.dumps(description)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    # Also proves the results layer stays importable without Prefect.
    assert json.loads(completed.stdout.splitlines()[-1]) == {
        "same_type": True,
        "rows": rows,
        "prefect_imported": False,
    }


def test_hdf5_array_round_trip_is_plain_hdf5(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    file = HDF5File(filename=str(tmp_path / "array.h5")).write(array)

    loaded = file.read()

    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, array)
    with h5py.File(file.path, "r") as h5:
        np.testing.assert_array_equal(h5["data"][()], array)


def test_hdf5_nested_dict_round_trip(tmp_path: Path) -> None:
    data = {
        "image": np.random.default_rng(0).random((4, 5)),
        "count": 3,
        "energy": 1.5e9,
        "name": "run 1",
        "ok": True,
        "missing": None,
        "steps": [1, 2, 3],
        "labels": ["a", "bc"],
        "nested": {"inner": {"ids": np.array([7, 8], dtype=np.int16), "note": "ü"}, "empty": {}},
    }
    loaded = HDF5File(filename=str(tmp_path / "tree.h5")).write(data).read()

    assert loaded.keys() == data.keys()
    np.testing.assert_array_equal(loaded["image"], data["image"])
    assert loaded["count"] == 3 and isinstance(loaded["count"], int)
    assert loaded["energy"] == 1.5e9
    assert loaded["name"] == "run 1" and isinstance(loaded["name"], str)
    assert loaded["ok"] is True
    assert loaded["missing"] is None
    assert loaded["steps"] == [1, 2, 3]
    assert loaded["labels"] == ["a", "bc"]
    assert loaded["nested"]["inner"]["ids"].dtype == np.int16
    np.testing.assert_array_equal(loaded["nested"]["inner"]["ids"], [7, 8])
    assert loaded["nested"]["inner"]["note"] == "ü"
    assert loaded["nested"]["empty"] == {}


def test_hdf5_rejects_unstorable_values(tmp_path: Path) -> None:
    file = HDF5File(filename=str(tmp_path / "bad.h5"))
    with pytest.raises(TypeError, match="cannot store object at 'a/b'"):
        file.write({"a": {"b": object()}})
    with pytest.raises(TypeError, match="got str"):
        file.write("text")
    assert not file.exists()


LUME_MODULE = """
__version__ = "1.0"

from lume.base import Base


class Counter(Base):
    def configure(self):
        pass

    def run(self):
        self.output = {"total": sum(self.input["values"])}

    def archive(self, h5):
        h5.create_dataset("values", data=self.input["values"])
        h5.attrs["total"] = self.output["total"]

    def load_archive(self, h5, configure=True):
        self.input = {"values": list(h5["values"][()])}
        self.output = {"total": int(h5.attrs["total"])}
"""


def test_hdf5_lume_base_object_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # lume's serializer records '<module>.<class>' and the top package's __version__, so the
    # Base subclass must live in a real importable module.
    (tmp_path / "lume_counter_model.py").write_text(LUME_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    from lume_counter_model import Counter

    model = Counter()
    model.input = {"values": [1, 2, 3]}
    model.run()
    file = HDF5File(filename=str(tmp_path / "model.h5")).write(model)

    loaded = file.read()

    assert type(loaded) is Counter
    assert loaded.input == {"values": [1, 2, 3]}
    assert loaded.output == {"total": 6}


def test_mounted_filesystem_maps_alias_between_mounts(tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    (tmp_path / "reader-mount").symlink_to(volume)
    writer = MountedFilesystem(identifier="shared", mount_path=volume, mount_alias="/lume-data")
    register_filesystem(writer)
    description = (
        TextFile(filename="/lume-data/run1/x.txt", filesystem_identifier="shared")
        .write("payload")
        .description()
    )
    assert (volume / "run1" / "x.txt").read_text() == "payload"

    # Same volume, same alias, mounted somewhere else in the reading process.
    register_filesystem(writer.model_copy(update={"mount_path": tmp_path / "reader-mount"}))
    loaded = load_file(description)

    assert loaded.path == tmp_path / "reader-mount" / "run1" / "x.txt"
    assert loaded.read() == "payload"


@pytest.mark.parametrize(
    "filename", ["/other/x.h5", "/lume-database/x.h5", "/lume-data/../etc/passwd", "rel/x.h5"]
)
def test_mounted_filesystem_rejects_paths_outside_alias(filename: str) -> None:
    mounted = MountedFilesystem(mount_path=Path("/data"), mount_alias="/lume-data/")

    assert mounted.resolve("/lume-data/run1/x.h5") == Path("/data/run1/x.h5")
    with pytest.raises(PathOutsideMountError) as error:
        mounted.resolve(filename)
    assert str(error.value) == (
        f"filename {filename!r} is not under mount alias '/lume-data' of filesystem 'mounted'"
    )


def test_lume_filesystems_env_is_read_lazily(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = [
        {"type": "mounted", "identifier": "mounted", "mount_path": "/data", "mount_alias": "/d"},
        {
            "type": "mounted",
            "identifier": "scratch",
            "mount_path": str(tmp_path),
            "mount_alias": "/s",
        },
    ]
    monkeypatch.setenv("LUME_FILESYSTEMS", json.dumps(config))

    filesystem = get_filesystem("scratch")

    assert isinstance(filesystem, MountedFilesystem)
    assert filesystem.resolve("/s/a.txt") == tmp_path / "a.txt"
    assert list(configured_filesystems()) == ["local", "mounted", "scratch"]
    assert get_filesystem("local").resolve("x") == Path.cwd() / "x"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[{", "LUME_FILESYSTEMS is not valid JSON"),
        ('{"type": "mounted"}', "LUME_FILESYSTEMS must be a JSON list of filesystems, got dict"),
        (
            '[{"type": "local"}, {"type": "mounted", "mount_path": "/data"}]',
            "LUME_FILESYSTEMS[1] is invalid: mounted.mount_alias: Field required",
        ),
        ('[{"type": "s3", "identifier": "x"}]', "LUME_FILESYSTEMS[0] is invalid: <entry>:"),
        (
            '[{"type": "mounted", "mount_path": "/data", "mount_alias": "data"}]',
            "LUME_FILESYSTEMS[0] is invalid: mounted.mount_alias: Value error, mount_alias must be",
        ),
        (
            '[{"type": "mounted", "mount_path": "/a", "mount_alias": "/a"},'
            ' {"type": "mounted", "mount_path": "/b", "mount_alias": "/b"}]',
            "LUME_FILESYSTEMS[1].identifier: duplicate identifier 'mounted'",
        ),
        (
            '[{"type": "mounted", "identifier": "local", "mount_path": "/a", "mount_alias": "/a"}]',
            "LUME_FILESYSTEMS[0].identifier: 'local' is reserved",
        ),
    ],
)
def test_lume_filesystems_config_errors(
    value: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LUME_FILESYSTEMS", value)

    with pytest.raises(FilesystemConfigError) as error:
        get_filesystem("mounted")
    assert str(error.value).startswith(message), str(error.value)


def test_unknown_filesystem_identifier_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "LUME_FILESYSTEMS",
        '[{"type": "mounted", "mount_path": "/data", "mount_alias": "/lume-data"}]',
    )
    file = TextFile(filename="/lume-data/x.txt", filesystem_identifier="foo")

    with pytest.raises(UnknownFilesystemError) as error:
        file.read()
    assert str(error.value) == "unknown filesystem identifier 'foo' (configured: local, mounted)"


def test_missing_result_file_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    absolute = TextFile(filename=str(tmp_path / "gone.txt"))
    relative = TextFile(filename="gone.txt")

    with pytest.raises(ResultFileNotFoundError) as error:
        absolute.read()
    assert (
        str(error.value) == f"result file '{tmp_path}/gone.txt' (filesystem 'local') does not exist"
    )
    with pytest.raises(FileNotFoundError) as error:
        relative.read()
    assert str(error.value) == (
        f"result file 'gone.txt' (filesystem 'local') does not exist at '{tmp_path}/gone.txt'"
    )


def test_unknown_file_type_message() -> None:
    description = {
        "filename": "x.nc",
        "filesystem_identifier": "local",
        "file_type_string": "NetCDFFile",
    }

    with pytest.raises(UnknownFileTypeError) as error:
        load_file(description)
    message = str(error.value)
    assert message.startswith("unknown file type 'NetCDFFile' in file description (known: ")
    assert "HDF5File, " in message and "TextFile, " in message
    assert message.endswith(", File[<module>:<Serializer>])")


GOOD = {"filename": "x.txt", "filesystem_identifier": "local", "file_type_string": "TextFile"}


@pytest.mark.parametrize(
    ("description", "error_type", "message"),
    [
        ("not json", FileDescriptionError, "file description is not valid JSON"),
        ("[1, 2]", FileDescriptionError, "file description must be a JSON object, got list"),
        (
            {"filename": "x.txt"},
            FileDescriptionError,
            "invalid file description (missing keys: filesystem_identifier, file_type_string)",
        ),
        (
            {**GOOD, "size": 3},
            FileDescriptionError,
            "invalid file description (unexpected keys: size)",
        ),
        ({**GOOD, "filename": 3}, FileDescriptionError, "invalid file description (not strings"),
        (
            {**GOOD, "file_type_string": "File[no_such_module_xyz:Ser]"},
            FileTypeImportError,
            "cannot import module 'no_such_module_xyz'",
        ),
        (
            {**GOOD, "file_type_string": "File[json:NoSuchSerializer]"},
            FileTypeImportError,
            "module 'json' has no serializer 'NoSuchSerializer'",
        ),
        (
            {**GOOD, "file_type_string": "File[json:JSONDecoder]"},
            FileTypeImportError,
            "json:JSONDecoder is not a SerializerBase subclass",
        ),
    ],
)
def test_malformed_descriptions(description: Any, error_type: type, message: str) -> None:
    with pytest.raises(error_type) as error:
        load_file(description)
    assert isinstance(error.value, FileDescriptionError) and isinstance(error.value, ValueError)
    assert str(error.value).startswith(message), str(error.value)


class ExplodingSerializer(SerializerBase):
    def serialize(self, filename: str, data: str) -> None:
        with open(filename, "w") as handle:
            handle.write(data[:3])
            handle.flush()
            raise RuntimeError("disk on fire")

    @classmethod
    def deserialize(cls, filename: str) -> str:
        return Path(filename).read_text()


def test_failed_write_leaves_no_target_and_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "out" / "result.txt"
    with pytest.raises(RuntimeError, match="disk on fire"):
        File[ExplodingSerializer](filename=str(target)).write("complete content")
    assert list((tmp_path / "out").iterdir()) == []

    TextFile(filename=str(target)).write("old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        File[ExplodingSerializer](filename=str(target)).write("new content")
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["result.txt"]
    assert target.read_text() == "old"


def test_find_file_descriptions() -> None:
    summary = TextFile(filename="/r/summary.txt").description()
    first = HDF5File(filename="/r/0.h5").description()
    value = {
        "summary": summary,
        "outputs": [first, {"not": "a file"}, {"deep": HDF5File(filename="/r/1.h5")}],
        "almost": {**summary, "extra": "key"},
        "count": 3,
    }

    found = find_file_descriptions(value)

    assert [name for name, _ in found] == ["summary", "outputs.0", "outputs.2.deep"]
    assert found[0][1] == summary and found[1][1] == first
    assert found[2][1]["filename"] == "/r/1.h5"
    assert find_file_descriptions(summary) == [("return", summary)]
    assert find_file_descriptions([summary], prefix="out") == [("out.0", summary)]
    assert find_file_descriptions("plain") == []


def test_results_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LUME_RESULTS_DIR", raising=False)
    assert results_dir() == tmp_path / "results" and (tmp_path / "results").is_dir()

    monkeypatch.setenv("LUME_RESULTS_DIR", str(tmp_path / "custom" / "dir"))
    assert result_path("run/a.h5") == str(tmp_path / "custom" / "dir" / "run" / "a.h5")
    assert (tmp_path / "custom" / "dir").is_dir()
    with pytest.raises(ValueError, match="inside the results dir"):
        result_path("../escape.h5")


@pytest.mark.prefect
def test_prefect_tasks_save_and_get_file_results(
    shared_prefect_server: PrefectServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("PREFECT_API_URL", shared_prefect_server.api_url)
    from prefect import flow
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_LOGGING_TO_API_ENABLED,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        temporary_settings,
    )

    from lume_operator.results.tasks import get_file_result, save_file_result

    target = HDF5File(filename=str(tmp_path / "out" / "data.h5"))

    @flow
    def round_trip(text_filename: str) -> dict[str, Any]:
        text = save_file_result("from a flow", {**GOOD, "filename": text_filename})
        array = save_file_result(np.arange(5), target)
        return {"text": text, "array": array, "loaded": get_file_result(json.dumps(text))}

    # Prefect reads its settings at import, so the env above only helps if this test imported it
    # first; temporary_settings makes the tmp home and the session's server effective either
    # way. No API logging: the server may be gone by the time the log worker flushes at exit.
    settings = {
        PREFECT_API_URL: shared_prefect_server.api_url,
        PREFECT_HOME: tmp_path / "prefect",
        PREFECT_SERVER_ANALYTICS_ENABLED: False,
        PREFECT_LOGGING_TO_API_ENABLED: False,
    }
    with temporary_settings(updates=settings):
        result = round_trip(str(tmp_path / "out" / "note.txt"))

    assert result["loaded"] == "from a flow"
    assert [name for name, _ in find_file_descriptions(result)] == ["text", "array"]
    assert result["array"] == target.description()
    np.testing.assert_array_equal(load_file(result["array"]).read(), np.arange(5))
