"""Fixtures for tests against an emulated Kubernetes API: real kubectl, real kopf, no cluster.

- `k8s_emulator`: an `EmulatorServer` (`.url`, and `.https_url`/`.ca_path` over TLS;
  `.emulator` with `.log`, `.refusals()`, `.count()`, `.get_object()`, `.objects`,
  `.issue_token()`; `.patch_status()` to play a controller). RBAC is enforced.
- `node`: the cluster's node, running every pod as a container of its image (`tests/k8s/node.py`).
- `kubeconfig`: a cluster-admin kubeconfig file for it; also exported as `KUBECONFIG` for the
  test, so kopf, the kubernetes client and helm can only ever reach the emulator.
- `kubectl`: ``kubectl("get", "lf", "-o", "yaml")`` runs the real binary as cluster-admin,
  returns the CompletedProcess (``check=True`` raises with stderr on failure).
- `run_kopf_operator`: starts a real kopf operator against the emulator and stops it at
  teardown; see `KopfOperator`. `kopf_registry()` makes a fresh registry that can log in.
  lume-operator itself runs as the Helm chart's ServiceAccount, held to the chart's RBAC
  (`install_chart_rbac`); a request of it that RBAC refuses fails the test at teardown.
- `shared_prefect_server` (from `tests/conftest.py`): one real Prefect server for the whole
  session, emptied before each test that asks for it. Tests that stop or restart Prefect start
  their own `PrefectServer` instead.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import kopf
import pytest
import yaml
from prefect.logging.configuration import ensure_logging_setup

from tests.k8s.emulator import ADMIN_TOKEN, EmulatorServer
from tests.k8s.rbac import UserInfo
from tests.k8s.tools import helm_path, kubectl_path

ROOT = Path(__file__).resolve().parents[2]
OPERATOR = "lume_operator.handlers.operator"
CHART = ROOT / "charts" / "lume-operator"
# The release the operator's RBAC is rendered as: its ServiceAccount lives in RELEASE_NAMESPACE.
RELEASE, RELEASE_NAMESPACE = "lume", "lume-system"
# Namespaces whose Secrets the chart lets a cluster-wide operator read (rbac.secretNamespaces).
SECRET_NAMESPACES = ("default",)
# What `install_chart_rbac` applies of the chart: its RBAC, and kopf's peering objects.
CHART_KINDS = {
    "ServiceAccount": "v1/serviceaccounts",
    "ClusterRole": "rbac.authorization.k8s.io/v1/clusterroles",
    "ClusterRoleBinding": "rbac.authorization.k8s.io/v1/clusterrolebindings",
    "Role": "rbac.authorization.k8s.io/v1/roles",
    "RoleBinding": "rbac.authorization.k8s.io/v1/rolebindings",
    "KopfPeering": "kopf.dev/v1/kopfpeerings",
    "ClusterKopfPeering": "kopf.dev/v1/clusterkopfpeerings",
}

# Importing the operator (it imports Prefect) configures logging with `dictConfig`, which drops
# every root handler, pytest's `caplog` handler among them: a test that starts the first
# in-process operator would see no log record after that. Configure it now, once.
ensure_logging_setup()


class Kubectl(Protocol):
    def __call__(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]: ...


@pytest.fixture
def k8s_emulator() -> Iterator[EmulatorServer]:
    """A fresh emulated API server per test, on 127.0.0.1: HTTP and HTTPS, random ports."""
    with EmulatorServer(tls=True) as server:
        yield server


def write_kubeconfig(
    server: EmulatorServer, path: Path, token: str = ADMIN_TOKEN, namespace: str = "default"
) -> Path:
    """A kubeconfig with one context, `emulator`. A ServiceAccount's token goes over HTTPS
    (with the server's CA): kubectl sends no token over plain HTTP."""
    cluster: dict[str, Any] = {"server": server.url}
    if token != ADMIN_TOKEN:
        assert server.tls, "a ServiceAccount's kubeconfig needs EmulatorServer(tls=True)"
        cluster = {"server": server.https_url, "certificate-authority": str(server.ca_path)}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": cluster}],
        "users": [{"name": "emulator", "user": {"token": token}}],
        "contexts": [
            {
                "name": "emulator",
                "context": {"cluster": "emulator", "user": "emulator", "namespace": namespace},
            }
        ],
        "current-context": "emulator",
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def node(k8s_emulator: EmulatorServer, docker_engine: Any, tmp_path: Path) -> Iterator[Any]:
    """The cluster's node: every pod a container of its image (`tests/k8s/node.py`)."""
    from tests.k8s.node import Node

    with Node(k8s_emulator, docker_engine.client, tmp_path / "node") as running:
        yield running


@pytest.fixture
def kubeconfig(
    k8s_emulator: EmulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """A cluster-admin kubeconfig, namespace `default`; set as KUBECONFIG."""
    path = write_kubeconfig(k8s_emulator, tmp_path / "kubeconfig.yaml")
    monkeypatch.setenv("KUBECONFIG", str(path))
    return path


@functools.cache
def render_chart(
    watch_namespaces: tuple[str, ...] = (), secret_namespaces: tuple[str, ...] = SECRET_NAMESPACES
) -> tuple[dict[str, Any], ...]:
    """What `helm template` renders: cluster-wide, or watching the given namespaces (each with
    its Role), as release `lume` in `lume-system`."""
    args = ["template", RELEASE, str(CHART), "-n", RELEASE_NAMESPACE]
    if watch_namespaces:
        args += ["--set", f"watchNamespaces={{{','.join(watch_namespaces)}}}"]
    else:
        args += ["--set", "clusterWide=true"]
        args += ["--set", f"rbac.secretNamespaces={{{','.join(secret_namespaces)}}}"]
    proc = subprocess.run([str(helm_path()), *args], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}")
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def chart_operator_env(watch_namespaces: tuple[str, ...] = ()) -> dict[str, str]:
    """The operator's own settings (`LUME_OPERATOR_*`) its chart Deployment sets."""
    (deployment,) = [
        o
        for o in render_chart(watch_namespaces)
        if o["kind"] == "Deployment" and o["metadata"]["name"] == f"{RELEASE}-lume-operator"
    ]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {
        e["name"]: e["value"]
        for e in container.get("env", [])
        if e["name"].startswith("LUME_OPERATOR_") and "value" in e
    }


def install_chart_rbac(
    server: EmulatorServer, watch_namespaces: tuple[str, ...] = ()
) -> tuple[UserInfo, str]:
    """Apply the chart's RBAC (and peering objects) to the emulator, as `helm install` would;
    return the operator's identity and a token for it (its ServiceAccount's)."""
    objects = [o for o in render_chart(watch_namespaces) if o["kind"] in CHART_KINDS]
    namespaces = {RELEASE_NAMESPACE, *SECRET_NAMESPACES, *watch_namespaces}
    for namespace in sorted(namespaces):
        server.create("v1/namespaces", None, {"metadata": {"name": namespace}})
    for obj in objects:
        namespace = obj["metadata"].get("namespace")
        server.create(CHART_KINDS[obj["kind"]], namespace, obj)
    (account,) = [o for o in objects if o["kind"] == "ServiceAccount"]
    name = account["metadata"]["name"]
    token = server.emulator.issue_token(RELEASE_NAMESPACE, name)
    return UserInfo.service_account(RELEASE_NAMESPACE, name), token


@pytest.fixture
def kubectl(kubeconfig: Path, tmp_path: Path) -> Kubectl:
    """The real kubectl against the emulator, with a private discovery cache per test."""
    binary = str(kubectl_path())
    cache = tmp_path / "kube-cache"
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "HOME": str(tmp_path)}

    def run(
        *args: str, input: str | None = None, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        cmd = [binary, f"--kubeconfig={kubeconfig}", f"--cache-dir={cache}", *args]
        proc = subprocess.run(
            cmd, input=input, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}{proc.stdout}"
            )
        return proc

    return run


def kopf_registry() -> kopf.OperatorRegistry:
    """A fresh registry for handlers defined in a test, with a login handler that reads
    KUBECONFIG when called (a bare `kopf.OperatorRegistry` has none, and cannot log in)."""
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(kopf.login_with_kubeconfig)
    return registry


class KopfOperator:
    """A real kopf operator against the emulator, in a thread or in a subprocess.

    Thread mode (a registry or an imported module) shares the test's process, so handlers
    defined in the test can record what they saw. The registry must have a login handler:
    make it with `kopf_registry()`; a module must register its own `@kopf.on.login` in kopf's
    default registry (`lume_operator.handlers.operator` does). Subprocess mode
    (``in_subprocess=True``, a module name or a file path) runs ``kopf run`` as users do and
    can be killed hard (`kill()`), e.g. to prove that a restarted operator does not repeat
    work.

    Both are standalone (no peering) unless ``peering=...`` names a peering object, and
    clusterwide unless ``namespaces`` are given. `start()` returns once the operator has
    opened its first watch on the emulator.
    """

    def __init__(
        self,
        target: kopf.OperatorRegistry | types.ModuleType | str,
        server: EmulatorServer,
        kubeconfig: Path,
        *,
        namespaces: list[str] | None = None,
        settings: kopf.OperatorSettings | None = None,
        in_subprocess: bool = False,
        peering: str | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.target = target
        self.server = server
        self.kubeconfig = kubeconfig
        self.namespaces = namespaces
        self.settings = settings
        self.use_subprocess = in_subprocess
        self.peering = peering
        self.log_path = log_path
        self._thread: threading.Thread | None = None
        self._stop_flag = threading.Event()
        self._ready_flag = threading.Event()
        self._failure: BaseException | None = None
        self._proc: Any = None

    def __enter__(self) -> KopfOperator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> KopfOperator:
        # A subprocess imports kopf and Prefect first: 20 s ran out on a busy 2-core machine.
        seen = len(self.server.emulator.log)
        if self.use_subprocess:
            self._start_subprocess()
        else:
            self._start_thread()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(
                    f"the kopf operator exited during startup: {self._failure!r}\n{self.output()}"
                ) from self._failure
            if any(e.action == "watch" for e in self.server.emulator.log[seen:]):
                return self
            time.sleep(0.05)
        calls = "\n".join(f"{e.method} {e.path}" for e in self.server.emulator.log[seen:])
        raise TimeoutError(
            f"the kopf operator opened no watch in {timeout}s; its API calls:\n{calls}\n"
            f"{self.output()}"
        )

    @property
    def alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return self._thread is not None and self._thread.is_alive()

    @property
    def pid(self) -> int:
        """The subprocess's process id (subprocess mode only)."""
        assert self._proc is not None, "pid needs in_subprocess=True"
        return int(self._proc.pid)

    @property
    def returncode(self) -> int | None:
        """The subprocess's exit code; None while it runs (subprocess mode only)."""
        assert self._proc is not None, "returncode needs in_subprocess=True"
        return self._proc.poll()

    def stop(self, timeout: float = 20) -> None:
        """Ask the operator to exit gracefully; kill it (subprocess) if it does not."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGINT)
                try:
                    self._proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            return
        self._stop_flag.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError("the kopf operator thread did not stop")
        if self._failure is not None:
            raise RuntimeError("the kopf operator failed") from self._failure

    def finish(self) -> None:
        """End it after its test: a subprocess is killed (a test that is over needs no graceful
        exit, which takes kopf 1.5 to 2.5 s), a thread is stopped (and reports a failure)."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self.kill()
            return
        self.stop()

    def kill(self) -> None:
        """SIGKILL the subprocess: no cleanup, as when a pod is OOM-killed."""
        assert self._proc is not None, "kill() needs in_subprocess=True"
        self._proc.kill()
        self._proc.wait()

    def output(self) -> str:
        """The subprocess's combined output so far (empty in thread mode: kopf logs to pytest)."""
        if self.log_path is not None and self.log_path.exists():
            return self.log_path.read_text(errors="replace")
        return ""

    # ---- modes -----------------------------------------------------------------------------

    def _registry(self) -> kopf.OperatorRegistry:
        target = self.target
        if isinstance(target, str):
            target = importlib.import_module(target)
        # Without a login handler kopf fails at startup (LoginError: "Ran out of valid
        # credentials"), and start() raises with it; see the class docstring.
        if isinstance(target, kopf.OperatorRegistry):
            return target
        return kopf.get_default_registry()

    def _start_thread(self) -> None:
        registry = self._registry()
        settings = self.settings or kopf.OperatorSettings()
        if self.peering is None:
            settings.peering.standalone = True
        else:
            settings.peering.name = self.peering
            settings.peering.mandatory = True

        def main() -> None:
            loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(
                    kopf.operator(
                        registry=registry,
                        settings=settings,
                        clusterwide=not self.namespaces,
                        namespaces=self.namespaces or (),
                        stop_flag=self._stop_flag,
                        ready_flag=self._ready_flag,
                    )
                )
            except BaseException as e:  # surfaced by stop(); a thread must not fail silently
                self._failure = e
            finally:
                loop.close()

        self._thread = threading.Thread(target=main, name="kopf-operator", daemon=True)
        self._thread.start()

    def _start_subprocess(self) -> None:
        target = self.target
        if isinstance(target, types.ModuleType):
            target = target.__name__
        assert isinstance(target, str), "subprocess mode needs a module name or a file path"
        cmd = [sys.executable, "-m", "kopf", "run", "--verbose"]
        cmd += ["--standalone"] if self.peering is None else ["--peering", self.peering]
        if self.namespaces:
            for ns in self.namespaces:
                cmd += ["--namespace", ns]
        else:
            cmd += ["--all-namespaces"]
        cmd += [target] if target.endswith(".py") else ["-m", target]
        if self.log_path is None:
            self.log_path = Path(self.kubeconfig).parent / f"kopf-{time.monotonic_ns()}.log"
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(ROOT), str(ROOT / "operator"), env.get("PYTHONPATH")])
        )
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
            )


