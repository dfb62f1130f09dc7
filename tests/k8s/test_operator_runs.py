"""Runs users can steer (issue 12), end to end: the operator in a subprocess, kubectl, the
emulated API, the real Prefect server, and a real process worker started from the agent
Deployment the operator rendered, so flows really run, get cancelled and are retried.

- Deleting a LumeFlow or a FlowOfFlows cancels its runs in flight: Prefect says Cancelled and
  the flow's process is gone, then the deployments are removed.
- concurrencyPolicy Replace (OnChange's default) and Forbid; timeoutSeconds; retries; history.
- Prefect refusals (403) end Stalled without a retry storm; an outage (503) is retried.
- One owner per work pool; an agent name already taken is never adopted.
- Kill points in the new paths: exactly one of everything afterwards.
"""

from __future__ import annotations

import http.server
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.k8s.conftest import KopfOperator, Kubectl
from tests.k8s.emulator import EmulatorServer, wait_until
from tests.k8s.kubelet import KubeletStandIn
from tests.k8s.prefect_server import PrefectServer, free_port
from tests.k8s.test_operator_lifecycle import (
    LF,
    SB,
    apply,
    on_prefect,
    ready,
    start_operator,
    status_of,
    work_pool_or_none,
)

FOF = "lume.dev/v1alpha1/flowofflows"
TIMEOUT = 90.0

pytestmark = pytest.mark.prefect

FLOWS = """
import os
import time
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run


@flow
def sleepy(seconds: float = 300.0) -> dict:
    pids = Path(os.environ["LUME_TEST_PIDS"])
    pids.mkdir(parents=True, exist_ok=True)
    (pids / f"{flow_run.id}.pid").write_text(str(os.getpid()))
    time.sleep(seconds)
    return {"slept": seconds}


@flow
def flaky(marks: str) -> dict:
    seen = Path(marks)
    seen.mkdir(parents=True, exist_ok=True)
    attempt = len(list(seen.iterdir()))
    (seen / str(attempt)).touch()
    if attempt < 2:
        raise RuntimeError(f"attempt {attempt} fails")
    return {"attempts": attempt + 1}


@flow
def quick(i: int = 0) -> dict:
    return {"i": i}
"""


def backend(name: str = "local", namespace: str = "default", extra: str = "") -> str:
    return f"""
apiVersion: lume.dev/v1alpha1
kind: SchedulingBackend
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  type: process
  agent: {{replicas: 1}}
{extra}"""


def lumeflow(name: str, function: str, run: str = "{}", extra: str = "") -> str:
    return f"""
apiVersion: lume.dev/v1alpha1
kind: LumeFlow
metadata: {{name: {name}, namespace: default{extra}}}
spec:
  backendRef: {{name: local}}
  entrypoint: flows.py:{function}
  source: {{path: .}}
  run: {run}
"""


@pytest.fixture
def env(shared_prefect_server: PrefectServer, monkeypatch: pytest.MonkeyPatch) -> PrefectServer:
    monkeypatch.setenv("PREFECT_API_URL", shared_prefect_server.api_url)
    monkeypatch.setenv("LUME_OPERATOR_FOLLOW_INTERVAL", "1")
    monkeypatch.setenv("LUME_OPERATOR_CANCEL_GRACE", "30")
    monkeypatch.delenv("LUME_OPERATOR_FAILPOINT", raising=False)
    return shared_prefect_server


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    (root / "flows.py").write_text(FLOWS)
    return root


@pytest.fixture
def worker(k8s_emulator: EmulatorServer, project: Path) -> Iterator[Callable[..., KubeletStandIn]]:
    """Starts the agent Deployment `<backend>-agent` as a real process worker, once Ready."""
    started: list[KubeletStandIn] = []

    def start(name: str = "local", namespace: str = "default") -> KubeletStandIn:
        wait_until(
            lambda: k8s_emulator.emulator.get_object(
                "apps/v1/deployments", namespace, f"{name}-agent"
            ),
            timeout=TIMEOUT,
        )
        kubelet = KubeletStandIn(
            k8s_emulator,
            namespace,
            f"{name}-agent",
            project,
            extra_env={"LUME_TEST_PIDS": str(project / "pids")},
        )
        started.append(kubelet.start())
        return kubelet

    yield start
    for kubelet in started:
        kubelet.stop()


