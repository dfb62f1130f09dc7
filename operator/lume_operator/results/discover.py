"""Find the File descriptions in a flow's return value, to record them as named results."""

from __future__ import annotations

from typing import Any

from .files import DESCRIPTION_KEYS, File

_KEYS = frozenset(DESCRIPTION_KEYS)


def is_file_description(value: Any) -> bool:
    """A dict with exactly the description keys, all strings (what `File.description()` makes)."""
    return (
        isinstance(value, dict)
        and value.keys() == _KEYS
        and all(isinstance(item, str) for item in value.values())
    )


def find_file_descriptions(value: Any, prefix: str = "") -> list[tuple[str, dict[str, Any]]]:
    """`(key path, description)` for every File in `value`, in traversal order.

    Key paths match `ResultSpec.name` ('summary', 'outputs.0'); a value that is itself a
    description is named 'return'. File objects count too, in case a flow returns them unconverted.
    """
    if isinstance(value, File):
        value = value.description()
    if is_file_description(value):
        return [(prefix or "return", value)]
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return []
    found: list[tuple[str, dict[str, Any]]] = []
    for key, item in items:
        found.extend(find_file_descriptions(item, f"{prefix}.{key}" if prefix else str(key)))
    return found
