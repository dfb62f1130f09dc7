"""A real Prefect server in a subprocess that tests can stop and start again on the same port.

What `SubprocessASGIServer` does (uvicorn on Prefect's app factory, SQLite under PREFECT_HOME),
but owned by the test, so an outage is a real outage: connections refused, then the same
database back. One server can serve many tests in turn: `reset()` empties it between them.

A new server's database starts as the embedded server's does (`lume_operator.prefect.server`):
from the copy of a fresh one's that the first start of the session keeps (tests/conftest.py
gives each session its cache), with migrations and block registration off, which spares each
start about 4 of its 9.5 CPU seconds.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from lume_operator.prefect.server import SEEDED_SETTINGS, keep_database, seed_database


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrefectServer:
    """`database_url`: a PostgreSQL database (`postgresql+asyncpg://...`) instead of SQLite
    under the home; migrated by the server at its first start."""

    def __init__(
        self, home: Path, port: int | None = None, database_url: str | None = None
    ) -> None:
        self.home = home
        self.port = port or free_port()
        self.database_url = database_url
        self.process: subprocess.Popen[bytes] | None = None
        self.log = home / "server.log"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def database(self) -> Path:
        return self.home / "prefect.db"

    def start(self, timeout: float = 60) -> PrefectServer:
        self.home.mkdir(parents=True, exist_ok=True)
        fresh = self.database_url is None and not self.database.exists()
        seeded = fresh and seed_database(self.database)
        env = {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_URL": "",
            **({s.name: "false" for s in SEEDED_SETTINGS} if seeded else {}),
        }
        if self.database_url:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = self.database_url
        command = [
            sys.executable, "-m", "uvicorn", "--factory",
            "prefect.server.api.server:create_app",
            "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error",
        ]  # fmt: skip
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Prefect server exited:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=1) as reply:
                    if reply.status == 200:
                        if fresh and not seeded:
                            keep_database(self.database)
                        return self
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"Prefect server not healthy in {timeout}s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    # ---- sharing one server between tests ------------------------------------------------------

    # What the operator (and the flows it runs) make in Prefect, in an order that deletes
    # dependents first; a work pool's queues go with it; block documents are the result
    # storage blocks of object-store backends.
    RESET_ORDER = (("flow_runs", "id"), ("deployments", "id"), ("flows", "id"))
    RESET_ORDER += (("work_pools", "name"), ("block_documents", "id"))

    def _call(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        """One API call; a 503 (SQLite busy, e.g. while a run that just ended still writes)
        is retried until `timeout`."""
        data = None if body is None else json.dumps(body).encode()
        deadline = time.monotonic() + timeout
        while True:
            request = urllib.request.Request(
                f"{self.api_url}/{path}",
                data=data,
                method=method,
                headers={"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=30) as reply:
                    text = reply.read()
                return json.loads(text) if text else None
            except urllib.error.HTTPError as error:
                if error.code != 503 or time.monotonic() > deadline:
                    raise AssertionError(f"{method} {path}: {error}: {error.read()!r}") from error
            time.sleep(0.2)  # poll interval of the retry, not a wait for a condition

    def _list(self, collection: str) -> list[dict[str, Any]]:
        return self._call("POST", f"{collection}/filter", {"limit": 200})

    def reset(self) -> None:
        """Delete every flow run, deployment, flow and work pool, then check none is left, so
        the next test sees only what it makes (counts and names mean what they say)."""
        for collection, key in self.RESET_ORDER:
            for _ in range(100):
                found = self._list(collection)
                if not found:
                    break
                for item in found:
                    try:
                        self._call("DELETE", f"{collection}/{item[key]}")
                    except AssertionError as error:
                        cause = error.__cause__
                        if not (isinstance(cause, urllib.error.HTTPError) and cause.code == 404):
                            raise  # gone already (a cascade) is fine, nothing else
        left = {c: [i[k] for i in self._list(c)] for c, k in self.RESET_ORDER}
        if any(left.values()):
            raise RuntimeError(f"the shared Prefect server is not empty after reset: {left}")