def wait_for(
    server: EmulatorServer, resource: str, name: str, done: Callable[[dict[str, Any]], Any]
) -> dict[str, Any]:
    try:
        return wait_until(
            lambda: (status := status_of(server, resource, name)) and done(status) and status,
            timeout=TIMEOUT,
            interval=0.2,
        )
    except AssertionError as error:
        raise AssertionError(f"{error}\n{name}: {status_of(server, resource, name)}") from None


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def run_state(server: PrefectServer, run_id: str) -> str:
    run = on_prefect(server, lambda client: client.read_flow_run(run_id))
    return run.state.type.value


def runs_of(server: PrefectServer, flow_name: str) -> list[Any]:
    async def read(client: Any) -> list[Any]:
        from prefect.client.schemas.filters import FlowFilter, FlowFilterName

        return await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name]))
        )

    return on_prefect(server, read)


def deployment_exists(server: PrefectServer, name: str) -> bool:
    async def read(client: Any) -> bool:
        from prefect.exceptions import ObjectNotFound

        try:
            await client.read_deployment_by_name(name)
        except ObjectNotFound:
            return False
        return True

    return on_prefect(server, read)


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def pid_of(project: Path, run_id: str) -> int:
    path = project / "pids" / f"{run_id}.pid"
    wait_until(path.exists, timeout=TIMEOUT)
    return int(path.read_text())


def running(server: EmulatorServer, name: str) -> dict[str, Any]:
    return wait_for(
        server, LF, name, lambda s: (s.get("lastRun") or {}).get("stateType") == "RUNNING"
    )


def long_study_running(server: EmulatorServer, kubectl: Kubectl) -> dict[str, Any]:
    """A FlowOfFlows of one long step, applied; its status once the step runs."""
    apply(kubectl, lumeflow("sleeper", "sleepy", "{policy: OnRequest}"))
    wait_for(server, LF, "sleeper", lambda s: s.get("deploymentId"))
    apply(
        kubectl,
        """
apiVersion: lume.dev/v1alpha1
kind: FlowOfFlows
metadata: {name: long-study, namespace: default}
spec:
  steps:
    - {name: wait, flowRef: {name: sleeper}}
""",
    )
    return wait_for(
        server,
        FOF,
        "long-study",
        lambda s: any(step.get("phase") == "Running" for step in s.get("steps") or []),
    )


# ---- cancellation -----------------------------------------------------------------------


def test_deleting_a_running_lumeflow_cancels_its_run_and_stops_its_process(
    env, project, k8s_emulator, kubectl: Kubectl, run_kopf_operator, monkeypatch, worker
):
    start_operator(run_kopf_operator, monkeypatch)
    apply(kubectl, backend())
    worker()
    apply(kubectl, lumeflow("sleeper", "sleepy"))
    run_id = running(k8s_emulator, "sleeper")["lastRun"]["id"]
    pid = pid_of(project, run_id)
    assert alive(pid)

    kubectl("delete", "lf", "sleeper", "--timeout=90s", timeout=100)
    assert k8s_emulator.emulator.get_object(LF, "default", "sleeper") is None
    assert run_state(env, run_id) == "CANCELLED"
    wait_until(lambda: not alive(pid), timeout=30)
    assert not deployment_exists(env, "sleeper/default")


def test_deleting_a_flow_of_flows_cancels_its_parent_and_steps(
    env, project, k8s_emulator, kubectl: Kubectl, run_kopf_operator, monkeypatch, worker
):
    start_operator(run_kopf_operator, monkeypatch)
    apply(kubectl, backend())
    worker()
    status = long_study_running(k8s_emulator, kubectl)
    parent = status["run"]["id"]
    child = next(step["run"]["id"] for step in status["steps"] if step.get("run"))
    pid = pid_of(project, child)

    kubectl("delete", "fof", "long-study", "--timeout=90s", timeout=100)
    assert k8s_emulator.emulator.get_object(FOF, "default", "long-study") is None
    assert run_state(env, parent) == "CANCELLED"
    assert run_state(env, child) == "CANCELLED"
    wait_until(lambda: not alive(pid), timeout=30)
    assert not deployment_exists(env, "FlowOfFlows/default.long-study")
    assert deployment_exists(env, "sleeper/default")  # a LumeFlow's own: not the composition's


