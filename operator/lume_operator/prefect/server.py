"""The Prefect API for local runs: the one configured, or an embedded server started here.

A fresh embedded server spends most of its start (13 s of 13 s against 6 s here, on 2 cores)
creating its SQLite database: running every migration and registering Prefect's block types.
Both give the same database for one Prefect version, so the first start keeps a copy of it
(taken with SQLite's backup API right after the server answered, before anything else is
written) in the user's cache, and later starts in a new Prefect home begin from that copy with
migrations and block registration off.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import prefect
import prefect.settings
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import (
    PREFECT_API_BLOCKS_REGISTER_ON_START,
    PREFECT_API_DATABASE_MIGRATE_ON_START,
    PREFECT_API_URL,
    get_current_settings,
    temporary_settings,
)
from prefect.settings.legacy import Setting

CACHE_ENV = "LUME_OPERATOR_CACHE_DIR"
# A seeded database is migrated and has Prefect's block types already.
SEEDED_SETTINGS = {
    PREFECT_API_DATABASE_MIGRATE_ON_START: False,
    PREFECT_API_BLOCKS_REGISTER_ON_START: False,
}
PORT_IN_USE = 3  # uvicorn's exit code when its port is taken
PEM_CERTIFICATE = re.compile(
    r"-----BEGIN CERTIFICATE-----\n.*?\n-----END CERTIFICATE-----\n", re.DOTALL
)


class EmbeddedServer:
    """Prefect's server in a subprocess, as Prefect's `SubprocessASGIServer` starts it (the same
    uvicorn command and environment, its app behind `embedded_app.RetryBusy`), without importing
    Prefect's server package here: that takes seconds, and only the subprocess needs it."""

    def __init__(self, database: Path | None = None) -> None:
        """`database`: the SQLite file it must use (the one seeded, or to be kept)."""
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.database = database

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _spawn(self) -> subprocess.Popen[bytes]:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        env = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            **get_current_settings().to_environment_variables(exclude_unset=True),
        }
        if self.database is not None:
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{self.database}"
        command = [
            sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
            "--factory", "lume_operator.prefect.embedded_app:create_app", "--host", "127.0.0.1",
            "--port", str(self.port), "--log-level", "error", "--lifespan", "on",
        ]  # fmt: skip
        return subprocess.Popen(command, env=env)

    def start(self, timeout: float) -> None:
        self.process = self._spawn()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code == PORT_IN_USE:  # taken between the probe and uvicorn's bind
                self.process = self._spawn()
            elif code is not None:
                raise RuntimeError(f"the embedded Prefect server exited with code {code}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the embedded Prefect server did not answer within {timeout:g} s")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


def cache_dir() -> Path:
    """LUME_OPERATOR_CACHE_DIR, else $XDG_CACHE_HOME/lume-operator, else ~/.cache/lume-operator."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lume-operator"


def _template() -> Path:
    return cache_dir() / f"prefect-{prefect.__version__}.db"


def _home_database() -> Path | None:
    """The embedded server's SQLite file, when it is Prefect's default one under its home."""
    settings = get_current_settings()
    if settings.server.database.connection_url is not None:
        url = settings.server.database.connection_url.get_secret_value()
        default = f"sqlite+aiosqlite:///{settings.home / 'prefect.db'}"
        if url != default:
            return None
    return settings.home / "prefect.db"


def seed_database(database: Path | None) -> bool:
    """A new home's database from the cached copy; True if seeded (then start the server with
    migrations and block registration off: `SEEDED_SETTINGS`)."""
    template = _template()
    if database is None or database.exists() or not template.is_file():
        return False
    try:
        database.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, database)
    except OSError:
        return False
    return True


def keep_database(database: Path | None) -> None:
    """A copy of a freshly started server's database, for the next new home (best effort)."""
    template = _template()
    if database is None or not database.is_file() or template.exists():
        return
    partial = template.with_suffix(f".{os.getpid()}.partial")
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(sqlite3.connect(database)) as source:
            with contextlib.closing(sqlite3.connect(partial)) as copy:
                source.backup(copy)
        os.replace(partial, template)
    except (OSError, sqlite3.Error):
        with contextlib.suppress(OSError):
            partial.unlink()


def unused_ca_bundle() -> Path | None:
    """A one-certificate CA bundle for clients of the embedded server, which is plain HTTP.

    Prefect builds a verifying TLS context for every client it creates, HTTP or not, loading
    certifi's bundle each time (18 ms; about ten clients per flow run, engine and worker).
    Over HTTP no certificate is ever verified, so the bundle's content does not matter, only
    that it holds one certificate (OpenSSL refuses an empty one): the first of certifi's,
    copied once into the cache. None if it cannot be written (Prefect's default then).
    """
    import certifi

    bundle = cache_dir() / "unused-ca.pem"
    if bundle.is_file():
        return bundle
    try:
        found = PEM_CERTIFICATE.search(Path(certifi.where()).read_text())
        if found is None:
            return None
        bundle.parent.mkdir(parents=True, exist_ok=True)
        partial = bundle.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(found.group(0))
        os.replace(partial, bundle)
    except OSError:
        return None
    return bundle


def _embedded_client_env(api_url: str) -> dict[str, str]:
    """What this process and its flow runs are given for the embedded server: its address,
    and what spares each new Prefect client (about ten per flow run) work that only a server
    it does not know would need: a version check, a CSRF token, a whole CA bundle."""
    env = {
        "PREFECT_API_URL": api_url,
        # The server is this Prefect, started from this interpreter.
        "PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED": "false",
    }
    if not get_current_settings().server.api.csrf_protection_enabled:
        env["PREFECT_CLIENT_CSRF_SUPPORT_ENABLED"] = "false"  # each client asked, and was told
    # A configured bundle (or SSL_CERT_FILE, Prefect's default) would be loaded as uselessly.
    bundle = unused_ca_bundle()
    if bundle is not None:
        env["PREFECT_API_SSL_CERT_FILE"] = str(bundle)
    return env


def _setting(name: str) -> Setting:
    return getattr(prefect.settings, name)


@contextlib.contextmanager
def prefect_api(startup_timeout: int = 120) -> Iterator[tuple[str, bool]]:
    """Yield (api_url, embedded): `PREFECT_API_URL` when set, else a fresh local server.

    The embedded server is Prefect's own (SQLite under PREFECT_HOME), in a subprocess; the URL
    is also exported so the worker's flow-run processes reach the same server, with a CA
    bundle of one certificate (`unused_ca_bundle`) in place of any other, and no version or
    CSRF-token requests (`_embedded_client_env`).
    """
    configured = PREFECT_API_URL.value()
    if configured:
        yield configured, False
        return
    database = _home_database()
    seeded = seed_database(database)
    server = EmbeddedServer(database)
    with temporary_settings(updates=SEEDED_SETTINGS if seeded else {}):
        server.start(timeout=startup_timeout)
    if not seeded:
        keep_database(database)
    exported = _embedded_client_env(server.api_url)
    previous = {name: os.environ.get(name) for name in exported}
    os.environ.update(exported)
    try:
        with temporary_settings(updates={_setting(name): v for name, v in exported.items()}):
            yield server.api_url, True
    finally:
        # Logs and events still queued for the API go now, while it is up: sent after it
        # stopped, Prefect retries them for a minute before the process can exit.
        APILogWorker.drain_all(timeout=5)
        EventsWorker.drain_all(timeout=5)
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()
