"""The Prefect port: what lume-operator asks of Prefect, in lume-owned types.

The decision layer (`reconcile`) talks to Prefect only through `PrefectPort`; the real
`PrefectGateway` and the in-memory `FakePrefect` both implement it. Views are plain data, so a
decision never depends on Prefect's client classes, and errors come as one family: an outage
(`PrefectUnreachable`, retried with backoff) or a refusal (`PrefectRejected`, needs a change).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from lume_operator.prefect.deployment import DeploymentSpec

# Prefect state types after which a run changes no more.
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})

# uuid5 namespace of lume-operator's deterministic ids.
_NAMESPACE = uuid.UUID("5d1f1c8e-3b0b-4c55-9a55-6c756d652d6f")


# Prefect state types of a run still in flight.
ACTIVE_STATES = frozenset({"SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING"})


def idempotency_key(
    uid: str, generation: int | None, index: int, step: str | None = None, attempt: int = 0
) -> str:
    """The same (resource uid, generation, run index[, step][, attempt]) always gives the same
    key, so a restarted operator or a retried request never starts a second run."""
    parts = [uid, str(generation or 0), str(index)] + ([step] if step else [])
    parts += [f"attempt-{attempt}"] if attempt else []
    return f"lume-{uuid.uuid5(_NAMESPACE, '/'.join(parts))}"


_OWNER = re.compile(r"\(lume-operator owner: ([^)\s]+)\)")


def pool_owner(uid: str | None) -> str | None:
    """The uid a backend marks the work pools it creates with; None without one (a local
    run's backend), which marks nothing and claims nothing."""
    return uid or None


def owner_mark(owner: str | None) -> str:
    """A pool description carrying the owner's mark (never None: Prefect would store the text
    "None")."""
    return (
        f"Managed by lume-operator (lume-operator owner: {owner})."
        if owner
        else ("Managed by lume-operator.")
    )


def owned_by(description: str | None, owner: str | None) -> bool:
    """Whether a pool's description carries exactly this owner's mark."""
    found = _OWNER.search(description or "")
    return owner is not None and found is not None and found.group(1) == owner


class PrefectError(Exception):
    """Root of every failure of a Prefect call; `status_code` when Prefect answered."""

    reason = "PrefectError"

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class PrefectUnreachable(PrefectError):
    """Prefect did not answer usefully: transport error, timeout, 5xx, 408 or 429. Transient."""

    reason = "PrefectUnreachable"


class PrefectRejected(PrefectError):
    """Prefect answered and refused (another 4xx), or the request cannot succeed as asked."""

    reason = "PrefectRejected"


class WorkPoolOwnedElsewhere(PrefectRejected):
    """The work pool exists and was not created by this backend: it is neither changed nor
    deleted unless adopted (`workPool.adopt`), which never changes it."""

    reason = "WorkPoolOwnedElsewhere"


class PrefectNotConfigured(PrefectError):
    """No Prefect API can be reached for this backend yet: no URL, or its API key's Secret is
    missing or unreadable. `reason` is the condition reason users see (NoPrefectAPI,
    SecretNotFound, SecretForbidden)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_pool(
    name: str,
    pool_type: str,
    current_type: str,
    description: str | None,
    *,
    owner: str | None,
    adopt: bool,
) -> None:
    """Whether an existing work pool is this backend's to use: its type, and (unless adopted)
    its owner's mark; the error says which is wrong."""
    if current_type != pool_type:
        raise PrefectRejected(
            f"work pool {name!r} exists with type {current_type!r}, not {pool_type!r}"
        )
    if not adopt and owner and not owned_by(description, owner):
        raise WorkPoolOwnedElsewhere(
            f"work pool {name!r} exists and was not created by this backend: set "
            "workPool.adopt to use it as it is, or name another pool"
        )


def is_outage_status(status_code: int) -> bool:
    """HTTP statuses that say "try again later" rather than "no"."""
    return status_code >= 500 or status_code in (408, 429)


@dataclass(frozen=True)
class RunState:
    """A flow run's state: name (e.g. Completed), type (e.g. COMPLETED) and message."""

    name: str
    type: str
    message: str | None = None

    @property
    def final(self) -> bool:
        return self.type in FINAL_STATES


@dataclass
class FlowRunView:
    """What lume-operator reads of a flow run; times are RFC 3339 strings."""

    id: str
    name: str
    state: RunState | None = None
    start_time: str | None = None
    end_time: str | None = None
    tags: list[str] = field(default_factory=list)
    deployment_id: str | None = None
    created_time: str | None = None
    # When it is to start (a retry scheduled after its delay starts later than it is made).
    expected_start_time: str | None = None
    idempotency_key: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    # Where its return value is persisted (a storage key), when it is, and the serializer
    # its record names (read only if JSON: prefect/records.py).
    result_key: str | None = None
    result_serializer: str | None = None
    # The implementation's own handle (the gateway's Prefect state); never compared.
    handle: Any = field(default=None, repr=False, compare=False)

    @property
    def final(self) -> bool:
        return bool(self.state and self.state.final)


@dataclass
class WorkPoolView:
    id: str
    name: str
    type: str
    base_job_template: dict[str, Any]
    concurrency_limit: int | None = None
    queues: list[str] = field(default_factory=list)
    description: str | None = None


class PrefectPort(Protocol):
    """The Prefect operations lume-operator needs; every one idempotent where it can be."""

    api_url: str

    def ui_url(self, flow_run_id: str) -> str:
        """Where users see a run."""
        ...

    async def health(self) -> None:
        """Return when the API answers; raise PrefectUnreachable otherwise."""
        ...

    async def ensure_work_pool(
        self,
        name: str,
        pool_type: str,
        base_job_template: dict[str, Any],
        *,
        adopt: bool = False,
        concurrency_limit: int | None = None,
        queues: list[str] | None = None,
        owner: str | None = None,
    ) -> str:
        """Create the pool marked with `owner`, bring it in line (only a pool with that mark:
        WorkPoolOwnedElsewhere otherwise), or (adopt) use it untouched; its id."""
        ...

    async def delete_work_pool(self, name: str, owner: str | None = None) -> None:
        """Delete a pool (only one marked with `owner`, when given); one already gone counts
        as deleted."""
        ...

    async def ensure_result_storage(self, name: str, fields: dict[str, Any]) -> str:
        """The `remote-file-system` block `name` with these fields (base path and fsspec
        options of a backend's object store, never a credential): created, brought in line,
        or (when equal) left alone with no write; its id."""
        ...

    async def delete_result_storage(self, name: str) -> None:
        """Delete the block `name`; one already gone counts as deleted."""
        ...

    async def ensure_deployment(self, spec: DeploymentSpec, *, fresh: bool = False) -> str:
        """Upsert a deployment, with no write when nothing would change; its id. `fresh`: the
        caller has never made it, so it is written without reading it first."""
        ...

    async def delete_deployment(self, flow_name: str, name: str) -> None:
        """Delete a deployment by name; one already gone counts as deleted."""
        ...

    async def create_flow_run(
        self,
        deployment_id: str,
        *,
        idempotency_key: str,
        parameters: dict[str, Any] | None = None,
        tags: list[str] | None = None,
        job_variables: dict[str, Any] | None = None,
        start_in: float | None = None,
    ) -> FlowRunView:
        """A run of the deployment (scheduled `start_in` seconds from now, when given); the
        same key returns the same run, never a second."""
        ...

    async def read_flow_run(self, flow_run_id: str) -> FlowRunView: ...

    async def read_flow_runs(self, flow_run_ids: list[str]) -> list[FlowRunView]:
        """Several runs in one request; ids Prefect does not know are left out."""
        ...

    async def active_runs(self, deployment_id: str) -> list[FlowRunView]:
        """The deployment's runs still in flight (scheduled, pending, running, paused,
        cancelling)."""
        ...

    async def latest_run(self, deployment_id: str) -> FlowRunView | None:
        """The deployment's most recently started run (not merely scheduled)."""
        ...

    async def child_runs(self, parent_id: str) -> list[FlowRunView]:
        """Runs started from inside a run (a composition's steps)."""
        ...

    async def cancel_flow_run(self, flow_run_id: str, *, force: bool = False) -> None:
        """Ask for a run to be cancelled (Cancelling: its worker stops it, then Cancelled);
        `force` sets Cancelled at once, for a run no worker will stop. A run already final is
        left as it is."""
        ...

    async def table_artifact(self, flow_run_id: str, description: str) -> list[dict] | None:
        """Rows of the run's table artifact with that description, if it made one."""
        ...

    async def result_of(self, flow_run: FlowRunView) -> Any:
        """The persisted return value of a completed run (PrefectRejected if unreadable)."""
        ...
