"""A fork server for warm flow-run starts: one clean process that imported Prefect once and
forks a flow-run process per request, instead of a new interpreter importing it again.

A cold flow-run process spends 2 to 3 CPU-seconds starting Python and importing Prefect before
any flow code runs; on 2 cores, 8 parallel steps wait for each other's imports. This server is
started clean (`python -m lume_operator.prefect.forkserver SOCKET`: single-threaded, Prefect
imported, no client, no event loop) and forks from that state only, so a child never inherits
a lock held by a thread or a half-used connection. It refuses to serve if importing left a
thread running.

Each request comes from a launcher (`lume_operator.prefect.warmstart`, the command a worker
runs for a flow run) with its argv, working directory, full environment and its stdin, stdout
and stderr (passed as file descriptors over the Unix socket). The child makes them its own,
starts a new session (so a signal to its process group reaches the flow's own children), and
runs the module as `python -m` would. The server sends the child's pid and later its exit
status to the launcher, which exits with it, so the worker sees the run's own exit code. If the
launcher dies first (SIGKILL after a cancel's grace), the server kills the run's process group:
a run never outlives the process its worker tracks.

Interpreter settings fixed at start (hash seed, -X options, most PYTHON* variables) cannot
change after a fork: a request whose environment sets them differently is answered "cold" and
its launcher starts a new interpreter instead.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import importlib
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SOCKET_ENV = "LUME_FORK_SERVER"
# Imported once by the server: what every flow-run process would import before flow code.
PRELOAD = (
    "prefect",
    "prefect.flow_engine",
    "prefect.task_engine",
    "prefect.flows",
    "prefect.results",
    "prefect.deployments.steps",
    "prefect.deployments.steps.core",
    "prefect.deployments.steps.pull",
    "prefect.runner.storage",
    "prefect.events.clients",
    "prefect.logging.handlers",
    "prefect.client.orchestration",
    "prefect._internal.metrics",
    "prefect._internal.control_listener",
    "lume_operator.prefect.serializer",
    # What a flow run imports on its way (found by listing a warm run's new modules).
    "anyio._backends._asyncio",
    "pydantic.v1",
    "encodings.idna",
)
# PYTHON* variables a forked child can honour; any other that differs from the server's
# environment needs a new interpreter.
ADJUSTABLE = {"PYTHONPATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"}
HEADER = struct.Struct("!I")
MAX_MESSAGE = 16 * 1024 * 1024
MAX_FDS = 3


def send_message(sock: socket.socket, message: dict[str, Any], fds: list[int] = ()) -> None:  # type: ignore[assignment]
    """One length-prefixed JSON message, with file descriptors attached if given."""
    data = json.dumps(message).encode()
    payload = HEADER.pack(len(data)) + data
    if fds:
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
        sent = sock.sendmsg([payload], rights)
        payload = payload[sent:]
    if payload:
        sock.sendall(payload)


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = sock.recv(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv_message(sock: socket.socket, with_fds: bool = False) -> tuple[Any, list[int]] | None:
    """The next message and any file descriptors that came with it; None at end of stream."""
    fds: list[int] = []
    if with_fds:
        space = socket.CMSG_SPACE(MAX_FDS * struct.calcsize("i"))
        first, ancillary, _, _ = sock.recvmsg(HEADER.size, space)
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(data) - len(data) % struct.calcsize("i")
                fds.extend(struct.unpack(f"{usable // 4}i", data[:usable]))
        if not first:
            return None
        rest = _recv_exact(sock, HEADER.size - len(first)) if len(first) < HEADER.size else b""
        if rest is None:
            return None
        head = first + rest
    else:
        head = _recv_exact(sock, HEADER.size)
        if head is None:
            return None
    (size,) = HEADER.unpack(head)
    if size > MAX_MESSAGE:
        raise ValueError(f"message of {size} bytes refused (at most {MAX_MESSAGE})")
    body = _recv_exact(sock, size)
    if body is None:
        return None
    return json.loads(body), fds


def exit_status(status: int) -> dict[str, int]:
    """A waitpid status as the launcher reproduces it: an exit code or a signal."""
    if os.WIFSIGNALED(status):
        return {"signal": os.WTERMSIG(status)}
    return {"exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1}


def _pythonpath(env: dict[str, str]) -> list[str]:
    return [entry for entry in env.get("PYTHONPATH", "").split(os.pathsep) if entry]


class _Server:
    """The accept/fork/reap loop: single-threaded, one selector, signals through a pipe."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.selector = selectors.DefaultSelector()
        self.runs: dict[int, socket.socket] = {}  # child pid -> its launcher's connection
        self.by_conn: dict[socket.socket, int] = {}
        self.closing = False
        self.env = dict(os.environ)
        own = _pythonpath(self.env)
        # sys.path as `python -m` builds it: [cwd, *PYTHONPATH, *the rest]; a child gets its
        # own cwd and PYTHONPATH in front of the rest.
        self.base_path = [p for p in sys.path[1:] if p not in own]
        self.wakeup_r, self.wakeup_w = os.pipe()
        os.set_blocking(self.wakeup_w, False)
        os.set_blocking(self.wakeup_r, False)

    def serve(self) -> None:
        signal.set_wakeup_fd(self.wakeup_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the runs and the worker
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, "signal")
        self.selector.register(sys.stdin.fileno(), selectors.EVENT_READ, "lifeline")
        while not (self.closing and not self.runs):
            for key, _ in self.selector.select(timeout=1.0):
                if key.data == "accept":
                    self._accept()
                elif key.data == "signal":
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wakeup_r, 512)
                elif key.data == "lifeline":
                    # The worker that started us is gone: take no new runs, finish these.
                    if not os.read(sys.stdin.fileno(), 512):
                        self.selector.unregister(sys.stdin.fileno())
                        self._stop()
                else:
                    self._launcher_event(key.fileobj)  # type: ignore[arg-type]
            self._reap()

    def _stop(self, *_: Any) -> None:
        if not self.closing:
            self.closing = True
            self.selector.unregister(self.listener)
            self.listener.close()

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        if uid != os.getuid():  # the socket's mode already says so; a second lock
            conn.close()
            return
        conn.settimeout(10)
        try:
            received = recv_message(conn, with_fds=True)
        except (OSError, ValueError):
            received = None
        if received is None:
            conn.close()
            return
        request, fds = received
        try:
            self._start(conn, request, fds)
        finally:
            for fd in fds:
                os.close(fd)

    def _cold_reason(self, env: dict[str, str]) -> str | None:
        for name in sorted(set(env) | set(self.env)):
            if name.startswith("PYTHON") and name not in ADJUSTABLE:
                if env.get(name) != self.env.get(name):
                    return f"{name} differs from the fork server's"
        return None

    def _start(self, conn: socket.socket, request: dict[str, Any], fds: list[int]) -> None:
        if len(fds) != 3:
            send_message(conn, {"cold": f"expected stdin, stdout and stderr, got {len(fds)} fds"})
            conn.close()
            return
        reason = self._cold_reason(request["env"])
        if reason:
            send_message(conn, {"cold": reason})
            conn.close()
            return
        ready_r, ready_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the flow-run process
            os.close(ready_r)
            try:
                _child(self, request, fds, ready_w)
            finally:
                os._exit(70)  # _child never returns; this only guards a bug there
        os.close(ready_w)
        os.read(ready_r, 1)  # the child has its own session: its group can be signalled
        os.close(ready_r)
        conn.settimeout(None)
        try:
            send_message(conn, {"pid": pid})
        except OSError:  # the launcher is gone already
            _kill_group(pid)
        self.runs[pid] = conn
        self.by_conn[conn] = pid
        self.selector.register(conn, selectors.EVENT_READ, "launcher")

    def _launcher_event(self, conn: socket.socket) -> None:
        """A launcher only ever closes its end: before its run ended, that means it died."""
        try:
            data = conn.recv(1)
        except OSError:
            data = b""
        if data:
            return
        self.selector.unregister(conn)
        pid = self.by_conn.pop(conn, None)
        if pid is not None and pid in self.runs:
            _kill_group(pid)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.runs.pop(pid, None)
            if conn is None:
                continue
            if self.by_conn.pop(conn, None) is not None:
                self.selector.unregister(conn)
            with contextlib.suppress(OSError):
                send_message(conn, exit_status(status))
            conn.close()


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _child(server: _Server, request: dict[str, Any], fds: list[int], ready_w: int) -> None:
    """Become the flow-run process the launcher asked for; never returns."""
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGCHLD, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.setsid()
    os.write(ready_w, b"1")
    os.close(ready_w)
    server.selector.close()
    server.listener.close()
    for conn in server.runs.values():
        conn.close()
    os.close(server.wakeup_r)
    os.close(server.wakeup_w)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    env: dict[str, str] = request["env"]
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(env)
        sys.path[:] = [request["cwd"], *_pythonpath(env), *server.base_path]
        sys.dont_write_bytecode = bool(env.get("PYTHONDONTWRITEBYTECODE"))
        if env.get("PYTHONUNBUFFERED"):
            sys.stdout.reconfigure(write_through=True)  # type: ignore[union-attr]
            sys.stderr.reconfigure(write_through=True)  # type: ignore[union-attr]
        _refresh_prefect()
        sys.argv = [request["module"], *request["argv"]]
        code = _run_module(request["module"])
    except BaseException as error:  # a failure to set up: reported as the process's own
        code = _exit_code(error)
    _exit(code)


