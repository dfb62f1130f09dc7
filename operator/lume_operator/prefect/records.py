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
    """The value in a result record's bytes; ResultRefused unless JSON throughout."""
    try:
        record = json.loads(content)
    except ValueError:
        raise ResultRefused(f"{where} is not a JSON result record") from None
    metadata = record.get("metadata") if isinstance(record, dict) else None
    serializer = (metadata or {}).get("serializer") if isinstance(metadata, dict) else None
    refuse_unless_json(serializer.get("type") if isinstance(serializer, dict) else None, where)
    result = record.get("result")
    if isinstance(result, str):
        try:
            return loads(result) if serializer.get("type") == TYPE else json.loads(result)
        except ValueError:
            raise ResultRefused(f"{where}: its value is not JSON") from None
    return result