# ---- concurrency, deadlines, retries, history -------------------------------------------


def test_a_new_generation_replaces_the_run_in_flight(
    env, project, k8s_emulator, kubectl: Kubectl, run_kopf_operator, monkeypatch, worker
):
    start_operator(run_kopf_operator, monkeypatch)
    apply(kubectl, backend())
    worker()
    apply(kubectl, lumeflow("sleeper", "sleepy"))
    first = running(k8s_emulator, "sleeper")["lastRun"]["id"]
    pid = pid_of(project, first)
    kubectl(
        "patch", "lf", "sleeper", "--type=merge", "-p", '{"spec":{"parameters":{"seconds":299}}}'
    )
    status = wait_for(
        k8s_emulator,
        LF,
        "sleeper",
        lambda s: s["lastRun"]["id"] != first and s["lastRun"]["generation"] == 2,
    )
    wait_until(lambda: run_state(env, first) == "CANCELLED", timeout=TIMEOUT)
    wait_until(lambda: not alive(pid), timeout=30)
    replaced = wait_for(
        k8s_emulator,
        LF,
        "sleeper",
        lambda s: any(
            r.get("id") == first and r.get("stateType") == "CANCELLED" for r in s["runs"]
        ),
    )
    old = next(r for r in replaced["runs"] if r.get("id") == first)
    assert old["reason"] == "Replaced"
    assert status["runs"][0]["id"] == status["lastRun"]["id"]
    assert len(runs_of(env, "sleeper")) == 2


def test_forbid_skips_a_request_while_a_run_is_in_flight(
    env, project, k8s_emulator, kubectl: Kubectl, run_kopf_operator, monkeypatch, worker
):
    start_operator(run_kopf_operator, monkeypatch)
    apply(kubectl, backend())
    worker()
    apply(kubectl, lumeflow("sleeper", "sleepy", "{policy: OnRequest, concurrencyPolicy: Forbid}"))
    wait_for(k8s_emulator, LF, "sleeper", lambda s: s.get("phase") == "Ready")
    kubectl("annotate", "lf", "sleeper", "lume.dev/run-request=1")
    first = running(k8s_emulator, "sleeper")["lastRun"]["id"]
    kubectl("annotate", "--overwrite", "lf", "sleeper", "lume.dev/run-request=2")
    status = wait_for(
        k8s_emulator, LF, "sleeper", lambda s: s.get("lastRequest") == 2 and len(s["runs"]) == 2
    )
    skipped = status["runs"][0]
    assert skipped["state"] == "Skipped" and skipped["reason"] == "ConcurrencyForbid"
    assert status["lastRun"]["id"] == first
    assert [str(r.id) for r in runs_of(env, "sleeper")] == [first]
    events = json.loads(kubectl("get", "events", "-o", "json").stdout)["items"]
    assert "RunSkipped" in {e["reason"] for e in events}
    # A spec change alone starts no OnRequest run.
    kubectl("patch", "lf", "sleeper", "--type=merge", "-p", '{"spec":{"parameters":{"seconds":5}}}')
    wait_for(k8s_emulator, LF, "sleeper", lambda s: s.get("observedGeneration") == 2)
    assert len(runs_of(env, "sleeper")) == 1