def _refresh_prefect() -> None:
    """Prefect read its settings and configured logging at import, from the server's
    environment: read them again from this run's."""
    import prefect.context
    import prefect.logging.configuration

    prefect.context.refresh_global_settings_context()
    prefect.logging.configuration.PROCESS_LOGGING_CONFIG.clear()
    prefect.logging.configuration.setup_logging(incremental=False)


def _run_module(module: str) -> int:
    import runpy
    import warnings

    # runpy warns when the module it runs as __main__ was imported already, as the preload
    # imports Prefect's engine: what makes a start warm, nothing for the run's log.
    warnings.filterwarnings(
        "ignore", r".* found in sys\.modules after import of package", RuntimeWarning
    )

    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except BaseException as error:
        return _exit_code(error)
    return 0


def _exit_code(error: BaseException) -> int:
    """What the interpreter would exit with for an exception that reached the top."""
    if isinstance(error, SystemExit):
        if error.code is None:
            return 0
        if isinstance(error, SystemExit) and isinstance(error.code, int):
            return error.code
        print(error.code, file=sys.stderr)
        return 1
    if isinstance(error, KeyboardInterrupt):
        return -signal.SIGINT
    import traceback

    traceback.print_exception(error)
    return 1


def _exit(code: int) -> None:
    """End as an interpreter does: threads joined, atexit handlers run, streams flushed."""
    with contextlib.suppress(BaseException):
        threading._shutdown()  # type: ignore[attr-defined]
    with contextlib.suppress(BaseException):
        import atexit

        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()
    if code < 0:  # died of a signal, as the interpreter does on KeyboardInterrupt
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code & 0xFF)


