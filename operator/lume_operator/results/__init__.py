"""File results of flows: descriptions, serializers and the filesystems they live on.

Prefect tasks are in `lume_operator.results.tasks`, kept out of here so this imports fast.
"""

from .discover import find_file_descriptions, is_file_description
from .files import (
    File,
    FileDescriptionError,
    FileTypeImportError,
    HDF5File,
    HDF5Serializer,
    ResultFileNotFoundError,
    SerializerT,
    TextFile,
    TextSerializer,
    UnknownFileTypeError,
    file_type,
    load_file,
    register_file_type,
    result_path,
    results_dir,
)
from .filesystems import (
    Filesystem,
    FilesystemConfigError,
    FilesystemError,
    LocalFilesystem,
    MountedFilesystem,
    PathOutsideMountError,
    UnknownFilesystemError,
    configured_filesystems,
    get_filesystem,
    parse_filesystems_config,
    register_filesystem,
    reset_filesystems,
)

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
    "PathOutsideMountError",
    "ResultFileNotFoundError",
    "SerializerT",
    "TextFile",
    "TextSerializer",
    "UnknownFileTypeError",
    "UnknownFilesystemError",
    "configured_filesystems",
    "file_type",
    "find_file_descriptions",
    "get_filesystem",
    "is_file_description",
    "load_file",
    "parse_filesystems_config",
    "register_file_type",
    "register_filesystem",
    "reset_filesystems",
    "result_path",
    "results_dir",
]
