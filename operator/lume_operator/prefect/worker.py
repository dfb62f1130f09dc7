"""Prefect's process worker with warm starts: each flow run forked from a fork server.

`WarmProcessWorker` is Prefect's `ProcessWorker` (same pool type, same job variables, same
states, logs, cancellation and crash detection: Prefect's own code does all of it), with one
change: a flow run whose command is Prefect's engine (`python -m prefect.engine`, the default,
or the local runner's `python -m lume_operator.local.engine`) runs through the launcher
`python -m lume_operator.prefect.warmstart MODULE`, which has the worker's fork server fork the
engine from a process that already imported Prefect. Any other command runs as configured.
(It also makes Prefect's settings environment for its runs once per settings object, where
Prefect makes it twice per run: `_SettingsEnvironment`.)
The fork server is started with the worker (it imports Prefect while the worker sets up) and
stopped with it; if it cannot start, runs start cold.

The local runner uses it in process; `lume-operator worker` runs it as a process backend's
in-cluster agent.
"""

from __future__ import annotations

import os
import shlex
import sys
from contextvars import ContextVar
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


class _SettingsEnvironment:
    """Prefect's settings as variables (`to_environment_variables(exclude_unset=True)`), made
    once per settings object: Prefect makes them twice for every run it starts (the job
    configuration's base environment, then the engine command's), 18 ms of the worker's
    process each, while it starts a fan-out's other runs. Settings objects are not changed
    in place (`temporary_settings` makes new ones), so the same object gives the same
    variables; each caller gets its own copy."""

    made_for: ClassVar[tuple[Settings, dict[str, str]] | None] = None

    @classmethod
    def of(cls, settings: Settings) -> dict[str, str]:
        made = cls.made_for
        if made is None or made[0] is not settings:
            made = (settings, settings.to_environment_variables(exclude_unset=True))
            cls.made_for = made
        return dict(made[1])


class _StarterSettings:
    """What Prefect's engine command starter gets from `get_current_settings()` while it
    starts a `WarmProcessWorker`'s run: the settings in force, their variables made once."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def to_environment_variables(self, exclude_unset: bool = False, **options: Any) -> Any:
        if exclude_unset and not options:
            return _SettingsEnvironment.of(self._settings)
        return self._settings.to_environment_variables(exclude_unset=exclude_unset, **options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._settings, name)


# Set while a WarmProcessWorker starts a run: only its runs' starter sees `_StarterSettings`
# (a Prefect ProcessWorker in the same process keeps Prefect's own behaviour).
_IN_WARM_RUN: ContextVar[bool] = ContextVar("lume_in_warm_run", default=False)


def _starter_settings() -> Any:
    settings = get_current_settings()
    return _StarterSettings(settings) if _IN_WARM_RUN.get() else settings


def _starter_settings_once() -> None:
    """Have Prefect's engine command starter (`prefect.runner._starter_engine`, which calls
    `get_current_settings` for nothing but the variables) use `_starter_settings`; left
    alone if another Prefect no longer looks it up there."""
    try:
        from prefect.runner import _starter_engine
    except ImportError:
        return
    if getattr(_starter_engine, "get_current_settings", None) is get_current_settings:
        _starter_engine.get_current_settings = _starter_settings  # type: ignore[assignment]


class WarmJobConfiguration(ProcessJobConfiguration):
    """Prefect's process job configuration, its base environment made once per settings
    object (`_SettingsEnvironment`) rather than for every run."""

    @classmethod
    def _base_environment(cls) -> dict[str, str]:
        return _SettingsEnvironment.of(get_current_settings())


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

    # What each worker tells Prefect's server of the installed integrations: the same for
    # every worker of a process (`_worker_metadata`).
    _metadata: ClassVar[list[Any]] = []

    @classmethod
    def __dispatch_key__(cls) -> str:
        # Its own key in Prefect's worker registry: `process` stays Prefect's ProcessWorker.
        return "lume-warm-process"

    async def _worker_metadata(self) -> Any:
        """Prefect's, found once per process. Prefect finds it at each worker's start, while
        the first flow run waits: it reads every installed distribution's metadata (0.25 s
        here), after importing every installed Prefect collection once per process
        (prefect-kubernetes imports kopf and the Kubernetes client: 1.1 s; `lume-operator run`
        has that done while Prefect's server starts). What is installed does not change while
        a worker's process runs."""
        if not WarmProcessWorker._metadata:
            WarmProcessWorker._metadata.append(await super()._worker_metadata())
        return WarmProcessWorker._metadata[0]

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
        _starter_settings_once()
        token = _IN_WARM_RUN.set(True)
        try:
            return await super().run(flow_run, configuration, task_status)
        finally:
            _IN_WARM_RUN.reset(token)
