"""Filesystems that File results live on, looked up by identifier.

A File description names its filesystem by identifier only, so the same description can be
read by processes that see the data at different local paths (a laptop, a pod with a volume),
or through their own credentials (an object store).
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import secrets
import shutil
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    field_validator,
)

ENV_VAR = "LUME_FILESYSTEMS"
RESULTS_DIR_ENV = "LUME_RESULTS_DIR"
# The filesystem (identifier) `result_path` puts results on, when not the local results dir:
# the backend's declared result storage (an object store, a shared volume), set in its runs.
RESULTS_FILESYSTEM_ENV = "LUME_RESULTS_FILESYSTEM"
LOCAL = "local"


def results_dir() -> Path:
    """The directory flows write results into: `$LUME_RESULTS_DIR`, else `./results`."""
    directory = Path(os.environ.get(RESULTS_DIR_ENV) or "results").absolute()
    directory.mkdir(parents=True, exist_ok=True)
    return directory


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
    """A filename is not under a mounted filesystem's alias (or an object store's URL), so it
    cannot be mapped."""


class StorageUnreachableError(FilesystemError, ConnectionError):
    """An object store did not answer (connection refused, timeout, 5xx): try again later."""


class StorageAccessDeniedError(FilesystemError, PermissionError):
    """An object store refused the credentials (403), or there were none."""


class Filesystem(BaseModel, ABC):
    """Where File results are stored; maps description filenames to local paths."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    identifier: str = Field(min_length=1)

    @abstractmethod
    def resolve(self, filename: str) -> Path:
        """The local path to open for `filename` as written in a description."""

    @property
    def root(self) -> str | None:
        """Where its filenames start (a mount alias, an object store URL); None: anywhere."""
        return None

    def contains(self, filename: str) -> bool:
        """Whether `filename` names a file on this filesystem (under its root)."""
        root = self.root
        if root is None:
            return False
        normalized = _normalized(filename)
        return normalized is not None and (
            normalized == root or normalized.startswith(root.rstrip("/") + "/")
        )

    def exists(self, filename: str) -> bool:
        return self.resolve(filename).exists()

    def read_bytes(self, filename: str) -> bytes:
        return self.resolve(filename).read_bytes()

    def size(self, filename: str) -> int:
        return self.resolve(filename).stat().st_size

    @contextlib.contextmanager
    def reading(self, filename: str) -> Iterator[Path]:
        """A local path holding the file's content while the block runs."""
        yield self.resolve(filename)

    @contextlib.contextmanager
    def writing(self, filename: str) -> Iterator[Path]:
        """A local path to write; it becomes `filename` when the block ends without error, at
        once (readers see the old file or the new one, never a part).

        The staged file is a hidden sibling that keeps the target's extension (for serializers
        that sniff or append it), renamed over the target.
        """
        path = self.resolve(filename)
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_name(f".{path.stem}.{secrets.token_hex(6)}.partial{path.suffix}")
        try:
            yield staged
            os.replace(staged, path)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise


def _normalized(filename: str) -> str | None:
    """A filename with '.', '..' and '//' resolved (an absolute path or a URL), or None."""
    scheme, sep, rest = filename.partition("://")
    if sep:
        if not rest or rest.startswith("/"):
            return None
        return f"{scheme}://{posixpath.normpath(rest)}"
    return posixpath.normpath(filename) if filename.startswith("/") else None


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

    @property
    def root(self) -> str:
        return self.mount_alias