def test_a_run_past_its_deadline_is_cancelled_and_failed(
    env, project, k8s_emulator, kubectl: Kubectl, run_kopf_operator, monkeypatch, worker
):
    start_operator(run_kopf_operator, monkeypatch)
    apply(kubectl, backend())
    worker()
    apply(kubectl, lumeflow("sleeper", "sleepy", "{timeoutSeconds: 8}"))
    run_id = running(k8s_emulator, "sleeper")["lastRun"]["id"]
    pid = pid_of(project, run_id)
    status = wait_for(
        k8s_emulator, LF, "sleeper", lambda s: condition(s, "Stalled").get("status") == "True"
    )
    assert status["phase"] == "Failed"
    assert condition(status, "Stalled")["reason"] == "DeadlineExceeded"
    assert ready(status)["reason"] == "DeadlineExceeded"
    wait_until(lambda: run_state(env, run_id) == "CANCELLED", timeout=TIMEOUT)
    wait_until(lambda: not alive(pid), timeout=30)
    assert len(runs_of(env, "sleeper")) == 1  # a deadline is not retried


def test_a_failing_flow_is_retried_until_it_completes(
    env, project, tmp_path, k8s_emulator, kubectl: Kubectl, run_kopf_operator, monkeypatch, worker
):
    start_operator(run_kopf_operator, monkeypatch)
    apply(kubectl, backend())
    worker()
    marks = tmp_path / "marks"
    apply(
        kubectl,
        lumeflow("flaky", "flaky", "{retries: 2, retryDelaySeconds: 1}")
        + f"  parameters: {{marks: '{marks}'}}\n",
    )
    status = wait_for(
        k8s_emulator, LF, "flaky", lambda s: s.get("phase") in ("Completed", "Failed")
    )
    assert status["phase"] == "Completed", status
    assert [(r["attempt"], r["stateType"]) for r in status["runs"]] == [
        (2, "COMPLETED"),
        (1, "FAILED"),
        (0, "FAILED"),
    ]
    assert len(runs_of(env, "flaky")) == 3 and len(list(marks.iterdir())) == 3
    events = json.loads(kubectl("get", "events", "-o", "json").stdout)["items"]
    assert sum(e["reason"] == "Retrying" for e in events) >= 1


def test_history_is_trimmed_at_its_limit(
    env, project, k8s_emulator, kubectl: Kubectl, run_kopf_operator, monkeypatch, worker
):
    start_operator(run_kopf_operator, monkeypatch)
    apply(kubectl, backend())
    worker()
    apply(kubectl, lumeflow("quick", "quick", "{policy: OnRequest, historyLimit: 1}"))
    wait_for(k8s_emulator, LF, "quick", lambda s: s.get("phase") == "Ready")
    for request in (1, 2):
        kubectl("annotate", "--overwrite", "lf", "quick", f"lume.dev/run-request={request}")
        wait_for(
            k8s_emulator,
            LF,
            "quick",
            lambda s, r=request: s.get("phase") == "Completed" and s["lastRun"]["index"] == r,
        )
    status = status_of(k8s_emulator, LF, "quick")
    assert [(r["index"], r["stateType"]) for r in status["runs"]] == [(2, "COMPLETED")]
    assert status["lastRun"]["index"] == 2
    assert len(runs_of(env, "quick")) == 2  # both ran; status keeps the newest


# ---- Prefect says no ---------------------------------------------------------------------


