"""File results of flows: descriptions, serializers and the filesystems they live on.

Prefect tasks are in `lume_operator.results.tasks`, kept out of here so this imports fast.
"""

import importlib
from typing import Any

# Each public name and the submodule that defines it. Imported on first use (PEP 562): the
# file types import lume-base (seconds: it imports scipy and matplotlib), which only code that
# reads or writes a File needs, not every importer of `lume_operator.results.store`.
_WHERE = {
    "find_file_descriptions": "discover",
    "is_file_description": "discover",
    **dict.fromkeys(
        [
            "File",
            "FileDescriptionError",
            "FileTypeImportError",
            "HDF5File",
            "HDF5Serializer",
            "ResultFileNotFoundError",
            "SerializerT",
            "TextFile",
            "TextSerializer",
            "UnknownFileTypeError",
            "described_file",
            "file_type",
            "load_file",
            "register_file_type",
            "result_path",
        ],
        "files",
    ),
    **dict.fromkeys(
        [
            "Filesystem",
            "FilesystemConfigError",
            "FilesystemError",
            "LocalFilesystem",
            "MountedFilesystem",
            "ObjectStoreFilesystem",
            "PathOutsideMountError",
            "StorageAccessDeniedError",
            "StorageUnreachableError",
            "UnknownFilesystemError",
            "configured_filesystems",
            "default_identifier",
            "get_filesystem",
            "parse_filesystems_config",
            "register_filesystem",
            "reset_filesystems",
            "results_dir",
        ],
        "filesystems",
    ),
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


__all__ = [
    "File",
    "FileDescriptionError",
    "FileTypeImportError",
    "Filesystem",
    "FilesystemConfigError",
    "FilesystemError",
    "HDF5File",
    "HDF5Serializer",
    "LocalFilesystem",
    "MountedFilesystem",
    "ObjectStoreFilesystem",
    "PathOutsideMountError",
    "ResultFileNotFoundError",
    "SerializerT",
    "StorageAccessDeniedError",
    "StorageUnreachableError",
    "TextFile",
    "TextSerializer",
    "UnknownFileTypeError",
    "UnknownFilesystemError",
    "configured_filesystems",
    "default_identifier",
    "file_type",
    "find_file_descriptions",
    "get_filesystem",
    "is_file_description",
    "described_file",
    "load_file",
    "parse_filesystems_config",
    "register_file_type",
    "register_filesystem",
    "reset_filesystems",
    "result_path",
    "results_dir",
]
