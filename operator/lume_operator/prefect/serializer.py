"""Flow return values as JSON that lume-operator reads back without pickle and without imports.

Prefect's JSON serializer cannot encode numpy arrays (the run's result is then never written)
and its decoder imports any class a stored value names. `lume-json` writes numpy arrays and
scalars as `{"__lume__": "ndarray", "dtype", "shape", "data"}` and `{"__lume__": "scalar",
"dtype", "data"}`, and any other value JSON cannot hold as `{"__lume__": "unencodable", "path",
"type"}`, so the run's status can say which value to change; `decode` is the only decoder, and
it builds numpy values from a dtype name, never from a module named in the data.

A flow-run process learns the `lume-json` type by importing this module (the local runner's
engine command, `lume_operator.local.engine`, does) and uses it through
PREFECT_RESULTS_DEFAULT_SERIALIZER (`LOCAL_RESULT_ENV`).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from prefect.serializers import JSONSerializer
from pydantic import Field

TYPE = "lume-json"
MARK = "__lume__"
# numpy kinds that round-trip through JSON: bool, signed, unsigned, float, unicode.
_KINDS = "biufU"
LOCAL_RESULT_ENV = {"PREFECT_RESULTS_DEFAULT_SERIALIZER": TYPE}
INSTEAD = (
    "return JSON types (dict, list, str, int, float, bool, None), numpy arrays or scalars, "
    "or a File description (File.description()) for anything else"
)


def _type_name(value: Any) -> str:
    kind = type(value)
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


def encode(value: Any, path: str = "") -> Any:
    """`value` as plain JSON data, numpy values marked, anything else marked unencodable."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, dict):
        return {
            str(key): encode(item, f"{path}.{key}" if path else str(key))
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [
            encode(item, f"{path}.{index}" if path else str(index))
            for index, item in enumerate(value)
        ]
    described = _type_name(value)
    # A numpy value exists only where numpy was imported: a flow that never imported it does
    # not pay its import (0.1 CPU-s) to store a dict.
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, np.ndarray | np.generic):
        if value.dtype.kind not in _KINDS:
            described += f" of dtype {value.dtype}"
        elif isinstance(value, np.ndarray):
            return {
                MARK: "ndarray",
                "dtype": value.dtype.str,
                "shape": list(value.shape),
                "data": value.tolist(),
            }
        else:
            return {MARK: "scalar", "dtype": value.dtype.str, "data": value.item()}
    return {MARK: "unencodable", "path": path or "return", "type": described}


def decode(data: dict[str, Any]) -> Any:
    """`json.loads` object hook: numpy values back from their marks; everything else as is."""
    mark = data.get(MARK)
    if mark not in ("ndarray", "scalar"):
        return data
    import numpy as np

    try:
        dtype = np.dtype(str(data["dtype"]))
        if dtype.kind not in _KINDS:
            return data
        if mark == "scalar":
            return dtype.type(data["data"])
        return np.asarray(data["data"], dtype=dtype).reshape(data["shape"])
    except (KeyError, TypeError, ValueError):
        return data


def loads(blob: bytes | str) -> Any:
    """Stored JSON back to values, with `decode` as the only object hook."""
    return json.loads(blob, object_hook=decode)


def is_unencodable(value: Any) -> bool:
    return isinstance(value, dict) and value.get(MARK) == "unencodable"


def unencodable_message(mark: dict[str, Any]) -> str:
    """The sentence for a value the flow returned that JSON cannot hold."""
    return (
        f"the flow's return value at {mark.get('path')!r} is a {mark.get('type')}, which "
        f"cannot be stored as JSON: {INSTEAD}"
    )


class LumeJSONSerializer(JSONSerializer):
    """Prefect's serializer type `lume-json`: `encode` to write, `decode` (only) to read."""

    type: str = Field(default=TYPE, frozen=True)

    def dumps(self, obj: Any) -> bytes:
        return json.dumps(encode(obj)).encode()

    def loads(self, blob: bytes) -> Any:
        return loads(blob)
