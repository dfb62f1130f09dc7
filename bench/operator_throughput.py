"""Operator throughput: N LumeFlows applied at once, until each has its Prefect deployment.

For each database (`--databases`, default SQLite and the machine's PostgreSQL) and each N
(default 100 and 1000), each time on a fresh Prefect server (tests/k8s/prefect_server.py) and
a fresh emulated Kubernetes API (tests/k8s/emulator.py):

- lume: the lume-operator handlers (`kopf run -m lume_operator.handlers.operator`), with a
  `process` SchedulingBackend whose work pool is ready before the clock starts. The N objects
  are POSTed by 16 threads; the clock runs from the first POST until every LumeFlow has
  `status.deploymentId` (policy `OnRequest` with no request: nothing runs). Also timed: until
  every one has a first status (`status.phase`).
- bare client: Prefect's own `PrefectClient` making the same writes on the same kind of
  server, a flow and a deployment per object (the deployment as the operator made it for
  `flow-00000`, with each object's parameters), `--concurrency` at a time (default 8, the
  operator's start value), the work pool made before the clock starts with the job template
  the operator's pool has (the process worker's, as `prefect work-pool create` makes it), so
  the server checks each deployment's job variables against it on both sides. Target: lume
  at most 1.2x.
- do-nothing: a kopf operator whose LumeFlow create handler only sets `status.phase`; lume's
  first status against it (target: at most 1.5x), run just before each of lume's runs (same
  database and N). Printed beside it: the same operator with a delete handler, hence kopf's
  finalizer (added in a patch of its own before any create handler runs), as lume-operator
  has.
- resync: lume-operator restarted (kopf resumes every object, nothing changed) behind a
  counting reverse proxy (its own process); Prefect writes during it (target 0): POST, PATCH,
  PUT and DELETE, except Prefect's read-only POSTs (`.../filter`, `.../count`, `.../paginate`,
  `.../history`). The timed runs talk to Prefect directly.

The emulator forgets served requests (`BenchEmulator`): kmock's reaction matching is otherwise
O(requests served) per request, and the emulator, not the operator, would be measured.

Both operators run as `python -m kopf run --standalone --all-namespaces` subprocesses without
--verbose; the emulator, the bench's polling and the bare client share this process.

    python bench/operator_throughput.py [--n 100] [--n 1000] [--databases sqlite,postgresql]
"""

# ruff: noqa: E402  (the tests' imports follow the sys.path fix below)
from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "operator")]

from tests.k8s.emulator import EmulatorServer, LumeKubernetesEmulator
from tests.k8s.prefect_server import PrefectServer, free_port

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
GROUP_PATH = "/apis/lume.dev/v1alpha1/namespaces/default"
LF = "lume.dev/v1alpha1/lumeflows"
SB = "lume.dev/v1alpha1/schedulingbackends"
READ_ONLY_POST = re.compile(r"/(filter|count|paginate|history)/?$")
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
HOP_HEADERS = {
    "host",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "content-encoding",
    "accept-encoding",
}

DO_NOTHING = '''\
"""A do-nothing kopf operator: the LumeFlow create handler only sets a phase."""
import logging
from typing import Any

import kopf


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.posting.level = logging.WARNING


@kopf.on.create("lume.dev", "v1alpha1", "lumeflows")
def create(patch: kopf.Patch, **_: Any) -> None:
    patch.status["phase"] = "Pending"
'''
# The same with a delete handler, as lume-operator has one (to remove the Prefect deployment):
# kopf then adds its finalizer in a patch of its own, and runs the create handler on the next
# event. Printed beside the target's baseline, not instead of it.
DO_NOTHING_FINALIZER = (
    DO_NOTHING
    + """

@kopf.on.delete("lume.dev", "v1alpha1", "lumeflows")
def delete(**_: Any) -> None:
    pass
"""
)


# ---- a counting reverse proxy in front of Prefect (its own process) ---------------------------


