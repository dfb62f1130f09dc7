"""A Docker Engine for the tests: `dockerd` on its own socket, data root and exec root.

Containers use host networking (`--bridge=none --iptables=false --ip6tables=false`: the engine
touches no network of the host), so every address stays on loopback. Besides its unix socket the
engine listens on `tcp://127.0.0.1:<port>`, which a process or a container with host networking
(a docker worker's pod) reaches by `DOCKER_HOST` without mounting a socket.

The data root is a persistent cache (`$LUME_TEST_DOCKER_ROOT`, else
`~/.cache/lume-operator/docker`), so images built once survive between sessions; the socket,
exec root and pid file live under a short /tmp directory named after the data root (a unix
socket path has at most 107 bytes). One engine serves every pytest session on the machine: a
session reuses a healthy running engine, registers a lease (its pid), and the last session to
leave stops it, so parallel sessions never fight over one data root. A session killed without
cleanup leaves its engine running; the next session adopts it and, last to leave, stops it.

`python -m tests.containers.engine` starts (or finds) the engine and prints its hosts;
`python -m tests.containers.engine stop` stops it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT_ENV = "LUME_TEST_DOCKER_ROOT"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


class EngineUnavailable(RuntimeError):
    """The engine cannot run here; the message says why (with dockerd's log tail if it ran)."""


def data_root() -> Path:
    configured = os.environ.get(ROOT_ENV)
    if configured:
        return Path(configured).absolute()
    return Path.home() / ".cache" / "lume-operator" / "docker"


def run_dir(root: Path) -> Path:
    """Short, per data root: one engine per data root, its socket path well under 107 bytes."""
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:8]
    return Path("/tmp") / f"lume-dockerd-{digest}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@dataclass
class DockerEngine:
    """A running engine: where to reach it, and a docker SDK client for it."""

    root: Path
    run: Path
    pid: int
    tcp_port: int
    lease: Path | None = None  # this holder's lease (acquire), dropped by release

    @property
    def socket_path(self) -> Path:
        return self.run / "docker.sock"

    @property
    def unix_host(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def tcp_host(self) -> str:
        return f"tcp://127.0.0.1:{self.tcp_port}"

    @property
    def log_path(self) -> Path:
        return self.run / "dockerd.log"

    @property
    def env(self) -> dict[str, str]:
        """What a `docker` CLI needs to reach this engine (and only it)."""
        return {"DOCKER_HOST": self.unix_host, "DOCKER_CONFIG": str(self.run / "cli-config")}

    @property
    def client(self) -> Any:
        """A docker SDK client on the unix socket (a new one each time: cheap, not shared)."""
        import docker

        return docker.DockerClient(base_url=self.unix_host, timeout=300)

    def healthy(self) -> bool:
        if not _alive(self.pid):
            return False
        for host in (self.unix_host, self.tcp_host):
            if not _ping(host):
                return False
        return True

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text[-lines:])


