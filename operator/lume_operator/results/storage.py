"""A backend's declared result storage (`spec.resultStorage`), for the flow runs that write
there and for the readers outside them (the operator, `lume-operator results`).

Runs learn it from their environment (`run_env`): File results go under `<root>/<flow run id>/`
(`result_path`), Prefect's persisted return values under `<root>/prefect/` (a Prefect
`remote-file-system` block holding no secret for an object store; Prefect's local storage
path in the volume for a shared volume). A reader reaches the same storage its own way
(`RunStorage`: the operator with credentials it read from the Secret, or where the claim is
mounted in its pod) and resolves every key against the declared storage: a key or a file
outside it is refused, whatever a stored record or block says.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lume_operator.api.backend import ResultStorage

from .filesystems import (
    ENV_VAR,
    RESULTS_FILESYSTEM_ENV,
    FilesystemError,
    MountedFilesystem,
    ObjectStoreFilesystem,
    parse_filesystems_config,
)

# Where Prefect's result records go, under the storage's root.
RECORDS = "prefect"
# Prefect's settings that point a run's persisted results at the storage.
DEFAULT_BLOCK_ENV = "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"
LOCAL_STORAGE_ENV = "PREFECT_RESULTS_LOCAL_STORAGE_PATH"
BLOCK_TYPE = "remote-file-system"


class RecordOutsideStorage(FilesystemError, ValueError):
    """A Prefect result key that does not resolve inside the backend's declared storage."""


def run_filesystem(storage: ResultStorage) -> ObjectStoreFilesystem | MountedFilesystem:
    """The storage as flow runs see it: their `LUME_FILESYSTEMS` entry."""
    if storage.object_store:
        store = storage.object_store
        return ObjectStoreFilesystem(
            identifier=storage.identifier,
            url=store.url,
            endpoint_url=store.endpoint_url,
            region=store.region,
        )
    assert storage.volume is not None
    mount = storage.volume.mount_path
    return MountedFilesystem(identifier=storage.identifier, mount_path=mount, mount_alias=mount)


def run_env(
    storage: ResultStorage, block: str | None, given: dict[str, str] | None = None
) -> dict[str, str]:
    """What a run's environment needs to write there (no credential: those come by
    reference); `given` is its environment so far, whose own `LUME_FILESYSTEMS` are kept."""
    entry = run_filesystem(storage).model_dump(mode="json")
    filesystems = [entry]
    if given and given.get(ENV_VAR):
        kept = parse_filesystems_config(given[ENV_VAR], f"runConfig.env.{ENV_VAR}")
        filesystems += [
            fs.model_dump(mode="json") for fs in kept if fs.identifier != entry["identifier"]
        ]
    env = {ENV_VAR: json.dumps(filesystems), RESULTS_FILESYSTEM_ENV: storage.identifier}
    if storage.object_store:
        assert block, "an object store's runs read their records through the backend's block"
        env[DEFAULT_BLOCK_ENV] = f"{BLOCK_TYPE}/{block}"
    else:
        env[LOCAL_STORAGE_ENV] = f"{storage.root}/{RECORDS}"
    return env


def block_fields(storage: ResultStorage) -> dict[str, Any]:
    """The fields of the `remote-file-system` block of an object store: where records go and
    fsspec's options (endpoint, region), never a credential."""
    filesystem = run_filesystem(storage)
    assert isinstance(filesystem, ObjectStoreFilesystem)
    return {"basepath": f"{filesystem.url}/{RECORDS}", "settings": filesystem.options()}


@dataclass(frozen=True)
class RunStorage:
    """A backend's result storage as a reader outside its runs reaches it."""

    filesystem: ObjectStoreFilesystem | MountedFilesystem

    @property
    def identifier(self) -> str:
        return self.filesystem.identifier

    @property
    def root(self) -> str:
        return self.filesystem.root

    @property
    def records(self) -> str:
        return f"{self.root}/{RECORDS}"

    def record_location(self, key: str) -> str:
        """Where Prefect's record of a run is: its key resolved inside `<root>/prefect/`.

        An object store's records are keyed relative to the block's base path; a volume's by
        absolute path in the runs' mount. Anything else (a URL, `..`, another path) is
        refused: a record's own metadata never decides where the operator reads.
        """
        outside = RecordOutsideStorage(
            f"Prefect result key {key!r} is outside the backend's result storage "
            f"({self.records}/): it was not stored there (a flow with its own result storage?)"
        )
        if not key or "\\" in key or "://" in key:
            raise outside
        if isinstance(self.filesystem, ObjectStoreFilesystem):
            if key.startswith("/") or any(part in ("", ".", "..") for part in key.split("/")):
                raise outside
            return f"{self.records}/{key}"
        normalized = posixpath.normpath(key)
        if not key.startswith("/") or not normalized.startswith(self.records + "/"):
            raise outside
        return normalized

    def read_record(self, key: str) -> bytes:
        """The bytes of a run's record (FileNotFoundError naming where it was looked for)."""
        location = self.record_location(key)
        try:
            return self.filesystem.read_bytes(location)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"Prefect's result record {location!r} is not in the backend's result storage"
            ) from None


def reader_storage(
    storage: ResultStorage,
    *,
    credentials: tuple[str, str] | None = None,
    volume_path: Path | None = None,
) -> RunStorage:
    """The storage for a reader: an object store with these credentials (None: the ambient
    ones), a volume mounted here at `volume_path` (None: at the runs' own mount path)."""
    filesystem = run_filesystem(storage)
    if isinstance(filesystem, ObjectStoreFilesystem):
        if credentials is not None:
            filesystem = filesystem.with_credentials(*credentials)
        return RunStorage(filesystem)
    if volume_path is not None:
        filesystem = MountedFilesystem(
            identifier=filesystem.identifier,
            mount_path=volume_path,
            mount_alias=filesystem.mount_alias,
        )
    return RunStorage(filesystem)
