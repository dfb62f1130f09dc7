"""The Prefect API for local runs: the one configured, or an embedded server started here."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, temporary_settings


@contextlib.contextmanager
def prefect_api(startup_timeout: int = 120) -> Iterator[tuple[str, bool]]:
    """Yield (api_url, embedded): `PREFECT_API_URL` when set, else a fresh local server.

    The embedded server is Prefect's own (SQLite under PREFECT_HOME), in a subprocess; the URL
    is also exported so the worker's flow-run processes reach the same server.
    """
    configured = PREFECT_API_URL.value()
    if configured:
        yield configured, False
        return
    # Prefect's server package takes seconds to import; only an embedded run needs it.
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(timeout=startup_timeout)
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server.api_url, True
    finally:
        # Logs and events still queued for the API go now, while it is up: sent after it
        # stopped, Prefect retries them for a minute before the process can exit.
        APILogWorker.drain_all(timeout=5)
        EventsWorker.drain_all(timeout=5)
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous
        server.stop()