def _complete_models() -> None:
    """Build now the pydantic schemas the imports left to first use.

    Prefect's client models (FlowRun, Deployment, the state and update models...) refer to
    each other by name, so pydantic builds them at their first validation: in every forked
    run again (12 ms for FlowRun, Deployment and FlowRunUpdate alone). Built here once (0.1 s
    for Prefect's 260), as that first use would build them; a model that cannot be built yet
    is left to its run.
    """
    import pydantic

    pending: list[type[pydantic.BaseModel]] = [pydantic.BaseModel]
    seen: set[type[pydantic.BaseModel]] = set()
    while pending:
        for model in pending.pop().__subclasses__():
            if model in seen:
                continue
            seen.add(model)
            pending.append(model)
            if not model.__pydantic_complete__:
                with contextlib.suppress(Exception):
                    model.model_rebuild()


def _heartbeats_not_joined() -> None:
    """A synchronous flow's engine, past its final state, joins Prefect's heartbeat thread,
    which sleeps in 1 s steps: its process, and a worker waiting for it, lingered up to 1 s
    after each run. Warm runs leave the stopped thread to end with the process, as Prefect's
    async engine does (`join_on_exit=False`); it sends nothing once stopped, and the process
    ends with `os._exit`, so it cannot race the interpreter's teardown."""
    import functools
    import inspect

    flow_engine = sys.modules.get("prefect.flow_engine")
    send = getattr(flow_engine, "_send_heartbeats", None)
    if send is None or "join_on_exit" not in inspect.signature(send).parameters:
        return  # another Prefect: left as it is
    flow_engine._send_heartbeats = functools.partial(send, join_on_exit=False)  # type: ignore[union-attr]


