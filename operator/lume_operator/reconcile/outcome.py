"""What a decision returns: the whole status to write, the events to post, when to retry.

Adapters apply an `Outcome` and decide nothing themselves; `prefect_trouble` is the one place
a failed Prefect call becomes a condition.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar

from lume_operator.api.common import Model
from lume_operator.api.manifests import parse_resource
from lume_operator.prefect.port import (
    PrefectError,
    PrefectPort,
    PrefectRejected,
)
from lume_operator.reconcile import conditions

StatusT = TypeVar("StatusT", bound=Model)

# Opens the Prefect API of a backend (its URL, its key from a Secret); raises
# PrefectNotConfigured when there is none to open.
Connect = Callable[[Any], AbstractAsyncContextManager[PrefectPort]]


@dataclass(frozen=True)
class Event:
    """A Kubernetes event about the object: what happened, for `kubectl describe`."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass
class Outcome(Generic[StatusT]):
    """The status to write (whole), events to post, and whether to run again and when."""

    status: StatusT
    events: list[Event] = field(default_factory=list)
    retry_in: float | None = None
    retry_message: str = ""


@dataclass
class Found:
    """An object as the operator's index holds it: manifest (no status) and status."""

    body: dict[str, Any]
    status: dict[str, Any]


class Cluster(Protocol):
    """The Kubernetes calls a decision needs, besides writing its own status at the end."""

    async def apply(self, body: dict[str, Any]) -> None:
        """Create an object, or replace what the spec no longer has in one the operator owns
        (same controller uid); NameTaken when one of that name belongs to someone else."""
        ...

    async def ready_replicas(self, namespace: str, name: str) -> int | None:
        """Ready replicas of a Deployment; None when it does not exist."""
        ...


# Ready reasons that say Prefect (or something awaited) was in the way; a successful call
# clears them.
TROUBLE = frozenset(
    {
        "PrefectUnreachable",
        "PrefectRejected",
        "NoPrefectAPI",
        "SecretNotFound",
        "SecretForbidden",
        "BackendNotFound",
        "BackendInvalid",
        "BackendNotReady",
        "FlowNotFound",
        "FlowNotDeployed",
        "ResultStorageUnreachable",
        "ResultStorageNotMounted",
    }
)


class NameTaken(Exception):
    """An object the operator would create exists and is not its own: never adopted."""

    reason = "NameTaken"


class Waiting(Exception):
    """Something the object needs is not there yet: retried, not an error of its spec."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def set_conditions(status: StatusT, updates: list[dict[str, Any]]) -> StatusT:
    """Merge `updates` into the status' conditions, each stamped with the generation it
    speaks for (status.observedGeneration)."""
    generation = getattr(status, "observed_generation", None)
    stamped = [{**update, "observedGeneration": generation} for update in updates]
    status.conditions = conditions.apply(status.conditions, stamped)  # type: ignore[attr-defined]
    return status


_USERINFO = re.compile(r"(?<=://)[^/\s]*@")


def masked(text: str) -> str:
    """Text with any URL's user and password replaced: status and events are readable by
    many, and a URL in an error message may carry credentials."""
    return _USERINFO.sub("***@", text)


def prefect_trouble(
    status: StatusT, error: PrefectError | Waiting, *, retry_in: float | None
) -> Outcome[StatusT]:
    """Prefect down, refusing, not configured, or something awaited: Ready False with the
    error's stable reason; retried after `retry_in` (None: the caller runs again anyway)."""
    reason = error.reason
    message = masked(str(error))
    if error.reason == "PrefectUnreachable" and not message.startswith("Prefect"):
        message = f"Prefect API unreachable: {message}"
    if isinstance(error, PrefectRejected):
        # Prefect said no (401, 403, 422, a pool owned elsewhere): retrying the same request
        # would only say no again. Stalled until the spec changes.
        set_conditions(status, conditions.stalled(reason, message))
        return Outcome(status, [Event("Warning", reason, message)])
    set_conditions(status, conditions.progressing(reason, message))
    return Outcome(status, retry_in=retry_in, retry_message=message)


def status_of(model: type[StatusT], raw: dict[str, Any] | None) -> StatusT:
    """The observed status as its model; what does not parse (written by hand, or by an older
    version) is dropped rather than blocking every decision."""
    known = {name for field_ in model.model_fields.values() for name in [field_.alias]}
    try:
        return model.model_validate({k: v for k, v in (raw or {}).items() if k in known})
    except ValueError:
        return model()


def parse_object(body: dict[str, Any]) -> tuple[Any, str | None]:
    """An object (status left out: it is ours) as its model, or one message naming every bad
    field."""
    raw = {key: value for key, value in body.items() if key != "status"}
    meta = raw.get("metadata") or {}
    source = f"{raw.get('kind')} {meta.get('namespace')}/{meta.get('name')}"
    resource, problems = parse_resource(copy.deepcopy(raw), source)
    if problems:
        return None, "; ".join(f"{p.path}: {p.message}" if p.path else p.message for p in problems)
    return resource, None


def invalid(status: Any, message: str, generation: int | None, **values: Any) -> Outcome[Any]:
    """A spec that can never work: Stalled with zero Prefect calls, until the spec changes."""
    status.observed_generation = generation
    for key, value in values.items():
        setattr(status, key, value)
    set_conditions(status, conditions.stalled("InvalidSpec", message))
    return Outcome(status, [Event("Warning", "InvalidSpec", message)])


def held(
    status: StatusT, error: PrefectError, what: str, settings: Any, retry: int
) -> Outcome[StatusT]:
    """A deletion Prefect did not confirm: the finalizer holds and status says why. An outage
    is retried with backoff; a refusal is Stalled (it needs a change: a Secret restored,
    `deletionPolicy: Orphan`) and asked again only at the longest backoff."""
    message = masked(f"waiting to delete {what}: {error}")
    if isinstance(error, PrefectRejected):
        set_conditions(status, conditions.stalled(error.reason, message))
        event = Event("Warning", error.reason, message)
        return Outcome(status, [event], retry_in=settings.max_backoff, retry_message=message)
    set_conditions(status, conditions.progressing(error.reason, message))
    return Outcome(status, retry_in=settings.backoff(retry), retry_message=message)


def orphaned(status: StatusT, what: str) -> Outcome[StatusT]:
    """`deletionPolicy: Orphan`: released at once, `what` left in Prefect, and said so."""
    return Outcome(status, [Event("Normal", "Orphaned", f"{what} left in Prefect (Orphan)")])
