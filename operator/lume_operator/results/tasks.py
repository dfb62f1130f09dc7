"""Prefect tasks for File results; separate so importing the results layer stays Prefect-free."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from .files import File, load_file

# NO_CACHE: a cached save would skip the write, a cached load could return stale data, and
# hashing large inputs (arrays) is slow. persist_result=False: the file already is the result.


@task(name="get_file_result", cache_policy=NO_CACHE, persist_result=False)
def get_file_result(description: dict[str, Any] | str) -> Any:
    """Load the object a File description (dict or JSON string) points at."""
    return load_file(description).read()


@task(name="save_file_result", cache_policy=NO_CACHE, persist_result=False)
def save_file_result(obj: Any, file: File[Any] | dict[str, Any] | str) -> dict[str, str]:
    """Write `obj` to `file` and return the description a flow should return."""
    target = file if isinstance(file, File) else load_file(file)
    return target.write(obj).description()
