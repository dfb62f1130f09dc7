"""The embedded server repeats a 503'd request itself, a few milliseconds later, instead of
sending every Prefect client into seconds of backoff; any other answer goes through as it came.

The app here is Starlette with an exception handler as Prefect's server has one: a retryable
error is answered 503, and Starlette raises the error again after answering (for the log); the
API is mounted under /api, as Prefect's is."""

from __future__ import annotations

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Mount, Route

from lume_operator.prefect.embedded_app import RETRY_AFTER, RetryBusy

pytestmark = pytest.mark.unit


class Locked(Exception):
    """Stands for SQLite's "database is locked"."""


def make_app(busy_times: int, calls: list[bytes]) -> Starlette:
    async def write(request: Request) -> JSONResponse:
        calls.append(await request.body())
        if len(calls) <= busy_times:
            raise Locked()
        return JSONResponse({"seen": (await request.json())["value"], "attempt": len(calls)})

    async def broken(request: Request) -> JSONResponse:
        calls.append(await request.body())
        raise ValueError("a bug, not a busy database")

    async def stream(request: Request) -> StreamingResponse:
        calls.append(b"")

        async def chunks():  # noqa: ANN202
            for index in range(3):
                yield f"chunk{index};".encode()

        return StreamingResponse(chunks())

    async def internal(request: Request, error: Exception) -> JSONResponse:
        if isinstance(error, Locked):
            return JSONResponse({"exception_message": "Service Unavailable"}, status_code=503)
        return JSONResponse({"exception_message": "Internal Server Error"}, status_code=500)

    api = Starlette(
        routes=[
            Route("/write", write, methods=["POST"]),
            Route("/broken", broken, methods=["POST"]),
            Route("/stream", stream),
        ],
        # As Prefect's API: a handler for Exception, which Starlette runs, then raises again.
        exception_handlers={Exception: internal},
    )
    return Starlette(routes=[Mount("/api", app=api)])


def call(app: object, method: str, path: str, **kwargs: object) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return anyio.run(go)


def test_a_busy_answer_is_asked_again_with_the_same_body_through_the_mount():
    calls: list[bytes] = []
    answer = call(RetryBusy(make_app(3, calls)), "POST", "/api/write", json={"value": 42})
    assert answer.status_code == 200
    assert answer.json() == {"seen": 42, "attempt": 4}
    assert calls == [b'{"value":42}'] * 4  # the whole body, each time


def test_without_it_the_client_gets_the_503():
    calls: list[bytes] = []
    answer = call(make_app(1, calls), "POST", "/api/write", json={"value": 1})
    assert answer.status_code == 503
    assert "retry-after" not in answer.headers


def test_a_database_busy_past_the_budget_answers_503_with_a_short_retry_after():
    calls: list[bytes] = []
    answer = call(RetryBusy(make_app(10_000, calls), budget=0.2), "POST", "/api/write",
                  json={"value": 1})  # fmt: skip
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == RETRY_AFTER
    assert answer.json() == {"exception_message": "Service Unavailable"}
    assert 3 <= len(calls) < 60  # asked again several times, with pauses between


def test_other_errors_and_answers_go_through_once():
    calls: list[bytes] = []
    answer = call(RetryBusy(make_app(0, calls)), "POST", "/api/broken", json={"value": 1})
    assert answer.status_code == 500
    assert len(calls) == 1

    calls.clear()
    answer = call(RetryBusy(make_app(0, calls)), "GET", "/api/stream")
    assert (answer.status_code, answer.text) == (200, "chunk0;chunk1;chunk2;")
    assert len(calls) == 1

    calls.clear()
    answer = call(RetryBusy(make_app(0, calls)), "GET", "/api/nowhere")
    assert answer.status_code == 404


def test_pauses_grow_from_milliseconds():
    pauses: list[float] = []

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)

    calls: list[bytes] = []
    app = RetryBusy(make_app(8, calls), sleep=sleep, jitter=lambda: 1.0)
    answer = call(app, "POST", "/api/write", json={"value": 7})
    assert answer.status_code == 200
    assert pauses == [0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.25, 0.25]


@pytest.mark.parametrize("immediate", [True, False])
def test_a_write_transaction_holds_the_write_lock_from_its_start(tmp_path, immediate):
    """Prefect's SQLite transactions begin DEFERRED: one that reads first cannot take the write
    lock once another writer committed after its read, and fails "busy" again and again under
    load. The embedded server's begin IMMEDIATE (real SQLite, Prefect's own configuration
    class): after a read in the transaction, another writer already finds the lock taken."""
    import sqlite3

    import sqlalchemy as sa
    from prefect.server.database.configurations import AioSqliteConfiguration

    from lume_operator.prefect.embedded_app import immediate_writes

    path = tmp_path / "prefect.db"
    url = f"sqlite+aiosqlite:///{path}"
    config = immediate_writes(url) if immediate else AioSqliteConfiguration(connection_url=url)

    def another_writer_gets_the_lock() -> bool:
        with sqlite3.connect(path, timeout=0, isolation_level=None) as other:
            try:
                other.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as error:
                assert "locked" in str(error)
                return False
            other.execute("ROLLBACK")
            return True

    async def scenario() -> bool:
        engine = await config.engine()
        try:
            session = await config.session(engine)
            async with session, config.begin_transaction(session):
                await session.execute(sa.text("select 1"))
                return another_writer_gets_the_lock()
        finally:
            await engine.dispose()

    assert anyio.run(scenario) is not immediate