def proxy_main(target: str, port: int) -> None:
    """Forward everything to `target`; `GET /__counts` returns {"METHOD path": count}."""
    from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

    counts: collections.Counter[str] = collections.Counter()

    def template(path: str) -> str:
        path = UUID.sub("{id}", path)
        return re.sub(r"/deployments/name/[^/]+/[^/]+", "/deployments/name/{flow}/{name}", path)

    async def main() -> None:
        session = ClientSession(
            connector=TCPConnector(limit=64, force_close=True), timeout=ClientTimeout(total=120)
        )

        async def handle(request: web.Request) -> web.StreamResponse:
            if request.path == "/__counts":
                return web.json_response(dict(counts))
            counts[f"{request.method} {template(request.path)}"] += 1
            headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
            async with session.request(
                request.method, target + request.path_qs, headers=headers, data=await request.read()
            ) as reply:
                body = await reply.read()
                out = {k: v for k, v in reply.headers.items() if k.lower() not in HOP_HEADERS}
                return web.Response(status=reply.status, body=body, headers=out)

        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    asyncio.run(main())


class CountingProxy:
    def __init__(self, target: str) -> None:
        self.port = free_port()
        self.target = target
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> CountingProxy:
        command = [sys.executable, __file__, "--proxy", self.target, str(self.port)]
        self.process = subprocess.Popen(command)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.counts()
                return self
            except OSError:
                time.sleep(0.1)
        raise TimeoutError("the counting proxy did not start")

    def counts(self) -> collections.Counter[str]:
        url = f"http://127.0.0.1:{self.port}/__counts"
        with urllib.request.urlopen(url, timeout=10) as reply:
            return collections.Counter(json.load(reply))

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)


def writes(counts: collections.Counter[str]) -> collections.Counter[str]:
    found: collections.Counter[str] = collections.Counter()
    for key, n in counts.items():
        method, path = key.split(" ", 1)
        if method in ("POST", "PATCH", "PUT", "DELETE") and not (
            method == "POST" and READ_ONLY_POST.search(path)
        ):
            found[key] = n
    return found


# ---- the emulator, without its quadratic request matching ----------------------------------

WATCHES: collections.Counter[int] = collections.Counter()  # id(emulator) -> watches opened


class BenchEmulator(LumeKubernetesEmulator):
    """The test emulator, forgetting each request once served.

    kmock finds the reaction to a request by scanning every request served so far
    (`request in payload._source`), so each request costs O(requests served): at a few
    thousand requests the emulator, not the operator, is what a run measures. Served requests
    are dropped from that list; `log` and `count()` then see only requests in flight.
    """

    async def _handle(self, request: Any) -> Any:
        if request.action is not None and request.action.value.lower() == "watch":
            WATCHES[id(self)] += 1
        try:
            return await super()._handle(request)
        finally:
            with contextlib.suppress(ValueError):
                self._requests.remove(request)


def emulator_server() -> EmulatorServer:
    return EmulatorServer(BenchEmulator())


# ---- operators and objects --------------------------------------------------------------------


def kubeconfig_for(server: EmulatorServer, directory: Path) -> Path:
    path = directory / f"kubeconfig-{server.url.rsplit(':', 1)[-1]}.yaml"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": {"server": server.url}}],
        "users": [{"name": "emulator", "user": {"token": "emulator-token"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "emulator"}}],
        "current-context": "emulator",
    }
    path.write_text(yaml.safe_dump(config))
    return path


