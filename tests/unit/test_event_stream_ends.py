"""The embedded server's event stream handler ends when its client goes
(`StreamsEndWithTheirClients`); other websockets are left to end as their handlers decide.

The handlers here do what Prefect's `/api/events/out` does between events: they wait without
reading from the socket. Mounted under /api, as Prefect's API is."""

from __future__ import annotations

import anyio
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount, WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect

from lume_operator.prefect.embedded_app import StreamsEndWithTheirClients
from tests.k8s.prefect_server import free_port

pytestmark = pytest.mark.unit

WAIT = 4.0  # a handler's wait for its next event: longer than a disconnect takes to arrive


def make_app(ended: dict[str, str]) -> Starlette:
    def waiting(name: str):  # noqa: ANN202
        async def handler(websocket: WebSocket) -> None:
            await websocket.accept()
            assert (await websocket.receive_json()) == {"type": "filter"}
            await websocket.send_json({"type": "ready"})
            try:
                await anyio.sleep(WAIT)
            except anyio.get_cancelled_exc_class():
                ended[name] = "cancelled"
                raise
            ended[name] = "waited"

        return handler

    api = Starlette(
        routes=[
            WebSocketRoute("/events/out", waiting("out")),
            WebSocketRoute("/events/in", waiting("in")),
        ]
    )
    return Starlette(routes=[Mount("/api", app=api)])


async def _connect_and_leave(app: object, path: str, ended: dict[str, str]) -> None:
    """Over real HTTP (uvicorn, as the embedded server): a client subscribes, then closes."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="error")
    )
    async with anyio.create_task_group() as group:
        group.start_soon(server.serve)
        while not server.started:
            await anyio.sleep(0.01)
        async with connect(f"ws://127.0.0.1:{port}/api/events/{path}") as client:
            await client.send('{"type": "filter"}')  # messages still reach the handler
            assert await client.recv() == '{"type":"ready"}'
        with anyio.fail_after(WAIT * 3):
            while path not in ended:
                await anyio.sleep(0.01)
        server.should_exit = True


@pytest.mark.parametrize(("path", "ends"), [("out", "cancelled"), ("in", "waited")])
def test_a_stream_handler_ends_as_its_client_goes_and_only_the_stream(path: str, ends: str):
    """The stream's handler is cancelled once its client closed, before its wait is over;
    another websocket's handler waits as it would without the middleware."""
    ended: dict[str, str] = {}
    anyio.run(_connect_and_leave, StreamsEndWithTheirClients(make_app(ended)), path, ended)
    assert ended == {path: ends}


def test_a_stream_handlers_error_comes_out_as_it_was_raised():
    """Not wrapped in the middleware's task group: uvicorn logs what Prefect raised."""

    async def broken(scope: object, receive: object, send: object) -> None:
        raise ValueError("a bug in the handler")

    async def receive() -> dict[str, str]:
        await anyio.sleep(60)
        return {"type": "websocket.disconnect"}

    async def send(message: object) -> None:
        pass

    scope = {"type": "websocket", "path": "/api/events/out"}
    with pytest.raises(ValueError, match="a bug in the handler"):
        anyio.run(StreamsEndWithTheirClients(broken), scope, receive, send)
