"""From a flow run (the port's view) to status: phases, run references and result locations."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio

from lume_operator.api.backend import SchedulingBackend
from lume_operator.api.flow import FlowRunStatus, ResultSpec, ResultStatus
from lume_operator.api.keypath import KeyPathError, split, walk
from lume_operator.prefect.port import (
    FlowRunView,
    PrefectError,
    PrefectNotConfigured,
    PrefectPort,
    PrefectRejected,
    PrefectUnreachable,
)
from lume_operator.prefect.records import json_result, refuse_unless_json
from lume_operator.prefect.serializer import INSTEAD, is_unencodable, unencodable_message
from lume_operator.reconcile import conditions
from lume_operator.results.discover import (
    find_file_descriptions,
    find_values,
    is_file_description,
)
from lume_operator.results.filesystems import Filesystem, FilesystemError, StorageUnreachableError
from lume_operator.results.storage import RunStorage
from lume_operator.results.store import find_db_locations, is_db_location

# The phase of a LumeFlow (or a step) while its run is in each Prefect state type.
PHASES = {
    "SCHEDULED": "Running",
    "PENDING": "Running",
    "RUNNING": "Running",
    "PAUSED": "Running",
    "CANCELLING": "Running",
    "COMPLETED": "Completed",
    "FAILED": "Failed",
    "CRASHED": "Failed",
    "CANCELLED": "Failed",
}


def phase_of(state_type: str | None) -> str:
    """The LumeFlow phase of a Prefect state type."""
    return PHASES.get(state_type or "", "Pending")


def run_status(
    flow_run: FlowRunView, index: int, url: str | None, generation: int | None = None
) -> FlowRunStatus:
    """A status reference to a flow run (no payloads)."""
    state = flow_run.state
    return FlowRunStatus(
        id=flow_run.id,
        name=flow_run.name,
        index=index,
        generation=generation,
        state=state.name if state else None,
        state_type=state.type if state else None,
        start_time=flow_run.start_time,
        end_time=flow_run.end_time,
        url=url,
        message=(state.message or None) if state and state.type != "COMPLETED" else None,
        created_time=flow_run.created_time,
    )


class ResultError(Exception):
    """A declared result is missing, of the wrong type, or its file does not exist."""


@dataclass
class _Found:
    name: str
    value: Any


def _lookup(value: Any, path: str) -> Any:
    try:
        return walk(value, split(path))
    except KeyPathError as error:
        raise ResultError(f"result {path!r} is not in the flow's return value: {error}") from None


def result_statuses(
    return_value: Any,
    declared: list[ResultSpec] | None,
    result_key: str | None,
    on: Filesystem | None = None,
) -> list[ResultStatus]:
    """Locations of a run's results; files are checked to exist.

    Declared results are looked up by key path; undeclared, every File description in the
    return value is recorded. Plain values are recorded by their Prefect result key. `on`:
    the backend's result storage, the only place files are looked for (see described_file).
    """
    if declared:
        found = [_Found(spec.name, _lookup(return_value, spec.name)) for spec in declared]
        expected = {spec.name: spec.type for spec in declared}
    else:
        found = [_Found(name, desc) for name, desc in find_file_descriptions(return_value)]
        found += [_Found(name, loc) for name, loc in find_db_locations(return_value)]
        expected = {}
    statuses = []
    for item in found:
        if is_file_description(item.value):
            # Here, not at the top: files.py imports lume-base (seconds), needed only now.
            from lume_operator.results.files import FileDescriptionError, described_file

            try:
                # As data: a File[module:Serializer] named in stored data is not imported.
                file = described_file(item.value, on=on)
                exists = file.exists
            except (FileDescriptionError, FilesystemError) as error:
                raise ResultError(f"result {item.name!r}: {error}") from None
            if expected.get(item.name) and expected[item.name] != file.file_type_string:
                raise ResultError(
                    f"result {item.name!r} is a {file.file_type_string}, "
                    f"not the declared {expected[item.name]}"
                )
            if not exists:
                raise ResultError(
                    f"result {item.name!r}: file {file.filename!r} "
                    f"(filesystem {file.filesystem_identifier!r}) does not exist"
                )
            statuses.append(
                ResultStatus(
                    name=item.name,
                    type=file.file_type_string,
                    filesystem=file.filesystem_identifier,
                    location=file.filename,
                )
            )
        elif is_db_location(item.value):
            if expected.get(item.name) and expected[item.name] != "DBResult":
                raise ResultError(
                    f"result {item.name!r} is a DBResult, not the declared {expected[item.name]}"
                )
            statuses.append(
                ResultStatus(
                    name=item.name,
                    type="DBResult",
                    location=f"{item.value['store']}#{item.value['id']}",
                )
            )
        else:
            if expected.get(item.name):
                raise ResultError(
                    f"result {item.name!r} is a plain value, not the declared {expected[item.name]}"
                )
            statuses.append(
                ResultStatus(
                    name=item.name,
                    type="value",
                    location=f"{result_key}#{item.name}" if result_key else item.name,
                )
            )
    return statuses


@dataclass
class RunOutcome:
    """How a final run ended, for status: phase, result locations, or the error and its reason."""

    phase: str
    results: list[ResultStatus] | None = None
    error: str | None = None
    reason: str = "FlowRunCompleted"


@dataclass(frozen=True)
class NoStorage:
    """A backend whose runs keep their results on their own pod's or container's disk, which
    nobody else reads: runs run, their results are not listed, and status says why."""

    message: str


# Where a backend's results are read: its declared storage, none (NoStorage), or None for
# Prefect's local default (a process backend: the operator shares its runs' disk).
Results = RunStorage | NoStorage | None
# Opens a backend's declared storage as the operator reaches it (its credentials from the
# Secret, or the claim where the operator pod mounts it); PrefectNotConfigured when it cannot.
OpenStorage = Callable[[SchedulingBackend], Awaitable[RunStorage]]


class ResultStorageUnreachable(PrefectUnreachable):
    """The backend's result storage did not answer: the results are read again later."""

    reason = "ResultStorageUnreachable"