class Operator:
    """`kopf run` of a module or file against one emulator, as a subprocess."""

    def __init__(self, target: str, server: EmulatorServer, kubeconfig: Path, log: Path) -> None:
        self.target, self.server, self.kubeconfig, self.log = target, server, kubeconfig, log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None, timeout: float = 60) -> Operator:
        seen = WATCHES[id(self.server.emulator)]
        command = [sys.executable, "-m", "kopf", "run", "--standalone", "--all-namespaces"]
        command += [self.target] if self.target.endswith(".py") else ["-m", self.target]
        full_env = {**os.environ, **(env or {}), "KUBECONFIG": str(self.kubeconfig)}
        full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "operator")])
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"operator exited:\n{self.log.read_text()[-3000:]}")
            if WATCHES[id(self.server.emulator)] > seen:
                return self
            time.sleep(0.05)
        raise TimeoutError(f"operator opened no watch:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def post(server: EmulatorServer, plural: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(
        f"{server.url}{GROUP_PATH}/{plural}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        reply.read()


def flow_body(index: int) -> dict[str, Any]:
    return {
        "apiVersion": "lume.dev/v1alpha1",
        "kind": "LumeFlow",
        "metadata": {"name": f"flow-{index:05d}", "namespace": "default"},
        "spec": {
            "backendRef": {"name": "local"},
            "entrypoint": "flows/beam.py:beam_stats",
            "parameters": {"n_particles": 1000, "seed": index},
            "labels": ["cpu"],
            "run": {"policy": "OnRequest"},
        },
    }


def backend_body(api_url: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"type": "process", "labels": ["cpu"]}
    if api_url:
        spec["prefect"] = {"apiUrl": api_url}
    return {
        "apiVersion": "lume.dev/v1alpha1",
        "kind": "SchedulingBackend",
        "metadata": {"name": "local", "namespace": "default"},
        "spec": spec,
    }


def status_of(server: EmulatorServer, resource: str, name: str) -> dict[str, Any]:
    import kmock

    raw = server.emulator._stored(kmock.resource(resource), "default", name)  # no deep copy
    return (raw or {}).get("status") or {}


def wait_for(what: str, predicate: Any, timeout: float, interval: float = 0.05) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)
    return time.monotonic() - start


def apply_and_time(server: EmulatorServer, n: int, timeout: float) -> float:
    """POST n LumeFlows at once; seconds until every one has status.phase."""
    names = [f"flow-{i:05d}" for i in range(n)]
    pending = set(names)

    def all_have_status() -> bool:
        for name in list(pending):
            if status_of(server, LF, name).get("phase"):
                pending.discard(name)
        return not pending

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: post(server, "lumeflows", flow_body(i)), range(n)))
    wait_for(f"first status of {n} LumeFlows ({len(pending)} left)", all_have_status, timeout)
    return time.monotonic() - start


def all_deployed(server: EmulatorServer, names: list[str]) -> Callable[[], bool]:
    """A predicate cheap enough to ask every 50 ms at N = 1000 (this process is the emulator's):
    it looks at objects not yet seen deployed, in order, up to the first that is not (the rest
    wait until that one is: the moment all are deployed is still seen at once)."""
    pending = collections.deque(names)

    def check() -> bool:
        while pending and status_of(server, LF, pending[0]).get("deploymentId"):
            pending.popleft()
        return not pending

    return check


def run_do_nothing(n: int, work: Path, timeout: float, finalizer: bool = False) -> float:
    module = work / f"do_nothing_operator{'_finalizer' if finalizer else ''}.py"
    module.write_text(DO_NOTHING_FINALIZER if finalizer else DO_NOTHING)
    with emulator_server() as server:
        post(server, "schedulingbackends", backend_body("http://127.0.0.1:9/api"))  # unused
        operator = Operator(
            str(module), server, kubeconfig_for(server, work), work / f"do-nothing-{n}.log"
        )
        operator.start()
        try:
            return apply_and_time(server, n, timeout)
        finally:
            operator.stop()


@contextlib.contextmanager
def prefect_server(database: str, home: Path) -> Any:
    """A fresh Prefect server on SQLite under `home`, or on a new PostgreSQL database."""
    if database == "sqlite":
        server = PrefectServer(home).start(timeout=120)
        try:
            yield server
        finally:
            server.stop()
        return
    import psycopg

    name = f"lume_bench_{os.getpid()}_{home.name.replace('-', '_')}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
    server = PrefectServer(home, database_url=PG_URL.format(name=name))
    try:
        yield server.start(timeout=300)
    finally:
        server.stop()
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def deployment_template(api_url: str) -> dict[str, Any]:
    """The deployment the operator made for flow-00000, as the fields a client sends, and its
    work pool's base job template (`pool_template`)."""

    async def read() -> dict[str, Any]:
        from prefect.client.orchestration import PrefectClient

        async with PrefectClient(api=api_url) as client:
            made = await client.read_deployment_by_name("flow-00000/default")
            pool = await client.read_work_pool(made.work_pool_name)
        return {
            "pool_template": dict(pool.base_job_template or {}),
            "entrypoint": made.entrypoint,
            "work_pool_name": made.work_pool_name,
            "work_queue_name": made.work_queue_name,
            "job_variables": dict(made.job_variables or {}),
            "parameters": dict(made.parameters or {}),
            "tags": list(made.tags or []),
            "pull_steps": made.pull_steps,
            "parameter_openapi_schema": made.parameter_openapi_schema,
            "enforce_parameter_schema": bool(made.enforce_parameter_schema),
            "description": made.description,
        }

    return asyncio.run(read())


