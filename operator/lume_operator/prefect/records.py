"""Prefect's persisted result records, read as data: JSON only, nothing unpickled or imported.

A record names the serializer that wrote it. Prefect's own reader trusts that name (pickle
runs code; its JSON decoder imports any class a value names), so a flow returning a crafted
object could run code in whoever reads it: the operator, which holds cluster-wide rights, or
a user's `lume-operator results get`. Here a record is parsed with the standard `json`
module alone, and any serializer but JSON is refused with a message saying what to return.
"""

from __future__ import annotations

import json
from typing import Any

from lume_operator.prefect.port import PrefectRejected
from lume_operator.prefect.serializer import TYPE, loads


class ResultRefused(PrefectRejected):
    """A stored result lume-operator will not read: not JSON, or not a result record."""

    reason = "ResultRefused"


# Serializers whose records are read: Prefect's JSON, parsed with `json` alone, and
# lume-operator's own (numpy values), parsed with its fixed decoder.
READABLE = ("json", TYPE)


def refuse_unless_json(serializer: str | None, where: str) -> None:
    if serializer not in READABLE:
        raise ResultRefused(
            f"{where} is stored with the {serializer!r} serializer; lume-operator reads only "
            "JSON results (it never unpickles): return JSON values and File descriptions, "
            "with result_serializer='json' (the default lume-operator sets)"
        )


def json_result(content: bytes, where: str) -> Any:
    """The value in a stored result: a record's (ResultRefused unless JSON throughout), or a
    bare JSON value (Prefect may keep the metadata apart). Parsed with lume-operator's fixed
    decoder only, which restores numpy values from their marks and imports nothing."""
    try:
        data = loads(content)
    except (ValueError, UnicodeDecodeError):
        raise ResultRefused(f"{where} is not JSON (stored with another serializer?)") from None
    metadata = data.get("metadata") if isinstance(data, dict) else None
    if not (isinstance(metadata, dict) and "result" in data and "serializer" in metadata):
        return data
    serializer = metadata.get("serializer")
    kind = serializer.get("type") if isinstance(serializer, dict) else None
    refuse_unless_json(kind, where)
    result = data["result"]
    if isinstance(result, str):
        try:
            return loads(result) if kind == TYPE else json.loads(result)
        except ValueError:
            raise ResultRefused(f"{where}: its value is not JSON") from None
    return result
