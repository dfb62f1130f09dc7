"""Find the File descriptions in a flow's return value, to record them as named results."""

from __future__ import annotations

from collections.abc import Callable
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
    return value.description() if isinstance(value, File) else value


def find_file_descriptions(value: Any, prefix: str = "") -> list[tuple[str, dict[str, Any]]]:
    """`(key path, description)` for every File in `value`, in traversal order.

    File objects count too, in case a flow returns them unconverted.
    """
    return find_values(value, is_file_description, prefix, _description_of_file)
