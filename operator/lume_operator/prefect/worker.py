"""Prefect's process worker with warm starts: each flow run forked from a fork server.

`WarmProcessWorker` is Prefect's `ProcessWorker` (same pool type, same job variables, same
states, logs, cancellation and crash detection: Prefect's own code does all of it), with one
change: a flow run whose command is Prefect's engine (`python -m prefect.engine`, the default,
or the local runner's `python -m lume_operator.local.engine`) runs through the launcher
`python -m lume_operator.prefect.warmstart MODULE`, which has the worker's fork server fork the
engine from a process that already imported Prefect. Any other command runs as configured.
(Its job configuration also makes the runs' base environment once per settings object:
`WarmJobConfiguration`.)
The fork server is started with the worker (it imports Prefect while the worker sets up) and
stopped with it; if it cannot start, runs start cold.

The local runner uses it in process; `lume-operator worker` runs it as a process backend's
in-cluster agent.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any, ClassVar

import anyio
import anyio.abc
from prefect.settings import Settings, get_current_settings
from prefect.workers.process import ProcessJobConfiguration, ProcessWorker, ProcessWorkerResult

from lume_operator.prefect.forkserver import ForkServer

LAUNCHER = "lume_operator.prefect.warmstart"
# Modules a warm start may stand in for: Prefect's engine and the local runner's wrapper of it.
ENGINE_MODULES = ("prefect.engine", "lume_operator.local.engine")
PRELOAD_ENV = "LUME_WARM_PRELOAD"


def warm_command(configuration: ProcessJobConfiguration) -> str | None:
    """The launcher command standing in for the run's engine command, or None to run it as is."""
    if not configuration._command_configured:
        module, args = "prefect.engine", []
    else:
        argv = shlex.split(configuration.command or "")
        if len(argv) < 3 or argv[1] != "-m" or argv[2] not in ENGINE_MODULES:
            return None
        if os.path.realpath(argv[0]) != os.path.realpath(sys.executable):
            return None  # another interpreter: the fork server cannot stand in for it
        module, args = argv[2], argv[3:]
    return shlex.join([sys.executable, "-m", LAUNCHER, module, *args])


def preload_from_env() -> list[str]:
    """Extra modules the fork server imports (LUME_WARM_PRELOAD, comma-separated)."""
    return [name.strip() for name in os.environ.get(PRELOAD_ENV, "").split(",") if name.strip()]


class WarmJobConfiguration(ProcessJobConfiguration):
    """Prefect's process job configuration, its base environment (Prefect's settings as
    variables) made once per settings object rather than for every run: 18 ms of the
    worker's event loop each, while it starts the other runs of a fan-out."""

    _made_for: ClassVar[tuple[Settings, dict[str, str]] | None] = None

    @classmethod
    def _base_environment(cls) -> dict[str, str]:
        settings = get_current_settings()
        made = WarmJobConfiguration._made_for
        if made is None or made[0] is not settings:
            made = (settings, super()._base_environment())
            WarmJobConfiguration._made_for = made
        return dict(made[1])


class WarmProcessWorker(ProcessWorker):
    """A process worker whose flow runs start warm; see the module's docstring."""

    _description = "Execute flow runs as processes forked from a warm fork server."
    job_configuration = WarmJobConfiguration

    def __init__(
        self,
        *args: Any,
        warm_starts: bool = True,
        preload: list[str] | None = None,
        fork_server: ForkServer | None = None,
        **kwargs: Any,
    ) -> None:
        """`fork_server`: one started by the caller (who stops it), e.g. before Prefect's server
        starts, so that both import at once; by default the worker starts its own."""
        super().__init__(*args, **kwargs)
        self.warm_starts = warm_starts
        self._preload = [*preload_from_env(), *(preload or [])]
        self._fork_server = fork_server
        self._owns_server = fork_server is None
        self._server_env: dict[str, str] | None = None
        self._server_lock = anyio.Lock()

    @classmethod
    def __dispatch_key__(cls) -> str:
        # Its own key in Prefect's worker registry: `process` stays Prefect's ProcessWorker.
        return "lume-warm-process"

    async def setup(self) -> None:
        if self.warm_starts and self._owns_server and self._fork_server is None:
            self._fork_server = ForkServer(self._preload).start()
        await super().setup()

    async def teardown(self, *exc_info: Any) -> None:
        try:
            await super().teardown(*exc_info)
        finally:
            if self._owns_server:
                server, self._fork_server, self._server_env = self._fork_server, None, None
                if server is not None:
                    await anyio.to_thread.run_sync(server.stop)

    async def _warm_env(self) -> dict[str, str]:
        """The fork server's address once it is ready; empty if it failed to start."""
        async with self._server_lock:
            if self._server_env is None:
                server = self._fork_server
                ready = server is not None and await anyio.to_thread.run_sync(server.wait_ready)
                if server is not None and not ready:
                    self._logger.warning("fork server did not start: flow runs start cold")
                self._server_env = server.env if ready and server else {}
            return self._server_env

    async def run(
        self,
        flow_run: Any,
        configuration: ProcessJobConfiguration,
        task_status: anyio.abc.TaskStatus[int] | None = None,
    ) -> ProcessWorkerResult:
        directory = configuration.working_dir
        if directory is not None and not Path(directory).is_dir():
            # Said here: a process started in it would fail inside Prefect's task group, and
            # the run would crash as "unhandled errors in a TaskGroup".
            raise FileNotFoundError(
                f"working directory {str(directory)!r} does not exist on this worker "
                "(the LumeFlow's source.path or runConfig workingDir)"
            )
        command = warm_command(configuration) if self.warm_starts else None
        if command is not None:
            env = await self._warm_env()
            if env:
                configuration.command = command
                configuration._command_configured = True
                configuration.env.update(env)
        return await super().run(flow_run, configuration, task_status)
