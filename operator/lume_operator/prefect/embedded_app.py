"""The embedded Prefect server's app: Prefect's own, behind `RetryBusy`.

On SQLite, a write that meets another writer fails at once with "database is locked" (a
deferred transaction cannot wait for the lock it would upgrade to), and Prefect's server
answers 503. Every Prefect client then sleeps 2 s, 4 s, 8 s... before asking again: with 8
flow runs starting together on a laptop, a third of a short composition's wall time (15 s,
9.5 s without the sleeps) went to them. Prefect's clients repeat a 503'd request as it was,
so the server may as well repeat it itself, a few milliseconds later, before it answers; only
if the database stays busy past a budget does the 503 go out, with a short `Retry-After` that
Prefect's client honours.

Most of those busy writes were avoidable: a transaction that reads before it writes (Prefect's
labels update, which its worker makes before starting each flow run) cannot take the write
lock once another writer committed after its read, so under load it failed again and again
(33 of 45 busy answers in one fan-out of 8 runs, each attempt's work wasted). On SQLite the
embedded server's write transactions therefore begin IMMEDIATE (`immediate_writes`), as
Prefect's own do when they lock rows: they wait for the lock at their start, in SQLite's busy
handler, instead of failing after their reads. Reads take no transaction and are unaffected.

Only the embedded server (`lume-operator run`) is changed; a Prefect server of the user's own
stays as Prefect ships it.
"""

from __future__ import annotations

import contextlib
import gc
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import anyio

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

BUSY = 503
FIRST_PAUSE = 0.005
LONGEST_PAUSE = 0.25
BUDGET_SECONDS = 10.0
RETRY_AFTER = "0.5"  # seconds, for a 503 that goes out after all
EVENT_STREAM = "/events/out"
INBOX = 16  # a client's messages not yet read by its handler


class RetryBusy:
    """Pure ASGI middleware: an HTTP request answered 503 runs again after a short, growing,
    jittered pause, until it gets another answer or `budget` seconds passed.

    The request body is read first and replayed to each attempt; any other answer streams
    through untouched. WebSockets and lifespan pass through.
    """

    def __init__(
        self,
        app: ASGIApp,
        budget: float = BUDGET_SECONDS,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        jitter: Callable[[], float] = lambda: random.uniform(0.5, 1.5),
    ) -> None:
        self.app = app
        self.budget = budget
        self._sleep = sleep
        self._jitter = jitter

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        deadline = time.monotonic() + self.budget
        pause = FIRST_PAUSE
        while True:
            last = time.monotonic() + pause >= deadline
            attempt = _Attempt(send, hold_busy=not last)
            try:
                # A copy each time: routing rewrites the scope's path as it mounts the API.
                await self.app({**scope}, _replay(body, receive), attempt.send)
            except Exception:
                # Starlette re-raises what its error handler answered (for the server's log):
                # a held 503 is retried all the same.
                if not attempt.held:
                    raise
            if not attempt.held:
                return
            await self._sleep(pause * self._jitter())
            pause = min(pause * 2, LONGEST_PAUSE)


async def _read_body(receive: Receive) -> list[Message]:
    messages = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request" or not message.get("more_body", False):
            return messages


def _replay(body: list[Message], receive: Receive) -> Receive:
    """The buffered request, then the client's own channel (a disconnect)."""
    pending = list(body)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


class _Attempt:
    """Passes an answer through, or drops a 503 (`held`) so that the request can run again;
    a 503 that is let through gets a `Retry-After`."""

    def __init__(self, send: Send, hold_busy: bool) -> None:
        self._send = send
        self._hold_busy = hold_busy
        self.held = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] == BUSY:
            if self._hold_busy:
                self.held = True
                return
            headers = [h for h in message.get("headers", []) if h[0].lower() != b"retry-after"]
            message = {**message, "headers": [*headers, (b"retry-after", RETRY_AFTER.encode())]}
        if not self.held:
            await self._send(message)


class StreamsEndWithTheirClients:
    """Pure ASGI middleware: an event stream's handler (`/api/events/out`) ends as soon as its
    client is gone.

    Prefect's handler looks at its socket only when no event came for a second, and a stop of
    the server waits for every handler: the subscriptions of `run` and of each flow run's
    engine held the embedded server's stop 1.5 to 2 s. Here the client's messages reach the
    handler through a pump; at the client's disconnect (closed, lost, or closed by the
    server's stop) the handler, which only sends to that client, is cancelled. Other
    websockets, HTTP and lifespan pass through.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket" or not scope["path"].endswith(EVENT_STREAM):
            await self.app(scope, receive, send)
            return
        to_handler, inbox = anyio.create_memory_object_stream[Message](INBOX)
        failure: Exception | None = None
        async with anyio.create_task_group() as group, to_handler, inbox:

            async def pump() -> None:
                while True:
                    message = await receive()
                    await to_handler.send(message)
                    if message["type"] == "websocket.disconnect":
                        group.cancel_scope.cancel()
                        return

            group.start_soon(pump)
            try:
                await self.app(scope, inbox.receive, send)
            except Exception as error:  # raised as the app raised it, not in a group
                failure = error
            group.cancel_scope.cancel()
        if failure is not None:
            raise failure


def immediate_writes(connection_url: str) -> Any:
    """Prefect's SQLite database configuration, its write transactions begun IMMEDIATE."""
    from prefect.server.database.configurations import AioSqliteConfiguration

    class ImmediateWrites(AioSqliteConfiguration):
        @contextlib.asynccontextmanager
        async def begin_transaction(
            self, session: Any, with_for_update: bool = False
        ) -> AsyncIterator[Any]:
            async with super().begin_transaction(session, with_for_update=True) as transaction:
                yield transaction

    return ImmediateWrites(connection_url=connection_url)


def create_app() -> ASGIApp:
    """uvicorn's factory for the embedded server: Prefect's app behind `RetryBusy`, with
    `immediate_writes` on SQLite (Prefect's injection point for its database configuration)."""
    from prefect.server.api.server import create_app as prefect_app
    from prefect.server.database.dependencies import MODELS_DEPENDENCIES
    from prefect.server.utilities.database import get_dialect
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    url = PREFECT_API_DATABASE_CONNECTION_URL.value()
    if get_dialect(url).name == "sqlite" and MODELS_DEPENDENCIES["database_config"] is None:
        MODELS_DEPENDENCIES["database_config"] = immediate_writes(url)
    app = RetryBusy(StreamsEndWithTheirClients(prefect_app()))
    # Prefect's modules and app live as long as the server: out of the collector's full
    # passes, which otherwise walk them all for each (0.2 s of CPU each, on 2 cores).
    gc.freeze()
    return app