class ObjectStoreFilesystem(Filesystem):
    """An S3-protocol object store (AWS S3, MinIO, Ceph) under `url` (s3://bucket/prefix).

    Filenames are whole URLs, the same for every reader; each reads with its own credentials:
    a flow run with the ambient ones (its environment, from a Secret by reference), the
    operator with those it read from the Secret itself (`with_credentials`, kept out of every
    dump and repr). Files are written to a local temporary file, then uploaded whole.
    """

    type: Literal["objectStore"] = "objectStore"
    url: str = Field(pattern=r"^s3://[^/\s]+(/\S*)?$")
    endpoint_url: str | None = None
    region: str | None = None
    _credentials: tuple[str, str] | None = PrivateAttr(default=None)
    _profile: str | None = PrivateAttr(default=None)

    @field_validator("url")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")

    def with_credentials(self, access_key_id: str, secret_access_key: str) -> Self:
        """This store, read with these keys rather than the ambient ones."""
        copy = self.model_copy()
        copy._credentials = (access_key_id, secret_access_key)
        return copy

    def with_profile(self, profile: str) -> Self:
        """This store, read with a profile of the standard AWS configuration."""
        copy = self.model_copy()
        copy._profile = profile
        return copy

    @property
    def root(self) -> str:
        return self.url

    def options(self) -> dict[str, Any]:
        """fsspec's storage options without credentials: what a Prefect block may hold."""
        options: dict[str, Any] = {}
        if self.endpoint_url:
            options["endpoint_url"] = self.endpoint_url
        if self.region:
            options["client_kwargs"] = {"region_name": self.region}
        return options

    def filesystem(self) -> Any:
        """The s3fs filesystem (imported here: only object-store users pay for it)."""
        import s3fs

        options = self.options()
        if self._credentials is not None:
            options["key"], options["secret"] = self._credentials
        if self._profile is not None:
            options["profile"] = self._profile
        # Bounded waits: a store that does not answer fails a read in seconds, not minutes.
        options["config_kwargs"] = {
            "connect_timeout": 5,
            "read_timeout": 30,
            "retries": {"max_attempts": 2},
        }
        return s3fs.S3FileSystem(**options)

    def key(self, filename: str) -> str:
        """`bucket/path` of a filename under this store's URL; PathOutsideMountError if not."""
        if not self.contains(filename):
            raise PathOutsideMountError(
                f"filename {filename!r} is not under {self.url!r} (filesystem {self.identifier!r})"
            )
        normalized = _normalized(filename)
        assert normalized is not None
        return normalized.removeprefix("s3://")

    def resolve(self, filename: str) -> Path:
        raise FilesystemError(
            f"{filename!r} is in the object store {self.url!r}: it has no local path "
            "(File.read() and File.write() download and upload it)"
        )

    def exists(self, filename: str) -> bool:
        key = self.key(filename)
        with self._errors(filename):
            return bool(self.filesystem().exists(key))

    def read_bytes(self, filename: str) -> bytes:
        key = self.key(filename)
        with self._errors(filename):
            return bytes(self.filesystem().cat_file(key))

    def size(self, filename: str) -> int:
        key = self.key(filename)
        with self._errors(filename):
            return int(self.filesystem().size(key))

    @contextlib.contextmanager
    def reading(self, filename: str) -> Iterator[Path]:
        key = self.key(filename)
        directory = tempfile.mkdtemp(prefix="lume-read-")
        try:
            local = Path(directory) / posixpath.basename(key)
            with self._errors(filename):
                self.filesystem().get_file(key, str(local))
            yield local
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    @contextlib.contextmanager
    def writing(self, filename: str) -> Iterator[Path]:
        key = self.key(filename)
        directory = tempfile.mkdtemp(prefix="lume-write-")
        try:
            local = Path(directory) / posixpath.basename(key)
            yield local
            with self._errors(filename):
                self.filesystem().put_file(str(local), key)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    @contextlib.contextmanager
    def _errors(self, filename: str) -> Iterator[None]:
        """The store's failures as this module's errors, each naming the file (never a key)."""
        try:
            yield
        except FileNotFoundError:
            raise
        except PermissionError as error:
            raise StorageAccessDeniedError(
                f"the object store refused access to {filename!r}: {_first_line(error)} (check "
                "the credentials and the bucket's policy)"
            ) from None
        except Exception as error:
            if _unreachable(error):
                where = self.endpoint_url or "S3"
                raise StorageUnreachableError(
                    f"cannot reach the object store at {where} for {filename!r}: "
                    f"{type(error).__name__}: {_first_line(error)}"
                ) from None
            if type(error).__name__ == "NoCredentialsError":
                raise StorageAccessDeniedError(
                    f"no credentials to read {filename!r} in the object store: set "
                    "credentialsSecretRef on the backend, or AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY (or an AWS profile) here"
                ) from None
            raise FilesystemError(
                f"object store error for {filename!r}: {type(error).__name__}: {_first_line(error)}"
            ) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _unreachable(error: BaseException) -> bool:
    """Transport trouble (refused, reset, timeout, 5xx, throttling), by name: botocore and
    aiohttp are imported only by object-store users."""
    seen: BaseException | None = error
    while seen is not None:
        name = type(seen).__name__
        if name in (
            "EndpointConnectionError",
            "ConnectTimeoutError",
            "ReadTimeoutError",
            "ConnectionClosedError",
            "ClientConnectorError",
            "ServerDisconnectedError",
            "ServerTimeoutError",
        ) or isinstance(seen, ConnectionError | TimeoutError):
            return True
        text = str(seen)
        if any(code in text for code in ("(500)", "(502)", "(503)", "(504)", "SlowDown")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


AnyFilesystem = Annotated[
    LocalFilesystem | MountedFilesystem | ObjectStoreFilesystem, Field(discriminator="type")
]
_entry_adapter: TypeAdapter[LocalFilesystem | MountedFilesystem | ObjectStoreFilesystem] = (
    TypeAdapter(AnyFilesystem)
)


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


def default_identifier(filename: str) -> str:
    """The filesystem a File is on when it names none: the configured one whose root holds
    `filename` (an object store URL, a volume's mount alias), else local."""
    if not _registered and not _env_filesystems():
        return LOCAL
    for identifier, filesystem in configured_filesystems().items():
        if identifier != LOCAL and filesystem.contains(filename):
            return identifier
    return LOCAL


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
