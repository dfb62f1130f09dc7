"""Prefect tasks that save a flow's result document to the DB store and load one back.

A flow returns what `save_db_result` returns: a location `{"store", "id", "type": "DBResult"}`
(password masked), which Prefect persists and status records; the content stays in the store.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import ValidationError

from .store import (
    STORE_URL_ENV,
    DocumentError,
    LocationError,
    ResultDocument,
    SQLResultStore,
    default_store_url,
    is_db_location,
    mask_url,
    open_store,
    parse_store_url,
    resolve,
)

RESOURCE_TAG = "lume.dev/flow="

_stores: dict[str, SQLResultStore] = {}
_stores_lock = threading.Lock()


def get_store(url: str | None = None) -> SQLResultStore:
    """The process-wide store for `url` (default: configured), opened and migrated once."""
    url = url or default_store_url()
    with _stores_lock:
        store = _stores.get(url)
        if store is None:
            store = _stores[url] = open_store(url)
        return store


def close_stores() -> None:
    """Close every cached store (tests, or a process that changes its configuration)."""
    with _stores_lock:
        for store in _stores.values():
            store.close()
        _stores.clear()


def store_for_location(location: dict[str, Any], store_url: str | None = None) -> SQLResultStore:
    """The store a location names, using a configured URL when the location's is masked.

    Locations never carry passwords, so a password-protected store is found by matching the
    masked form of `store_url` or `$LUME_RESULT_STORE_URL`.
    """
    wanted = location["store"]
    for candidate in (store_url, default_store_url()):
        if candidate and mask_url(parse_store_url(candidate)) == wanted:
            return get_store(candidate)
    if ":***@" in wanted:
        raise LocationError(
            f"result location {location['id']!r} is in store {wanted}, whose password is not "
            f"configured here: set {STORE_URL_ENV} (or pass store_url) to that store's URL"
        )
    return get_store(wanted)


def _run_context() -> dict[str, Any]:
    """Flow name, parameters, run id and resource of the current flow run, if in one."""
    # Only inside a flow run: prefect.runtime reads that run's context when imported.
    from prefect.runtime import flow_run

    if not flow_run.id:
        return {}
    resource = next(
        (
            f"LumeFlow/{tag[len(RESOURCE_TAG) :]}"
            for tag in flow_run.tags or []
            if tag.startswith(RESOURCE_TAG)
        ),
        None,
    )
    return {
        "flow_name": flow_run.flow_name,
        "inputs": dict(flow_run.parameters or {}),
        "flow_run_id": str(flow_run.id),
        "resource": resource,
    }


@task(name="save_db_result", cache_policy=NO_CACHE, persist_result=False)
def save_db_result(
    outputs: Any,
    inputs: dict[str, Any] | None = None,
    *,
    flow_name: str | None = None,
    flow_run_id: str | None = None,
    resource: str | None = None,
    files: dict[str, dict[str, str]] | None = None,
    store_url: str | None = None,
) -> dict[str, str]:
    """Save `outputs` as a result document and return its location for the flow to return.

    Inside a flow run, flow name, inputs (the run's parameters), run id and resource default to
    the run's own. Saving the same (flow, inputs) again returns the first document's location.
    """
    context = _run_context()
    name = flow_name or context.get("flow_name")
    if not name:
        raise DocumentError("save_db_result needs flow_name when called outside a flow run")
    try:
        document = ResultDocument(
            flow_name=name,
            flow_run_id=flow_run_id or context.get("flow_run_id"),
            resource=resource or context.get("resource"),
            inputs=inputs if inputs is not None else context.get("inputs", {}),
            outputs=outputs,
            files=files,
        )
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc']) or 'document'}: "
            f"{item['msg'].removeprefix('Value error, ')}"
            for item in error.errors()
        )
        raise DocumentError(f"cannot save the result of flow {name!r}: {problems}") from None
    store = get_store(store_url)
    return store.location(store.save(document))


@task(name="load_db_result", cache_policy=NO_CACHE, persist_result=False)
def load_db_result(
    location: dict[str, Any] | str,
    attribute_index: Sequence[str | int] | None = None,
    *,
    store_url: str | None = None,
) -> Any:
    """The outputs of a saved document, indexed by `attribute_index` (a FlowOfFlows mapping).

    `location` is what `save_db_result` returned, or a bare document id in the configured store.
    """
    if isinstance(location, str):
        store = get_store(store_url)
        document_id = location
    elif is_db_location(location):
        store = store_for_location(location, store_url)
        document_id = location["id"]
    else:
        raise LocationError(
            f"not a DB result location: {location!r} (expected a dict with store, id and "
            "type 'DBResult', as save_db_result returns, or a document id)"
        )
    return resolve(store.get(document_id), attribute_index)


__all__ = ["close_stores", "get_store", "load_db_result", "save_db_result", "store_for_location"]
