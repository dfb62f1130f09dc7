"""File results: a JSON description of a file plus the serializer that reads and writes it.

Flows return descriptions instead of data so results survive the flow run, can be recorded in
Kubernetes status and loaded again anywhere the filesystem is reachable.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Self, TypeVar

import h5py
import numpy as np
from lume.serializers.base import SerializerBase
from lume.serializers.hdf5 import HDF5Serializer as LumeHDF5Serializer
from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

from .discover import DESCRIPTION_KEYS
from .filesystems import (
    RESULTS_FILESYSTEM_ENV,
    Filesystem,
    FilesystemError,
    default_identifier,
    get_filesystem,
    results_dir,
)

SerializerT = TypeVar("SerializerT", bound=SerializerBase)


class ResultFileNotFoundError(FileNotFoundError):
    """A described result file is missing: names the description's filename and filesystem."""


class FileDescriptionError(ValueError):
    """A File description cannot be turned back into a File."""


class UnknownFileTypeError(FileDescriptionError):
    """The description's file type is neither registered nor a `File[module:Serializer]`."""


class FileTypeImportError(FileDescriptionError):
    """A `File[module:Serializer]` type names a module or serializer that cannot be imported."""


_FILE_TYPE_PATTERN = re.compile(r"^File\[(?P<module>[\w.]+):(?P<qualname>[\w.]+)\]$")
_types_lock = threading.RLock()
_types_by_name: dict[str, type[File[Any]]] = {}
_names_by_type: dict[type[File[Any]], str] = {}


def _generic_type_string(serializer: type[SerializerBase]) -> str:
    return f"File[{serializer.__module__}:{serializer.__qualname__}]"


def _serializer_of(cls: type) -> type[SerializerBase] | None:
    """The serializer `cls` was parametrized with, searching bases for `class X(File[S])`."""
    for klass in cls.__mro__:
        metadata = getattr(klass, "__pydantic_generic_metadata__", None)
        if not metadata or metadata["origin"] is not File or not metadata["args"]:
            continue
        argument = metadata["args"][0]
        if isinstance(argument, type) and issubclass(argument, SerializerBase):
            return argument
    return None


def register_file_type(cls: type[File[Any]], name: str) -> type[File[Any]]:
    """Give a File type a short description name (e.g. "HDF5File") that `load_file` accepts.

    Also for `class MyFile(File[S])` subclasses, which otherwise load back as plain `File[S]`.
    """
    if _serializer_of(cls) is None:
        raise TypeError(f"{cls.__name__} is not parametrized with a serializer")
    with _types_lock:
        existing = _types_by_name.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"file type {name!r} is already registered to {existing!r}")
        _types_by_name[name] = cls
        _names_by_type[cls] = name
    return cls


def _register_parametrization(cls: type[File[Any]], serializer: type[SerializerBase]) -> None:
    # Strong references: pydantic caches File[S] only weakly, and File[S] must stay one class.
    # The latest definition wins the derived name, so module reloads keep working.
    with _types_lock:
        generic_name = _generic_type_string(serializer)
        _types_by_name[generic_name] = cls
        _names_by_type.setdefault(cls, generic_name)


def file_type(type_string: str) -> type[File[Any]]:
    """The File class a description's `file_type_string` names, importing it if needed."""
    with _types_lock:
        cls = _types_by_name.get(type_string)
    if cls is not None:
        return cls
    match = _FILE_TYPE_PATTERN.match(type_string)
    if match is None:
        named = sorted(name for name in _types_by_name if not name.startswith("File["))
        raise UnknownFileTypeError(
            f"unknown file type {type_string!r} in file description "
            f"(known: {', '.join(named + ['File[<module>:<Serializer>]'])})"
        )
    module_name, qualname = match["module"], match["qualname"]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise FileTypeImportError(
            f"cannot import module {module_name!r} for file type {type_string!r}: {error}"
        ) from error
    serializer: Any = module
    try:
        for part in qualname.split("."):
            serializer = getattr(serializer, part)
    except AttributeError:
        raise FileTypeImportError(
            f"module {module_name!r} has no serializer {qualname!r} (file type {type_string!r})"
        ) from None
    if not (isinstance(serializer, type) and issubclass(serializer, SerializerBase)):
        raise FileTypeImportError(
            f"{module_name}:{qualname} is not a SerializerBase subclass (file type {type_string!r})"
        )
    return File[serializer]  # type: ignore[valid-type]