def main(argv: list[str] | None = None) -> int:
    """`python -m lume_operator.prefect.forkserver SOCKET [MODULE...]`: preload, then serve."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(
            "usage: python -m lume_operator.prefect.forkserver SOCKET [MODULE ...]", file=sys.stderr
        )
        return 2
    path, extra = args[0], args[1:]
    for module in PRELOAD:
        importlib.import_module(module)
    for module in extra:  # a flow's own dependencies: one that fails is imported by its run
        try:
            importlib.import_module(module)
        except Exception as error:
            print(f"fork server: not preloaded {module}: {error}", file=sys.stderr)
    _complete_models()
    _heartbeats_not_joined()
    # What every run inherits, out of the collector's full passes: a run's would otherwise walk
    # it all, and write to each object's header, copying the server's pages into the run.
    gc.freeze()
    if threading.active_count() != 1:
        names = ", ".join(thread.name for thread in threading.enumerate())
        print(f"fork server refused: threads running after the imports ({names})", file=sys.stderr)
        return 1
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old)
    listener.listen(64)
    server = _Server(listener)
    print("ready", flush=True)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # nobody reads the pipe any more
    server.serve()
    return 0


class ForkServer:
    """Starts the server in a private directory and stops it; `env` is what a run needs."""

    def __init__(self, preload: list[str] | None = None, timeout: float = 60.0) -> None:
        self.preload = preload or []
        self.timeout = timeout
        self.process: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self.path: str | None = None
        self._ready: bool | None = None
        self._lock = threading.Lock()

    @property
    def env(self) -> dict[str, str]:
        return {SOCKET_ENV: self.path} if self.path else {}

    def start(self) -> ForkServer:
        self._dir = tempfile.TemporaryDirectory(prefix="lume-fork-")
        os.chmod(self._dir.name, 0o700)
        self.path = str(Path(self._dir.name) / "sock")
        # Its stdin is a pipe from here: when this process goes, the server stops taking runs.
        self.process = subprocess.Popen(
            [sys.executable, "-m", __name__, self.path, *self.preload],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        return self

    def wait_ready(self) -> bool:
        """Block until the server answers (True) or failed to start (False); once."""
        with self._lock:
            if self._ready is None:
                assert self.process is not None and self.process.stdout is not None
                self._ready = self.process.stdout.readline().strip() == b"ready"
                if not self._ready:
                    self.path = None
            return self._ready

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(OSError):
            assert self.process.stdin is not None
            self.process.stdin.close()
        deadline = time.monotonic() + self.timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        if self._dir is not None:
            self._dir.cleanup()
        self.process = None


@contextlib.contextmanager
def fork_server(preload: list[str] | None = None) -> Iterator[ForkServer]:
    """A started fork server, ready, stopped at the end."""
    with ForkServer(preload).start() as server:
        server.wait_ready()
        yield server


if __name__ == "__main__":
    try:
        sys.exit(main())
    except OSError as error:
        if error.errno != errno.EINTR:
            raise