class RefusingProxy:
    """In front of the real server: answers `refuse` (status) to writes of deployments while
    set, passes everything else through, and counts what it answered."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.removesuffix("/api")
        self.refuse: int | None = None
        self.refused = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _forward(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else None
                if proxy.refuse and "/deployments" in self.path and self.command == "POST":
                    proxy.refused += 1
                    reply = json.dumps({"detail": "forbidden by the test"}).encode()
                    self.send_response(proxy.refuse)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                    return
                request = urllib.request.Request(
                    proxy.upstream + self.path, data=body, method=self.command
                )
                for key in ("content-type", "accept"):
                    if self.headers.get(key):
                        request.add_header(key, self.headers[key])
                try:
                    with urllib.request.urlopen(request, timeout=30) as answer:
                        status, content = answer.status, answer.read()
                        kind = answer.headers.get("content-type", "application/json")
                except urllib.error.HTTPError as error:
                    status, content = error.code, error.read()
                    kind = error.headers.get("content-type", "application/json")
                self.send_response(status)
                self.send_header("content-type", kind)
                self.send_header("content-length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _forward

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def __enter__(self) -> RefusingProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()


def test_a_refusal_is_stalled_without_a_retry_storm(
    env, k8s_emulator, kubectl: Kubectl, run_kopf_operator, monkeypatch
):
    with RefusingProxy(env.api_url) as proxy:
        monkeypatch.setenv("PREFECT_API_URL", proxy.api_url)
        code = proxy.refuse = 403  # every other 4xx alike (tests/test_gateway.py)
        start_operator(run_kopf_operator, monkeypatch)
        apply(
            kubectl,
            backend(extra="  agent: {replicas: 0}\n").replace("  agent: {replicas: 1}\n", ""),
        )
        wait_for(k8s_emulator, SB, "local", lambda s: ready(s).get("status") == "True")
        apply(kubectl, lumeflow("refused", "quick"))
        status = wait_for(
            k8s_emulator, LF, "refused", lambda s: condition(s, "Stalled").get("status") == "True"
        )
        stalled = condition(status, "Stalled")
        assert stalled["reason"] == "PrefectRejected"
        assert f"Prefect answered {code}: forbidden by the test" in stalled["message"]
        seen = proxy.refused
        # Not retried: the refusal stands until the spec changes. (Waiting on a condition
        # cannot prove an absence: this is the one fixed wait, 8 follow intervals long.)
        time.sleep(8)
        assert proxy.refused == seen, "a refusal was retried"
        # An outage is retried, and clears by itself.
        proxy.refuse = 503
        kubectl("patch", "lf", "refused", "--type=merge", "-p", '{"spec":{"parameters":{"i":1}}}')
        wait_for(
            k8s_emulator, LF, "refused", lambda s: ready(s).get("reason") == "PrefectUnreachable"
        )
        proxy.refuse = None
        done = wait_for(k8s_emulator, LF, "refused", lambda s: s.get("deploymentId"))
        assert condition(done, "Stalled").get("status") == "False"


# ---- one owner --------------------------------------------------------------------------


def test_one_owner_per_work_pool(
    env, k8s_emulator, kubectl: Kubectl, run_kopf_operator, monkeypatch
):
    start_operator(run_kopf_operator, monkeypatch)
    for namespace in ("team-a", "team-b"):  # YAML: the emulator takes no protobuf
        apply(kubectl, f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {namespace}}}\n")
    shared = "  workPool: {name: shared}\n  agent: {replicas: 0}\n"
    first, second = (
        backend("local", ns, shared).replace("  agent: {replicas: 1}\n", "")
        for ns in ("team-a", "team-b")
    )
    apply(kubectl, first)
    wait_until(
        lambda: (
            ready(k8s_emulator.emulator.get_object(SB, "team-a", "local").get("status") or {}).get(
                "status"
            )
            == "True"
        ),
        timeout=TIMEOUT,
    )
    pool = work_pool_or_none(env, "shared")
    apply(kubectl, second)
    status = wait_until(
        lambda: (
            (s := (k8s_emulator.emulator.get_object(SB, "team-b", "local") or {}).get("status"))
            and condition(s, "Stalled").get("status") == "True"
            and s
        ),
        timeout=TIMEOUT,
    )
    assert condition(status, "Stalled")["reason"] == "WorkPoolOwnedElsewhere"
    assert work_pool_or_none(env, "shared").base_job_template == pool.base_job_template
    kubectl("delete", "sb", "local", "-n", "team-b", "--timeout=60s", timeout=70)
    assert work_pool_or_none(env, "shared") is not None  # not the second's to delete
    kubectl("delete", "sb", "local", "-n", "team-a", "--timeout=60s", timeout=70)
    assert work_pool_or_none(env, "shared") is None


def test_an_agent_name_already_taken_is_never_adopted(
    env, k8s_emulator, kubectl: Kubectl, run_kopf_operator, monkeypatch
):
    apply(
        kubectl,
        """
apiVersion: apps/v1
kind: Deployment
metadata: {name: local-agent, namespace: default}
spec:
  selector: {matchLabels: {app: someone-else}}
  template:
    metadata: {labels: {app: someone-else}}
    spec:
      containers: [{name: app, image: "registry.example/someone-else:1"}]