def _ping(host: str) -> bool:
    import docker

    try:
        client = docker.DockerClient(base_url=host, timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


@contextlib.contextmanager
def _locked(run: Path) -> Iterator[None]:
    """Serialise start, stop and lease changes between sessions."""
    run.mkdir(parents=True, exist_ok=True)
    with (run / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _state_file(run: Path) -> Path:
    return run / "engine.json"


def _recorded(root: Path, run: Path) -> DockerEngine | None:
    try:
        state = json.loads(_state_file(run).read_text())
        return DockerEngine(root, run, int(state["pid"]), int(state["tcp_port"]))
    except (OSError, ValueError, KeyError):
        return None


def _why_not() -> str | None:
    """Why dockerd cannot run here at all, before trying."""
    if shutil.which("dockerd") is None:
        return "dockerd is not installed (Debian: apt-get install docker.io; scripts/test does it)"
    if os.geteuid() != 0:
        return f"dockerd needs root, and the tests run as uid {os.geteuid()}"
    return None


def _start(root: Path, run: Path, timeout: float) -> DockerEngine:
    reason = _why_not()
    if reason:
        raise EngineUnavailable(reason)
    root.mkdir(parents=True, exist_ok=True)
    for stale in ("docker.sock", "docker.pid", "engine.json"):
        (run / stale).unlink(missing_ok=True)
    # A previous engine killed hard may leave its containerd behind, holding the exec root.
    _kill_stale_containerd(run)
    port = free_port()
    config = run / "daemon.json"
    config.write_text("{}\n")  # not /etc/docker/daemon.json: nothing of the host's engine
    log = run / "dockerd.log"
    command = [
        "dockerd",
        "--config-file", str(config),
        "--host", f"unix://{run / 'docker.sock'}",
        "--host", f"tcp://127.0.0.1:{port}",
        "--data-root", str(root),
        "--exec-root", str(run / "exec"),
        "--pidfile", str(run / "docker.pid"),
        "--bridge=none", "--iptables=false", "--ip6tables=false",
    ]  # fmt: skip
    with log.open("ab") as out:
        out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
        out.flush()
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # not in pytest's process group: Ctrl-C stops it via us
        )
    engine = DockerEngine(root, run, process.pid, port)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EngineUnavailable(
                f"dockerd exited with code {process.returncode}; its log ({log}) ends:\n"
                f"{log_tail(log)}"
            )
        if engine.healthy():
            _state_file(run).write_text(json.dumps({"pid": engine.pid, "tcp_port": port}))
            _prune_containers(engine)
            return engine
        time.sleep(0.2)
    _terminate(process.pid)
    raise EngineUnavailable(
        f"dockerd did not answer in {timeout:.0f}s; its log ends:\n{log_tail(log)}"
    )


def _prune_containers(engine: DockerEngine) -> None:
    """A fresh engine serves no session yet: the stopped containers of earlier sessions (a test
    that died before its cleanup) go, so they do not pile up in the persistent data root."""
    client = engine.client
    try:
        client.containers.prune()
    finally:
        client.close()


def _kill_stale_containerd(run: Path) -> None:
    pid_file = run / "exec" / "containerd" / "containerd.pid"
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    if _alive(pid) and str(run) in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
        _terminate(pid)


def _terminate(pid: int, timeout: float = STOP_TIMEOUT) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    # Reap it if it is our child (started by this process); otherwise init does.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _leases(run: Path) -> Path:
    leases = run / "leases"
    leases.mkdir(parents=True, exist_ok=True)
    return leases


def _live_leases(run: Path) -> list[int]:
    """Pids of the holders still alive; the leases of dead ones are removed."""
    live = []
    for lease in _leases(run).iterdir():
        owner = lease.name.split("-", 1)[0]
        pid = int(owner) if owner.isdigit() else -1
        if pid > 0 and _alive(pid):
            live.append(pid)
        else:
            lease.unlink(missing_ok=True)  # a session that died without leaving
    return live


def acquire(root: Path | None = None, timeout: float = START_TIMEOUT) -> DockerEngine:
    """The healthy engine of this data root, started if none runs, with a lease of its own
    (named after this process) until `release()`."""
    root = root or data_root()
    run = run_dir(root)
    with _locked(run):
        engine = _recorded(root, run)
        if engine is None or not engine.healthy():
            if engine is not None and _alive(engine.pid):
                _terminate(engine.pid)  # running but not answering: replace it
            engine = _start(root, run, timeout)
        engine.lease = _leases(run) / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        engine.lease.touch()
        return engine


def release(engine: DockerEngine) -> bool:
    """Drop this process's lease; the last session to leave stops the engine. True if stopped."""
    with _locked(engine.run):
        if engine.lease is not None:
            engine.lease.unlink(missing_ok=True)
            engine.lease = None
        if _live_leases(engine.run):
            return False
        stop(engine)
        return True


def stop(engine: DockerEngine) -> None:
    """Stop the engine (its containers stop with it) and forget it."""
    _terminate(engine.pid)
    _state_file(engine.run).unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    root = data_root()
    run = run_dir(root)
    if argv[1:2] == ["stop"]:
        with _locked(run):
            engine = _recorded(root, run)
            if engine is not None:
                stop(engine)
                print(f"stopped dockerd {engine.pid}")
        return 0
    try:
        with _locked(run):
            engine = _recorded(root, run)
            if engine is None or not engine.healthy():
                engine = _start(root, run, START_TIMEOUT)
    except EngineUnavailable as error:
        print(error, file=sys.stderr)
        return 1
    print(f"DOCKER_HOST={engine.unix_host}\n# also {engine.tcp_host}; data root {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
