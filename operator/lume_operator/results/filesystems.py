"""Filesystems that File results live on, looked up by identifier.

A File description names its filesystem by identifier only, so the same description can be
read by processes that see the data at different local paths (a laptop, a pod with a volume).
"""

from __future__ import annotations

import json
import os
import posixpath
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

ENV_VAR = "LUME_FILESYSTEMS"
LOCAL = "local"


class FilesystemError(Exception):
    """Base class of filesystem lookup and configuration errors."""


class FilesystemConfigError(FilesystemError, ValueError):
    """`LUME_FILESYSTEMS` is malformed; raised on first lookup, naming the bad entry."""


class UnknownFilesystemError(FilesystemError, KeyError):
    """A description names a filesystem this process has not configured."""

    def __str__(self) -> str:
        # KeyError would repr() the message, wrapping it in quotes.
        return str(self.args[0]) if self.args else ""


class PathOutsideMountError(FilesystemError, ValueError):
    """A filename is not under a mounted filesystem's alias, so it cannot be mapped."""


class Filesystem(BaseModel, ABC):
    """Where File results are stored; maps description filenames to local paths."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    identifier: str = Field(min_length=1)

    @abstractmethod
    def resolve(self, filename: str) -> Path:
        """The local path to open for `filename` as written in a description."""


class LocalFilesystem(Filesystem):
    """Filenames are paths on this machine; only meaningful to processes sharing its disk."""

    type: Literal["local"] = "local"
    identifier: str = LOCAL

    def resolve(self, filename: str) -> Path:
        # abspath (not Path.resolve) normalises '..' without following symlinks.
        return Path(os.path.abspath(filename))


class MountedFilesystem(Filesystem):
    """A volume seen at `mount_path` here and named `mount_alias` in every description.

    Writers and readers agree on the alias; each maps it to wherever the volume is mounted in
    its own process, as a pod's volumeMount does.
    """

    type: Literal["mounted"] = "mounted"
    identifier: str = "mounted"
    mount_path: Path
    mount_alias: str

    @field_validator("mount_alias")
    @classmethod
    def _absolute_alias(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"mount_alias must be an absolute POSIX path, got {value!r}")
        return posixpath.normpath(value)

    def resolve(self, filename: str) -> Path:
        # normpath first so '/alias/../etc/passwd' cannot escape the mount.
        normalized = posixpath.normpath(filename) if filename.startswith("/") else None
        alias = self.mount_alias
        if normalized == alias:
            relative = ""
        elif normalized is not None and normalized.startswith(alias.rstrip("/") + "/"):
            relative = normalized[len(alias.rstrip("/")) + 1 :]
        else:
            raise PathOutsideMountError(
                f"filename {filename!r} is not under mount alias {alias!r} "
                f"of filesystem {self.identifier!r}"
            )
        return Path(os.path.abspath(self.mount_path)) / relative


AnyFilesystem = Annotated[LocalFilesystem | MountedFilesystem, Field(discriminator="type")]
_entry_adapter: TypeAdapter[LocalFilesystem | MountedFilesystem] = TypeAdapter(AnyFilesystem)


def parse_filesystems_config(text: str, source: str = ENV_VAR) -> list[Filesystem]:
    """Parse a `LUME_FILESYSTEMS` JSON list, with errors that point at the offending entry."""
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as error:
        raise FilesystemConfigError(f"{source} is not valid JSON: {error}") from None
    if not isinstance(entries, list):
        raise FilesystemConfigError(
            f"{source} must be a JSON list of filesystems, got {type(entries).__name__}"
        )
    filesystems: list[Filesystem] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        try:
            filesystem = _entry_adapter.validate_python(entry)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in err['loc']) or '<entry>'}: {err['msg']}"
                for err in error.errors(include_url=False)
            )
            raise FilesystemConfigError(f"{source}[{index}] is invalid: {problems}") from None
        if filesystem.identifier in seen:
            raise FilesystemConfigError(
                f"{source}[{index}].identifier: duplicate identifier {filesystem.identifier!r}"
            )
        if filesystem.identifier == LOCAL and not isinstance(filesystem, LocalFilesystem):
            raise FilesystemConfigError(
                f"{source}[{index}].identifier: {LOCAL!r} is reserved for the local filesystem"
            )
        seen.add(filesystem.identifier)
        filesystems.append(filesystem)
    return filesystems


_lock = threading.Lock()
_from_env: dict[str, Filesystem] | None = None
_registered: dict[str, Filesystem] = {}


def _env_filesystems() -> dict[str, Filesystem]:
    global _from_env
    with _lock:
        if _from_env is None:
            text = os.environ.get(ENV_VAR, "").strip()
            parsed = parse_filesystems_config(text) if text else []
            _from_env = {filesystem.identifier: filesystem for filesystem in parsed}
        return _from_env


_local = LocalFilesystem()


def configured_filesystems() -> dict[str, Filesystem]:
    """All filesystems by identifier: local, then `LUME_FILESYSTEMS`, then registered ones."""
    filesystems: dict[str, Filesystem] = {LOCAL: _local}
    filesystems.update(_env_filesystems())
    filesystems.update(_registered)
    return filesystems


def get_filesystem(identifier: str) -> Filesystem:
    """The filesystem a description's `filesystem_identifier` refers to."""
    # Looked up on every File read/write, hence no dict building on the hit path.
    filesystem = _registered.get(identifier) or _env_filesystems().get(identifier)
    if filesystem is not None:
        return filesystem
    if identifier == LOCAL:
        return _local
    filesystems = configured_filesystems()
    raise UnknownFilesystemError(
        f"unknown filesystem identifier {identifier!r} (configured: {', '.join(filesystems)})"
    )


def register_filesystem(filesystem: Filesystem) -> None:
    """Add or replace a filesystem in this process; takes precedence over `LUME_FILESYSTEMS`."""
    if filesystem.identifier == LOCAL and not isinstance(filesystem, LocalFilesystem):
        raise ValueError(f"{LOCAL!r} is reserved for the local filesystem")
    with _lock:
        _registered[filesystem.identifier] = filesystem


def reset_filesystems() -> None:
    """Forget registered filesystems and re-read `LUME_FILESYSTEMS` on the next lookup."""
    global _from_env
    with _lock:
        _from_env = None
        _registered.clear()