class File(BaseModel, Generic[SerializerT]):
    """A result file written and read by the serializer `File` is parametrized with.

    Define a file type with `CSVFile = File[CSVSerializer]`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    filename: str
    # Not given: the configured filesystem whose root holds the filename (the backend's result
    # storage in its runs, so `HDF5File(filename=result_path(...))` lands there), else local.
    filesystem_identifier: str = Field(
        default_factory=lambda data: default_identifier(data.get("filename") or "")
    )

    def __class_getitem__(cls, params: Any) -> Any:
        if isinstance(params, type) and not issubclass(params, SerializerBase):
            raise TypeError(f"File[...] needs a SerializerBase subclass, got {params!r}")
        parametrized = super().__class_getitem__(params)
        if cls is File and isinstance(params, type):
            _register_parametrization(parametrized, params)
        return parametrized

    @model_validator(mode="before")
    @classmethod
    def _check_type(cls, data: Any) -> Any:
        if _serializer_of(cls) is None:
            raise TypeError(
                "File has no serializer: use a parametrized type such as TextFile, HDF5File or "
                "File[MySerializer]"
            )
        if isinstance(data, dict) and "file_type_string" in data:
            # Accept our own model_dump() back, but only for the matching type.
            data = dict(data)
            given = data.pop("file_type_string")
            if given != cls.type_string():
                raise ValueError(f"file_type_string {given!r} does not match {cls.type_string()!r}")
        return data

    @classmethod
    def type_string(cls) -> str:
        """The name descriptions use for this type: registered short name or `File[mod:Qual]`."""
        serializer = _serializer_of(cls)
        if serializer is None:
            raise TypeError("unparametrized File has no file type string")
        with _types_lock:
            name = _names_by_type.get(cls)
        return name if name is not None else _generic_type_string(serializer)

    @classmethod
    def serializer_class(cls) -> type[SerializerBase]:
        serializer = _serializer_of(cls)
        if serializer is None:
            raise TypeError("unparametrized File has no serializer")
        return serializer

    @computed_field  # type: ignore[prop-decorator]
    @property
    def file_type_string(self) -> str:
        return type(self).type_string()

    @property
    def filesystem(self) -> Filesystem:
        return get_filesystem(self.filesystem_identifier)

    @property
    def path(self) -> Path:
        """The local path of the file in this process (an object store's files have none)."""
        return self.filesystem.resolve(self.filename)

    def exists(self) -> bool:
        return self.filesystem.exists(self.filename)

    def write(self, obj: Any) -> Self:
        """Serialize `obj` to the file atomically: readers see the old file or the new one
        (staged locally, then renamed into place or uploaded whole)."""
        with self.filesystem.writing(self.filename) as staged:
            self.serializer_class()().serialize(str(staged), obj)
        return self

    def read(self) -> Any:
        filesystem = self.filesystem
        with contextlib.ExitStack() as stack:
            try:
                path = stack.enter_context(filesystem.reading(self.filename))
            except FileNotFoundError:
                path = None  # an object store's file that is not there
            if path is not None:
                try:
                    return self.serializer_class()().deserialize(str(path))
                except Exception:
                    # Checked only on failure: a stat per read is a visible share of a small read.
                    if path.exists():
                        raise
        try:
            where = str(filesystem.resolve(self.filename))
        except FilesystemError:
            where = self.filename
        where = "" if where == self.filename else f" at {where!r}"
        raise ResultFileNotFoundError(
            f"result file {self.filename!r} (filesystem {self.filesystem_identifier!r}) "
            f"does not exist{where}"
        )

    def description(self) -> dict[str, str]:
        """The JSON-able form flows return and Kubernetes status records."""
        return {
            "filename": self.filename,
            "filesystem_identifier": self.filesystem_identifier,
            "file_type_string": self.file_type_string,
        }

    def __reduce__(self) -> Any:
        # Pickle (Prefect results, multiprocessing) by description: File[S] is not importable
        # by name, but load_file can rebuild it.
        return (load_file, (self.description(),))


def _valid_description(description: dict[str, Any] | str) -> dict[str, str]:
    """A description's three strings, or FileDescriptionError saying what is wrong."""
    if isinstance(description, str):
        try:
            description = json.loads(description)
        except json.JSONDecodeError as error:
            raise FileDescriptionError(f"file description is not valid JSON: {error}") from None
    if not isinstance(description, dict):
        raise FileDescriptionError(
            f"file description must be a JSON object, got {type(description).__name__}"
        )
    missing = [key for key in DESCRIPTION_KEYS if key not in description]
    extra = sorted(str(key) for key in description if key not in DESCRIPTION_KEYS)
    if missing or extra:
        problems = []
        if missing:
            problems.append(f"missing keys: {', '.join(missing)}")
        if extra:
            problems.append(f"unexpected keys: {', '.join(extra)}")
        raise FileDescriptionError(f"invalid file description ({'; '.join(problems)})")
    not_strings = [key for key in DESCRIPTION_KEYS if not isinstance(description[key], str)]
    if not_strings:
        raise FileDescriptionError(
            f"invalid file description (not strings: {', '.join(not_strings)})"
        )
    return description


def load_file(description: dict[str, Any] | str) -> File[Any]:
    """Rebuild the File a description (dict or its JSON string) was made from.

    It imports the module a `File[module:Serializer]` names: only for descriptions the caller
    trusts (its own flows). To check one read back from storage, use `described_file`.
    """
    description = _valid_description(description)
    cls = file_type(description["file_type_string"])
    return cls(
        filename=description["filename"],
        filesystem_identifier=description["filesystem_identifier"],
    )


class TextSerializer(SerializerBase):
    """UTF-8 text, byte-exact: newlines are not translated."""

    def serialize(self, filename: str, data: str) -> None:
        if not isinstance(data, str):
            raise TypeError(f"TextFile holds str, got {type(data).__name__}")
        with open(filename, "w", encoding="utf-8", newline="") as handle:
            handle.write(data)

    @classmethod
    def deserialize(cls, filename: str) -> str:
        with open(filename, encoding="utf-8", newline="") as handle:
            return handle.read()


_KIND_ATTR = "lume_operator.kind"
_LIST_ATTR = "lume_operator.list"
_ARRAY_DATASET = "data"


class HDF5Serializer(SerializerBase):
    """Arrays, nested dicts and lume `Base` objects in plain HDF5, readable by any h5py user.

    An array is a root dataset "data" and nothing else (HDF5 attributes cost ~100us each, which
    matters for small arrays). Dicts become groups, marked by a root attribute; arrays and lists
    become datasets; scalars, strings and None become attributes. No compression or chunking.
    """

    def serialize(self, filename: str, data: Any) -> None:
        if isinstance(data, np.ndarray | np.generic):
            with h5py.File(filename, "w") as h5:
                h5.create_dataset(_ARRAY_DATASET, data=data)
            return
        if isinstance(data, dict):
            with h5py.File(filename, "w") as h5:
                h5.attrs[_KIND_ATTR] = "dict"
                _write_group(h5, data, "")
            return
        if callable(getattr(data, "archive", None)):
            LumeHDF5Serializer().serialize(filename, data)
            return
        raise TypeError(
            f"HDF5File holds a numpy array, a dict or an object with .archive(h5), "
            f"got {type(data).__name__}"
        )

    @classmethod
    def deserialize(cls, filename: str) -> Any:
        with h5py.File(filename, "r") as h5:
            # Cheapest checks first: h5a.get_num_attrs is ~10x faster than len(h5.attrs).
            if len(h5) == 1 and h5py.h5a.get_num_attrs(h5.id) == 0:
                member = h5.get(_ARRAY_DATASET)
                if isinstance(member, h5py.Dataset):
                    return _read_dataset(member)
            if _KIND_ATTR in h5.attrs or "object" not in h5.attrs:
                # Ours, or a foreign HDF5 file: read the whole tree.
                return _read_group(h5)
        # Written by lume's serializer, which records the class to rebuild in attrs["object"].
        return LumeHDF5Serializer.deserialize(filename)


def _write_group(group: h5py.Group, data: dict[Any, Any], path: str) -> None:
    for key, value in data.items():
        where = f"{path}/{key}" if path else str(key)
        if not isinstance(key, str) or not key or "/" in key or key == ".":
            raise TypeError(f"HDF5File keys must be non-empty str without '/', got {where!r}")
        if key in (_KIND_ATTR, _LIST_ATTR):
            raise ValueError(f"HDF5File key {where!r} is reserved")
        if isinstance(value, dict):
            _write_group(group.create_group(key), value, where)
        elif isinstance(value, np.ndarray):
            _create_dataset(group, key, value, where)
        elif isinstance(value, list | tuple):
            dataset = _create_dataset(group, key, value, where)
            dataset.attrs[_LIST_ATTR] = True
        elif value is None:
            group.attrs[key] = h5py.Empty("f")
        elif isinstance(value, str):
            group.attrs[key] = str(value)  # np.str_ has no HDF5 conversion
        elif isinstance(value, bool | int | float | complex | np.generic):
            group.attrs[key] = value
        else:
            raise TypeError(f"HDF5File cannot store {type(value).__name__} at {where!r}")


def _create_dataset(group: h5py.Group, key: str, value: Any, where: str) -> h5py.Dataset:
    array = np.asarray(value)
    if array.dtype.kind == "U":
        array = array.astype(h5py.string_dtype())
    elif array.dtype.kind == "O":
        raise TypeError(f"HDF5File cannot store ragged or mixed sequence at {where!r}")
    return group.create_dataset(key, data=array)


def _read_group(group: h5py.Group) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in group.attrs.items():
        if key == _KIND_ATTR:
            continue
        if isinstance(value, h5py.Empty):
            result[key] = None
        elif isinstance(value, bytes):
            result[key] = value.decode("utf-8", errors="replace")
        elif isinstance(value, np.generic):
            result[key] = value.item()
        else:
            result[key] = value
    for key, member in group.items():
        if isinstance(member, h5py.Group):
            result[key] = _read_group(member)
            continue
        value = _read_dataset(member)
        result[key] = value.tolist() if _LIST_ATTR in member.attrs else value
    return result


def _read_dataset(dataset: h5py.Dataset) -> Any:
    if h5py.check_string_dtype(dataset.dtype) is not None:
        return dataset.asstr()[()]
    return dataset[()]


TextFile = register_file_type(File[TextSerializer], "TextFile")
HDF5File = register_file_type(File[HDF5Serializer], "HDF5File")


def result_path(name: str) -> str:
    """Where a result named `name` goes: under the backend's result storage when its runs
    have one (`<root>/<flow run id>/<name>`, an object store URL or a path in the shared
    volume), else under `results_dir()`. `name` may not escape either."""
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ValueError(f"result name must be a relative path inside the results dir: {name!r}")
    identifier = os.environ.get(RESULTS_FILESYSTEM_ENV)
    if identifier:
        root = get_filesystem(identifier).root
        if root is None:
            raise FilesystemError(
                f"{RESULTS_FILESYSTEM_ENV}={identifier!r} names a filesystem without a root"
            )
        return f"{root.rstrip('/')}/{_run_folder()}/{relative.as_posix()}"
    return str(results_dir() / relative)


def _run_folder() -> str:
    """The flow run's id (each run its own folder in a shared storage), as Prefect's workers
    set it; inside a flow without one, Prefect's runtime; else a fresh id (never a clash)."""
    run_id = os.environ.get("PREFECT__FLOW_RUN_ID")
    if not run_id:
        from prefect.runtime import flow_run  # only outside a worker's run: Prefect loaded

        run_id = flow_run.id
    return str(run_id or uuid.uuid4())


@dataclass(frozen=True)
class DescribedFile:
    """What a description says and whether its file is there, known without its class."""

    filename: str
    filesystem_identifier: str
    file_type_string: str
    exists: bool


def described_file(
    description: dict[str, Any] | str, on: Filesystem | None = None
) -> DescribedFile:
    """Check a description as data: its keys, a file type that is known or well-formed
    (`File[module:Serializer]`, never imported here), and whether its file exists.

    `on`: the only filesystem the caller reads (a backend's declared result storage, as the
    operator reaches it): a description naming another, or a file outside its root, is
    refused rather than looked up where the stored data says.
    """
    description = _valid_description(description)
    type_string = description["file_type_string"]
    with _types_lock:
        known = type_string in _types_by_name
    if not known and _FILE_TYPE_PATTERN.match(type_string) is None:
        file_type(type_string)  # raises UnknownFileTypeError, naming the known types
    identifier, filename = description["filesystem_identifier"], description["filename"]
    if on is None:
        filesystem = get_filesystem(identifier)
    elif identifier != on.identifier:
        raise FileDescriptionError(
            f"file {filename!r} is on filesystem {identifier!r}, not the backend's result "
            f"storage {on.identifier!r}"
        )
    elif not on.contains(filename):
        raise FileDescriptionError(
            f"file {filename!r} is outside the backend's result storage {on.root!r}"
        )
    else:
        filesystem = on
    return DescribedFile(filename, identifier, type_string, filesystem.exists(filename))
