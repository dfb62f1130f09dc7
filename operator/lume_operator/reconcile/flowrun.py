"""From a flow run (the port's view) to status: phases, run references and result locations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lume_operator.api.flow import FlowRunStatus, ResultSpec, ResultStatus
from lume_operator.api.keypath import KeyPathError, split, walk
from lume_operator.prefect.port import FlowRunView, PrefectError, PrefectPort, PrefectUnreachable
from lume_operator.prefect.serializer import is_unencodable, unencodable_message

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
    return_value: Any, declared: list[ResultSpec] | None, result_key: str | None
) -> list[ResultStatus]:
    """Locations of a run's results; files are checked to exist.

    Declared results are looked up by key path; undeclared, every File description in the
    return value is recorded. Plain values are recorded by their Prefect result key.
    """
    # Here, not at the top: the file types import lume-base (seconds), which only a run's end
    # needs; `lume-operator run` imports this module before Prefect's server starts.
    from lume_operator.results import (
        FileDescriptionError,
        FilesystemError,
        described_file,
        find_file_descriptions,
        is_file_description,
    )
    from lume_operator.results.store import find_db_locations, is_db_location

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
            try:
                # As data: a File[module:Serializer] named in stored data is not imported.
                file = described_file(item.value)
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


async def run_outcome(
    prefect: PrefectPort, flow_run: FlowRunView, declared: list[ResultSpec] | None
) -> RunOutcome:
    """The outcome of a run in a final state; a completed run's results are read and checked."""
    state = flow_run.state
    assert state is not None, "only a run in a final state has an outcome"
    if state.type != "COMPLETED":
        message = state.message or f"flow run ended {state.name}"
        return RunOutcome(phase_of(state.type), error=message, reason="FlowRunFailed")
    try:
        value = await prefect.result_of(flow_run)
        from lume_operator.results.discover import find_values

        for _, mark in find_values(value, is_unencodable):
            raise ResultError(unencodable_message(mark))
        results = result_statuses(value, declared, flow_run.result_key)
    except PrefectUnreachable:
        raise  # read again once Prefect is back: an outage says nothing of the results
    except (PrefectError, ResultError) as error:
        return RunOutcome("Failed", error=str(error), reason="ResultsInvalid")
    return RunOutcome("Completed", results=results)