def results_condition(backend: SchedulingBackend) -> dict[str, Any]:
    """`ResultsAvailable`: whether the operator (and users) can read the runs' results."""
    storage = backend.spec.result_storage
    if storage is not None:
        where = (
            storage.root
            if storage.object_store
            else f"claim {storage.identifier.removeprefix('pvc/')} at {storage.root}"
        )
        return conditions.condition(
            "ResultsAvailable", True, "ResultStorage", f"results are kept in {where}"
        )
    if backend.spec.type == "process":
        return conditions.condition(
            "ResultsAvailable",
            True,
            "LocalResults",
            "results stay on the disk of the process worker's runs, read where the operator "
            "shares it; declare spec.resultStorage on the backend to read them anywhere",
        )
    return conditions.condition("ResultsAvailable", False, "NoResultStorage", no_storage(backend))


def no_storage(backend: SchedulingBackend) -> str:
    return (
        f"SchedulingBackend {backend.key} ({backend.spec.type}) declares no "
        "spec.resultStorage: its runs run, but their results stay in each run's "
        f"{'pod' if backend.spec.type == 'kubernetes' else 'container'} and are not listed; "
        "declare an object store (resultStorage.objectStore.url: s3://bucket/prefix) or a "
        "shared volume (resultStorage.volume.claimName and mountPath) on it"
    )


async def storage_for(backend: SchedulingBackend, open_storage: OpenStorage | None) -> Results:
    """Where the operator reads a backend's results (see `Results`)."""
    if backend.spec.result_storage is None:
        return None if backend.spec.type == "process" else NoStorage(no_storage(backend))
    if open_storage is None:
        raise PrefectNotConfigured(
            "ResultStorageUnavailable", "no way to open the backend's result storage here"
        )
    return await open_storage(backend)


async def run_outcome(
    prefect: PrefectPort,
    flow_run: FlowRunView,
    declared: list[ResultSpec] | None,
    storage: Results = None,
) -> RunOutcome:
    """The outcome of a run in a final state; a completed run's results are read and checked
    (from the backend's declared storage when it has one, as JSON data only)."""
    state = flow_run.state
    assert state is not None, "only a run in a final state has an outcome"
    if state.type != "COMPLETED":
        message = state.message or f"flow run ended {state.name}"
        return RunOutcome(phase_of(state.type), error=message, reason="FlowRunFailed")
    if isinstance(storage, NoStorage):
        return RunOutcome("Completed")
    try:
        if storage is None:
            value = await prefect.result_of(flow_run)
            results = _checked(value, declared, flow_run.result_key)
        else:
            with anyio.fail_after(120):  # each store call is bounded; this bounds them all
                results = await anyio.to_thread.run_sync(
                    _from_storage, storage, flow_run, declared, abandon_on_cancel=True
                )
    except StorageUnreachableError as error:
        raise ResultStorageUnreachable(str(error)) from None  # read again later
    except TimeoutError:
        raise ResultStorageUnreachable(
            f"reading the results of flow run {flow_run.id} took too long"
        ) from None
    except PrefectUnreachable:
        raise  # read again once Prefect is back: an outage says nothing of the results
    except (PrefectError, ResultError, FilesystemError, FileNotFoundError) as error:
        return RunOutcome("Failed", error=str(error), reason="ResultsInvalid")
    return RunOutcome("Completed", results=results)


def _checked(
    value: Any, declared: list[ResultSpec] | None, key: str | None, on: Filesystem | None = None
) -> list[ResultStatus]:
    for _, mark in find_values(value, is_unencodable):
        raise ResultError(unencodable_message(mark))
    return result_statuses(value, declared, key, on)


def _from_storage(
    storage: RunStorage, flow_run: FlowRunView, declared: list[ResultSpec] | None
) -> list[ResultStatus]:
    """A run's record and files read from the backend's declared storage (a thread: s3fs and
    disks block): its key resolved there, never where the record or a block says."""
    where = f"the result of flow run {flow_run.id}"
    key = flow_run.result_key
    if not key:
        raise PrefectRejected(f"{where} was not persisted")
    refuse_unless_json(flow_run.result_serializer, where)
    try:
        content = storage.read_record(key)
    except FileNotFoundError as error:
        raise ResultError(
            f"the return value of flow run {flow_run.id} was never stored ({error}): Prefect "
            f"could not serialize it (its log names the value), or it went elsewhere; {INSTEAD}"
        ) from None
    value = json_result(content, where)
    return _checked(value, declared, storage.record_location(key), storage.filesystem)
