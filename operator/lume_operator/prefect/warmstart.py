"""The command a warm worker runs for a flow run: `python -m lume_operator.prefect.warmstart
MODULE [ARG...]`, standing in for `python -m MODULE [ARG...]`.

It imports nothing but the standard library (it starts in tens of milliseconds), hands its
argv, working directory, environment, stdin, stdout and stderr to the fork server named by
`LUME_FORK_SERVER`, forwards the signals the worker sends (SIGTERM to cancel) to the run's
process group, and exits as the run exited: with its code, or killed by the same signal. To
Prefect's process worker it is the flow-run process. Without a reachable fork server, or when
the server answers that this run needs a fresh interpreter, it becomes one (`exec`): a cold
start, as before.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from typing import Any

from lume_operator.prefect.forkserver import SOCKET_ENV, recv_message, send_message

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2)  # fmt: skip


class _Forwarder:
    """Signals that reach the launcher go to the run's process group (held until it exists)."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.pending: list[int] = []
        for signum in FORWARDED:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.pid is None:
            self.pending.append(signum)
        else:
            _signal_group(self.pid, signum)

    def attach(self, pid: int) -> None:
        self.pid = pid
        for signum in self.pending:
            _signal_group(pid, signum)
        self.pending.clear()


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def cold(module: str, args: list[str], reason: str | None) -> None:
    """Become `python -m MODULE ARGS` (never returns)."""
    if reason:
        print(f"lume-operator warm start: {reason}; starting a new interpreter", file=sys.stderr)
        sys.stderr.flush()
    for signum in FORWARDED:
        signal.signal(signum, signal.SIG_DFL)
    os.execv(sys.executable, [sys.executable, "-m", module, *args])


def _die_like(message: dict[str, Any]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    if "signal" in message:
        signum = int(message["signal"])
        with contextlib.suppress(OSError, ValueError):  # SIGKILL and SIGSTOP have no handler
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        time.sleep(1)  # a signal that does not kill (stopped, ignored): exit as a shell does
        os._exit(128 + signum)
    os._exit(int(message.get("exit", 1)))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        sys.exit("usage: python -m lume_operator.prefect.warmstart MODULE [ARG ...]")
    module, rest = args[0], args[1:]
    forwarder = _Forwarder()
    path = os.environ.get(SOCKET_ENV)
    if not path:
        cold(module, rest, None)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        request = {"module": module, "argv": rest, "cwd": os.getcwd(), "env": dict(os.environ)}
        send_message(sock, request, [0, 1, 2])
        answer = recv_message(sock)
    except OSError as error:
        cold(module, rest, f"fork server unreachable ({error.strerror or error})")
        return
    if answer is None or "pid" not in answer[0]:
        reason = answer[0].get("cold") if answer else "the fork server closed the connection"
        cold(module, rest, reason)
        return
    pid = int(answer[0]["pid"])
    forwarder.attach(pid)
    try:
        ended = recv_message(sock)
    except OSError:
        ended = None
    if ended is None:
        # The server went away before the run ended: its exit status is lost with it.
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        print("lume-operator warm start: fork server lost; exit status unknown", file=sys.stderr)
        _die_like({"exit": 1})
    _die_like(ended[0])


if __name__ == "__main__":
    main()