def run_bare(
    n: int, database: str, work: Path, template: dict[str, Any], concurrency: int
) -> float:
    """Seconds for Prefect's client to make n flows and deployments, `concurrency` at once."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import PrefectHTTPStatusError

    gave_up = [0]

    async def deploy_all(api_url: str) -> float:
        slots = asyncio.Semaphore(concurrency)
        fields = {k: v for k, v in template.items() if k != "pool_template"}
        async with PrefectClient(api=api_url) as client:
            pool, queue = template["work_pool_name"], template["work_queue_name"]
            # The operator's pool has the process worker's job template, as `prefect work-pool
            # create --type process` makes it: Prefect's server then checks each deployment's
            # job variables against it (a JSON-schema validation per deployment), which a pool
            # made without one skips.
            await client.create_work_pool(
                WorkPoolCreate(
                    name=pool, type="process", base_job_template=template["pool_template"]
                )
            )
            if queue and queue != "default":  # as the operator's pool set-up makes it
                await client.create_work_queue(queue, work_pool_name=pool)

            async def one(index: int) -> None:
                async with slots:
                    flow_id = await persist(client.create_flow_from_name, f"flow-{index:05d}")
                    parameters = {**fields["parameters"], "seed": index}
                    await persist(
                        client.create_deployment,
                        flow_id=flow_id,
                        name="default",
                        **{**fields, "parameters": parameters},
                    )

            async def persist(call: Any, *args: Any, **kwargs: Any) -> Any:
                """As a script that must finish would: Prefect's client retries a 503 (a
                SQLite server busy) 5 times with backoff, then gives up; ask again after 1 s."""
                for _ in range(30):
                    try:
                        return await call(*args, **kwargs)
                    except PrefectHTTPStatusError as error:
                        if error.response.status_code < 500:
                            raise
                        gave_up[0] += 1
                        await asyncio.sleep(1)
                raise RuntimeError("Prefect answered 5xx 30 times")

            start = time.monotonic()
            await asyncio.gather(*(one(i) for i in range(n)))
            return time.monotonic() - start

    with prefect_server(database, work / f"bare-{database}-{n}") as prefect:
        seconds = asyncio.run(deploy_all(prefect.api_url))
    if gave_up[0]:
        print(f"N={n} {database}: the bare client's retries gave up {gave_up[0]} times", flush=True)
    return seconds


def run_lume(n: int, database: str, work: Path, timeout: float) -> dict[str, Any]:
    """First status and all-deployed seconds (from the first POST), the resync's seconds and
    Prefect request counts, and the deployment made for flow-00000.

    The timed run talks to Prefect directly (the operator's PREFECT_API_URL); the resync goes
    through the counting proxy. The backend names no apiUrl, so switching the operator's
    default changes no spec (only the agent Deployment's PREFECT_API_URL, a Kubernetes write).
    """
    names = [f"flow-{i:05d}" for i in range(n)]
    found: dict[str, Any] = {"resync": collections.Counter()}
    with contextlib.ExitStack() as stack:
        prefect = stack.enter_context(prefect_server(database, work / f"lume-{database}-{n}"))
        proxy = CountingProxy(prefect.api_url.removesuffix("/api")).start()
        stack.callback(proxy.stop)
        direct = {"LUME_OPERATOR_FOLLOW_INTERVAL": "5", "PREFECT_API_URL": prefect.api_url}
        counted = {**direct, "PREFECT_API_URL": proxy.api_url}
        server = stack.enter_context(emulator_server())
        kubeconfig = kubeconfig_for(server, work)
        log = work / f"lume-{database}-{n}.log"
        operator = Operator("lume_operator.handlers.operator", server, kubeconfig, log)
        operator.start(direct)
        try:
            post(server, "schedulingbackends", backend_body(None))
            wait_for(
                "work pool ready",
                lambda: status_of(server, SB, "local").get("workPoolId"),
                timeout=120,
            )
            start = time.monotonic()
            found["first_status"] = apply_and_time(server, n, timeout)
            print(f"N={n} {database}: lume first status {found['first_status']:.2f} s", flush=True)
            try:
                wait_for("every LumeFlow deployed", all_deployed(server, names), timeout)
            except TimeoutError:
                deployed = sum(bool(status_of(server, LF, m).get("deploymentId")) for m in names)
                print(f"N={n} {database}: only {deployed} of {n} deployed", flush=True)
                return found
            found["deployed"] = time.monotonic() - start
            print(f"N={n} {database}: lume all deployed {found['deployed']:.2f} s", flush=True)
        finally:
            operator.stop()
        found["template"] = deployment_template(prefect.api_url)
        # The resync: a new operator process resumes every object.
        read_by_name = "GET /api/deployments/name/{flow}/{name}"
        start = time.monotonic()
        operator.start(counted)
        try:
            wait_for(
                "every LumeFlow resumed",
                lambda: proxy.counts()[read_by_name] >= n,
                timeout,
                interval=0.5,
            )
            found["resync_seconds"] = time.monotonic() - start
            time.sleep(3)  # stragglers, retries
        finally:
            operator.stop()
        found["resync"] = proxy.counts()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, action="append", help="objects (repeatable)")
    parser.add_argument("--databases", default="sqlite,postgresql", help="sqlite,postgresql")
    parser.add_argument("--concurrency", type=int, default=8, help="the bare client's")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per phase")
    parser.add_argument("--keep", type=Path, help="keep logs and Prefect databases here")
    parser.add_argument("--proxy", nargs=2, metavar=("TARGET", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.proxy:
        proxy_main(args.proxy[0], int(args.proxy[1]))
        return
    sizes = args.n or [100, 1000]
    databases = [d.strip() for d in args.databases.split(",") if d.strip()]
    print(f"cores: {os.cpu_count()}; sizes: {sizes}; databases: {databases}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lume-bench-operator-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for database in databases:
            for n in sizes:
                # The baselines beside each of lume's runs, not once for all: this process
                # (the emulator's) grows over a run, and the machine's load drifts.
                base = run_do_nothing(n, work, args.timeout)
                print(f"N={n}: do-nothing kopf first status {base:.2f} s", flush=True)
                final = run_do_nothing(n, work, args.timeout, finalizer=True)
                print(f"N={n}: the same with a finalizer {final:.2f} s", flush=True)
                try:
                    ours = run_lume(n, database, work, args.timeout)
                except TimeoutError as error:
                    print(f"N={n} {database}: gave up: {error}", flush=True)
                    continue
                bare = None
                if "template" in ours:
                    bare = run_bare(n, database, work, ours["template"], args.concurrency)
                    print(f"N={n} {database}: bare client {bare:.2f} s", flush=True)
                resync = writes(ours["resync"])
                if "resync_seconds" in ours:
                    print(f"N={n} {database}: resync {ours['resync_seconds']:.2f} s", flush=True)
                    print(f"  Prefect calls during the resync: {dict(ours['resync'])}", flush=True)
                rows.append((database, n, base, final, ours, bare, sum(resync.values())))
    print()
    print(
        "| database | N | lume: all deployed (s) "
        f"| bare client x{args.concurrency} (s) | ratio (<= 1.2) "
        "| first status: lume / do-nothing (s) | ratio (<= 1.5) "
        "| do-nothing with a finalizer (s), ratio | resync writes (0) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for database, n, base, final, ours, bare, resync_writes in rows:
        deployed, first = ours.get("deployed"), ours.get("first_status")
        cells = [
            database,
            str(n),
            f"{deployed:.2f}" if deployed else "-",
            f"{bare:.2f}" if bare else "-",
            f"{deployed / bare:.2f}" if deployed and bare else "-",
            f"{first:.2f} / {base:.2f}" if first else "-",
            f"{first / base:.2f}" if first else "-",
            f"{final:.2f}, {first / final:.2f}" if first else "-",
            str(resync_writes) if "resync_seconds" in ours else "-",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
