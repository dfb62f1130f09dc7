"""kstatus conditions: Ready, Reconciling, Stalled, plus a kind's own, without flapping times."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from lume_operator.api.common import Condition


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def condition(type_: str, ok: bool, reason: str, message: str = "") -> dict[str, Any]:
    return {
        "type": type_,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message,
    }


def merge(existing: list[dict[str, Any]] | None, *updates: dict[str, Any]) -> list[dict[str, Any]]:
    """`existing` with `updates` applied; a condition keeps its lastTransitionTime unless its
    status changed, so a resync that changes nothing writes nothing new."""
    by_type = {c["type"]: dict(c) for c in existing or []}
    for update in updates:
        old = by_type.get(update["type"])
        changed = old is None or old.get("status") != update["status"]
        when = now() if changed else old.get("lastTransitionTime", now())
        by_type[update["type"]] = {**update, "lastTransitionTime": when}
    order = ["Ready", "Reconciling", "Stalled"]
    return sorted(
        by_type.values(),
        key=lambda c: (order.index(c["type"]) if c["type"] in order else 9, c["type"]),
    )


def ready(reason: str, message: str = "") -> list[dict[str, Any]]:
    """Everything converged."""
    return [
        condition("Ready", True, reason, message),
        condition("Reconciling", False, reason),
        condition("Stalled", False, reason),
    ]


def progressing(reason: str, message: str) -> list[dict[str, Any]]:
    """Work in progress, or waiting for something that will come (a backend, Prefect)."""
    return [
        condition("Ready", False, reason, message),
        condition("Reconciling", True, reason, message),
        condition("Stalled", False, reason),
    ]


def stalled(reason: str, message: str) -> list[dict[str, Any]]:
    """Cannot progress until the spec changes."""
    return [
        condition("Ready", False, reason, message),
        condition("Reconciling", False, reason),
        condition("Stalled", True, reason, message),
    ]


def failed(reason: str, message: str) -> list[dict[str, Any]]:
    """Done, unsuccessfully (a run failed, with no retry left): Stalled until the next run
    starts, so kstatus, Flux and `kubectl wait` see a failure rather than "Current"."""
    return stalled(reason, message)


def apply(existing: list[Condition] | None, updates: list[dict[str, Any]]) -> list[Condition]:
    """Typed conditions with `updates` merged in (see `merge`)."""
    merged = merge([c.to_wire() for c in existing or []], *updates)
    return [Condition.model_validate(c) for c in merged]


def is_true(existing: list[Condition] | None, type_: str) -> bool:
    return any(c.type == type_ and c.status == "True" for c in existing or [])


def reason_of(existing: list[Condition] | None, type_: str = "Ready") -> str | None:
    return next((c.reason for c in existing or [] if c.type == type_), None)


def message_of(existing: list[Condition] | None, type_: str = "Ready") -> str:
    return next((c.message for c in existing or [] if c.type == type_), "")
