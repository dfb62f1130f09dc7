"""One walk into JSON-like values by keys and list indices, for every reader of results.

FlowOfFlows `attributeIndex`, declared result names (`stats.mean`), DB result documents and the
results CLI all address a part of a stored value the same way, and say the same thing when it
is not there. Keys that are digits index lists (YAML authors write `0` or `"0"`); an int key
also finds a dict entry by its string form.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

_INDEX = re.compile(r"-?\d+")


class KeyPathError(LookupError):
    """A key or index that does not resolve; the message names where and what is there."""

    def __init__(self, at: str, reason: str) -> None:
        super().__init__(f"{at}: {reason}" if at else reason)
        self.at, self.reason = at, reason


def render(keys: Sequence[str | int]) -> str:
    """`['stats']['mean'][0]`: a path as Python would index it."""
    return "".join(f"[{key!r}]" for key in keys)


def split(path: str | None) -> list[str]:
    """A dotted path (`stats.mean.0`) as keys; empty or 'return' is the whole value."""
    return [] if not path or path == "return" else path.split(".")


def list_index(key: str | int) -> int | None:
    if isinstance(key, bool):
        return None
    if isinstance(key, int):
        return key
    return int(key) if _INDEX.fullmatch(key) else None


def walk(value: Any, keys: Sequence[str | int] | None) -> Any:
    """`value[k1][k2]...`, or KeyPathError naming the first key that does not resolve."""
    keys = list(keys or [])
    for depth, key in enumerate(keys):
        at = render(keys[: depth + 1])
        if isinstance(value, Mapping):
            found = key if key in value else str(key)
            if found not in value:
                have = ", ".join(repr(k) for k in list(value)[:10]) or "no keys"
                raise KeyPathError(at, f"no key {key!r} (has {have})")
            value = value[found]
        elif isinstance(value, list | tuple):
            index = list_index(key)
            if index is None:
                raise KeyPathError(at, f"{key!r} indexes a list, which needs a number")
            if not -len(value) <= index < len(value):
                raise KeyPathError(
                    at, f"index {index} is out of range (the list has {len(value)} items)"
                )
            value = value[index]
        else:
            raise KeyPathError(at, f"cannot index a {type(value).__name__}")
    return value