""",
    )
    start_operator(run_kopf_operator, monkeypatch)
    apply(kubectl, backend())
    status = wait_for(
        k8s_emulator, SB, "local", lambda s: condition(s, "Stalled").get("status") == "True"
    )
    assert condition(status, "Stalled")["reason"] == "NameTaken"
    taken = k8s_emulator.emulator.get_object("apps/v1/deployments", "default", "local-agent")
    assert not taken["metadata"].get("ownerReferences")
    image = taken["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "registry.example/someone-else:1"


# ---- kill points ------------------------------------------------------------------------


def test_killed_between_cancel_and_deployment_delete_leaves_nothing(
    env, project, k8s_emulator, kubectl: Kubectl, run_kopf_operator, monkeypatch, worker
):
    _running_operators.clear()
    _restart(run_kopf_operator, monkeypatch, None)
    apply(kubectl, backend())
    worker()
    apply(kubectl, lumeflow("sleeper", "sleepy"))
    run_id = running(k8s_emulator, "sleeper")["lastRun"]["id"]
    # Restart with a failpoint after the cancel requests: the process dies there.
    dying = _restart(run_kopf_operator, monkeypatch, "flow-runs-cancelled")
    kubectl("delete", "lf", "sleeper", "--wait=false")
    wait_until(lambda: dying.returncode == 137, timeout=TIMEOUT)
    _restart(run_kopf_operator, monkeypatch, None)
    wait_until(
        lambda: k8s_emulator.emulator.get_object(LF, "default", "sleeper") is None, timeout=TIMEOUT
    )
    assert run_state(env, run_id) == "CANCELLED"
    assert not deployment_exists(env, "sleeper/default")
    assert len(runs_of(env, "sleeper")) == 1


def _restart(
    run_kopf_operator: Callable[..., KopfOperator], monkeypatch, failpoint: str | None
) -> KopfOperator:
    for operator in _running_operators:
        operator.stop()
    _running_operators.clear()
    operator = start_operator(run_kopf_operator, monkeypatch, failpoint)
    _running_operators.append(operator)
    return operator


_running_operators: list[KopfOperator] = []


def test_killed_between_retry_decision_and_new_run_retries_once(
    env, project, tmp_path, k8s_emulator, kubectl: Kubectl, run_kopf_operator, monkeypatch, worker
):
    marks = tmp_path / "marks"
    _running_operators.clear()
    dying = _restart(run_kopf_operator, monkeypatch, "flow-retry-decided")
    apply(kubectl, backend())
    worker()
    apply(
        kubectl,
        lumeflow("flaky", "flaky", "{retries: 2}") + f"  parameters: {{marks: '{marks}'}}\n",
    )
    wait_until(lambda: dying.returncode == 137, timeout=TIMEOUT)
    _restart(run_kopf_operator, monkeypatch, None)
    status = wait_for(
        k8s_emulator, LF, "flaky", lambda s: s.get("phase") in ("Completed", "Failed")
    )
    assert status["phase"] == "Completed", status
    assert len(runs_of(env, "flaky")) == 3  # one per attempt, none twice
    assert os.path.isdir(marks) and len(list(marks.iterdir())) == 3


def test_killed_in_a_flow_of_flows_deletion_leaves_nothing(
    env, project, k8s_emulator, kubectl: Kubectl, run_kopf_operator, monkeypatch, worker
):
    _running_operators.clear()
    _restart(run_kopf_operator, monkeypatch, None)
    apply(kubectl, backend())
    worker()
    status = long_study_running(k8s_emulator, kubectl)
    parent = status["run"]["id"]
    dying = _restart(run_kopf_operator, monkeypatch, "composition-runs-cancelled")
    kubectl("delete", "fof", "long-study", "--wait=false")
    wait_until(lambda: dying.returncode == 137, timeout=TIMEOUT)
    _restart(run_kopf_operator, monkeypatch, None)
    wait_until(
        lambda: k8s_emulator.emulator.get_object(FOF, "default", "long-study") is None,
        timeout=TIMEOUT,
    )
    assert run_state(env, parent) == "CANCELLED"
    assert not deployment_exists(env, "FlowOfFlows/default.long-study")
    assert len(runs_of(env, "sleeper")) == 1