def _is_lume_operator(target: object) -> bool:
    name = target.__name__ if isinstance(target, types.ModuleType) else target
    return name == OPERATOR


@pytest.fixture
def run_kopf_operator(
    k8s_emulator: EmulatorServer,
    kubeconfig: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> Iterator[Callable[..., KopfOperator]]:
    """``run_kopf_operator(registry_or_module, **options)`` -> a started `KopfOperator`.

    lume-operator runs as the chart's ServiceAccount, with the chart's RBAC applied and the
    `LUME_OPERATOR_*` settings of its Deployment (watching ``namespaces=`` when given, else
    cluster-wide); ``as_admin=True`` runs it as
    cluster-admin instead. Its kubeconfig is the operator process's $KUBECONFIG (in thread
    mode the test's own too, from then on: kubectl keeps the admin one by flag). At teardown,
    a request of it that RBAC refused fails the test, unless ``allow_refusals=True``. Other
    operators (a test's own registry) run as cluster-admin.
    """
    caplog.set_level(logging.INFO, logger="kopf")
    started: list[KopfOperator] = []
    held: list[UserInfo] = []  # identities whose refusals fail the test

    def start(
        target: kopf.OperatorRegistry | types.ModuleType | str,
        *,
        as_admin: bool = False,
        allow_refusals: bool = False,
        **options: Any,
    ) -> KopfOperator:
        config = kubeconfig
        if _is_lume_operator(target) and not as_admin:
            watched = tuple(options.get("namespaces") or ())
            user, token = install_chart_rbac(k8s_emulator, watched)
            config = write_kubeconfig(k8s_emulator, tmp_path / "operator-kubeconfig.yaml", token)
            for name, value in chart_operator_env(watched).items():
                monkeypatch.setenv(name, value)
            if not options.get("in_subprocess"):
                monkeypatch.setenv("KUBECONFIG", str(config))
            if not allow_refusals:
                held.append(user)
        operator = KopfOperator(target, k8s_emulator, config, **options)
        started.append(operator)
        return operator.start()

    yield start
    errors: list[BaseException] = []
    for operator in reversed(started):
        try:
            operator.finish()
        except Exception as e:  # stop them all, then report
            errors.append(e)
    for user in {u.name for u in held}:
        refused = k8s_emulator.emulator.refusals(user)
        if refused:
            lines = "\n".join(f"{e.method} {e.path}: {e.refusal}" for e in refused)
            errors.append(AssertionError(f"RBAC refused the operator's requests:\n{lines}"))
    if errors:
        raise errors[0]
