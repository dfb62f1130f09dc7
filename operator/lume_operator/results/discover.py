"""Find the File descriptions in a flow's return value, to record them as named results."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

# What `File.description()` holds; files.py takes it from here. This module does not import
# files.py: that imports lume-base (about 2 s: scipy, matplotlib), which the operator and the
# CLI need only once a result names a file.
DESCRIPTION_KEYS = ("filename", "filesystem_identifier", "file_type_string")
_KEYS = frozenset(DESCRIPTION_KEYS)


def is_file_description(value: Any) -> bool:
    """A dict with exactly the description keys, all strings (what `File.description()` makes)."""
    return (
        isinstance(value, dict)
        and value.keys() == _KEYS
        and all(isinstance(item, str) for item in value.values())
    )


def find_values(
    value: Any,
    matches: Callable[[Any], bool],
    prefix: str = "",
    convert: Callable[[Any], Any] | None = None,
) -> list[tuple[str, Any]]:
    """`(key path, value)` for every nested value that `matches`, in traversal order.

    Key paths match `ResultSpec.name` ('summary', 'outputs.0'); a value that itself matches is
    named 'return'. `convert` is applied to each value before it is tested.
    """
    if convert is not None:
        value = convert(value)
    if matches(value):
        return [(prefix or "return", value)]
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return []
    found: list[tuple[str, Any]] = []
    for key, item in items:
        path = f"{prefix}.{key}" if prefix else str(key)
        found.extend(find_values(item, matches, path, convert))
    return found


def _description_of_file(value: Any) -> Any:
    files = sys.modules.get(f"{__package__}.files")  # not imported: no File can exist
    return value.description() if files and isinstance(value, files.File) else value


def find_file_descriptions(value: Any, prefix: str = "") -> list[tuple[str, dict[str, Any]]]:
    """`(key path, description)` for every File in `value`, in traversal order.

    File objects count too, in case a flow returns them unconverted.
    """
    return find_values(value, is_file_description, prefix, _description_of_file)
