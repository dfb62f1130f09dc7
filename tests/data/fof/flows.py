"""Small flows for the flow-of-flows tests: fast to import, each doing one visible thing."""

from __future__ import annotations

from prefect import flow, task

from lume_operator.results.db_tasks import save_db_result
from lume_operator.results.files import TextFile, result_path


@task
def double(value: int) -> int:
    return 2 * value


@flow(name="source")
def source(value: int = 3) -> dict:
    return {"value": value, "doubled": double(value), "items": [value, value + 1]}


@flow(name="add")
def add(left: int, right: int = 0) -> dict:
    return {"sum": left + right}


@flow(name="explode")
def explode(value: int) -> dict:
    raise ValueError(f"boom: cannot handle {value}")


@flow(name="record")
def record(value: int) -> dict:
    """Writes what it was given, so a test can see the mapped value arrived."""
    report = TextFile(filename=result_path("value.txt")).write(f"{value}\n")
    return {"report": report.description()}


@flow(name="tally")
def tally(value: int) -> dict:
    """Keeps its summary as a document in the result store; returns only where it is."""
    return {"summary": save_db_result({"stats": {"total": value * 10, "items": [value]}})}
