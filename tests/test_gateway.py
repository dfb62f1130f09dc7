"""The Prefect port: the real gateway on the real server, and the in-memory fake held to the
same contract (idempotent pools, deployments and runs; writes only when something changes);
every failure as one error family."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import ssl

import anyio
import certifi
import httpx
import pytest
from prefect.settings import (
    PREFECT_API_SSL_CERT_FILE,
    PREFECT_API_URL,
    PREFECT_HOME,
    temporary_settings,
)

from lume_operator.backends import get_backend
from lume_operator.prefect.deployment import DeploymentSpec
from lume_operator.prefect.fake import FakePrefect
from lume_operator.prefect.gateway import PrefectGateway, translate
from lume_operator.prefect.limiter import AdaptiveLimit
from lume_operator.prefect.port import (
    PrefectError,
    PrefectRejected,
    PrefectUnreachable,
    idempotency_key,
)
from lume_operator.prefect.server import prefect_api, unused_ca_bundle


def _spec() -> DeploymentSpec:
    return DeploymentSpec(
        flow_name="beam-stats",
        name="default",
        entrypoint="flows/beam.py:beam_stats",
        work_pool_name="pool",
        work_queue_name="cpu",
        job_variables={"env": {"A": "1"}},
        parameters={"n": 1},
        tags=["cpu"],
    )


async def contract(port) -> None:
    """What every implementation of the port must do, asserted through the port alone."""
    template = get_backend("process").base_job_template()
    spec = _spec()
    pool_id = await port.ensure_work_pool("pool", "process", template, queues=["cpu"])
    after_pool = port.writes
    assert after_pool >= 1
    assert await port.ensure_work_pool("pool", "process", template, queues=["cpu"]) == pool_id
    assert port.writes == after_pool  # nothing changed, nothing written
    with pytest.raises(
        PrefectRejected, match="work pool 'pool' exists with type 'process', not 'docker'"
    ):
        await port.ensure_work_pool("pool", "docker", template)
    with pytest.raises(PrefectRejected, match="work pool 'elsewhere' to adopt does not exist"):
        await port.ensure_work_pool("elsewhere", "process", template, adopt=True)

    first = await port.ensure_deployment(spec)
    writes = port.writes
    assert await port.ensure_deployment(spec) == first
    assert port.writes == writes  # an unchanged deployment is not updated
    spec.parameters = {"n": 2}
    assert await port.ensure_deployment(spec) == first
    assert port.writes == writes + 1

    key = idempotency_key("uid-1", 3, 0)
    run_a = await port.create_flow_run(first, idempotency_key=key, tags=["cpu"])
    run_b = await port.create_flow_run(first, idempotency_key=key)
    assert run_a.id == run_b.id  # the same key never makes a second run
    other = await port.create_flow_run(first, idempotency_key=idempotency_key("uid-1", 4, 0))
    assert other.id != run_a.id
    read = await port.read_flow_run(run_a.id)
    assert (read.id, read.state.type, read.final) == (run_a.id, "SCHEDULED", False)
    assert "cpu" in read.tags
    assert port.ui_url(run_a.id).endswith(f"/runs/flow-run/{run_a.id}")

    await port.cancel_flow_run(run_a.id)
    assert (await port.read_flow_run(run_a.id)).state.type in ("CANCELLING", "CANCELLED")
    assert await port.child_runs(run_a.id) == []
    assert await port.table_artifact(run_a.id, "nothing") is None

    await port.delete_deployment("beam-stats", "default")
    await port.delete_deployment("beam-stats", "default")  # already gone counts as done
    with pytest.raises(PrefectRejected) as refused:
        await port.create_flow_run(first, idempotency_key=idempotency_key("uid-1", 5, 0))
    assert refused.value.status_code in (404, 409, 422)
    await port.delete_work_pool("pool")
    await port.delete_work_pool("pool")

    # An object-store backend's block: created once, rewritten only when its fields change.
    fields = {
        "basepath": "s3://lume-results/beam/prefect",
        "settings": {"endpoint_url": "http://m"},
    }
    block = await port.ensure_result_storage("lume-results-default-local-0a1b2c3d", fields)
    writes = port.writes
    assert await port.ensure_result_storage("lume-results-default-local-0a1b2c3d", fields) == block
    assert port.writes == writes
    moved = {**fields, "basepath": "s3://lume-results/other/prefect"}
    await port.ensure_result_storage("lume-results-default-local-0a1b2c3d", moved)
    assert port.writes == writes + 1
    await port.delete_result_storage("lume-results-default-local-0a1b2c3d")
    await port.delete_result_storage("lume-results-default-local-0a1b2c3d")  # gone is done
    assert port.writes == writes + 2


@pytest.mark.prefect
def test_the_gateway_keeps_the_port_contract_on_the_real_server(shared_prefect_api):
    async def scenario() -> None:
        async with PrefectGateway.connect(timeout=30) as gateway:
            await contract(gateway)
            current = await gateway.read_deployment("beam-stats", "default")
            assert current is None

    # The configured server (Prefect read its settings at import: they are set here, in-process).
    with temporary_settings(updates={PREFECT_API_URL: shared_prefect_api.api_url}):
        with prefect_api() as (api_url, embedded):
            assert (api_url, embedded) == (shared_prefect_api.api_url, False)
            anyio.run(scenario)


@pytest.mark.prefect
def test_a_new_home_starts_from_the_kept_database(tmp_path, monkeypatch):
    """The first embedded server keeps a copy of its new database; a server in another new
    home starts from it, skipping migrations and block registration, and works the same."""
    import sqlite3

    import prefect

    monkeypatch.setenv("LUME_OPERATOR_CACHE_DIR", str(tmp_path / "cache"))
    template = tmp_path / "cache" / f"prefect-{prefect.__version__}.db"
    for home in ("first", "second"):
        monkeypatch.setenv("PREFECT_HOME", str(tmp_path / home))
        with temporary_settings(updates={PREFECT_HOME: str(tmp_path / home)}):
            with prefect_api() as (_, embedded):
                assert embedded and template.is_file()

                async def scenario(pool: str) -> None:
                    async with PrefectGateway.connect(timeout=30) as gateway:
                        await gateway.ensure_work_pool(pool, "process", {})

                anyio.run(scenario, f"pool-{home}")
    with sqlite3.connect(template) as kept:  # block types registered, nothing of a run
        assert kept.execute("select count(*) from block_type").fetchone()[0] > 5
        assert (
            kept.execute("select count(*) from work_pool where name like 'pool-%'").fetchone()[0]
            == 0
        )
    with sqlite3.connect(tmp_path / "second" / "prefect.db") as second:
        assert second.execute("select name from work_pool where name like 'pool-%'").fetchall() == [
            ("pool-second",)
        ]


async def _write_burst(api_url: str, writers: int) -> list[int]:
    """`writers` clients at once, each creating a flow run and moving it through two states,
    with no client-side retry: the status of every answer."""
    statuses: list[int] = []
    async with httpx.AsyncClient(base_url=api_url, timeout=60) as http:
        flow = await http.post("/flows/", json={"name": "burst"})
        flow_id = flow.json()["id"]

        async def writer(index: int) -> None:
            made = await http.post("/flow_runs/", json={"flow_id": flow_id, "name": f"r{index}"})
            statuses.append(made.status_code)
            if made.status_code != 201:
                return
            for state in ("RUNNING", "COMPLETED"):
                moved = await http.post(
                    f"/flow_runs/{made.json()['id']}/set_state",
                    json={"state": {"type": state}, "force": True},
                )
                statuses.append(moved.status_code)

        async with anyio.create_task_group() as group:
            for index in range(writers):
                group.start_soon(writer, index)
    return statuses


@pytest.mark.prefect
def test_the_embedded_server_answers_a_burst_of_writes_without_503(tmp_path, monkeypatch):
    """SQLite refuses a write that meets another at once, and Prefect's server answers 503
    (its clients then sleep 2 s and more); the embedded server asks again itself."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.setenv("LUME_OPERATOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PREFECT_API_SSL_CERT_FILE", certifi.where())
    monkeypatch.delenv("PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED", raising=False)
    with temporary_settings(updates={PREFECT_HOME: str(tmp_path)}):
        with prefect_api() as (api_url, embedded):
            assert embedded
            statuses = anyio.run(_write_burst, api_url, 24)
            # Its clients (here and in flow runs) load one certificate, not a whole bundle.
            bundle = str(tmp_path / "cache" / "unused-ca.pem")
            assert os.environ["PREFECT_API_SSL_CERT_FILE"] == bundle
            assert PREFECT_API_SSL_CERT_FILE.value() == bundle
            # Nor do they ask the server for its version (this Prefect) or a CSRF token (off).
            assert os.environ["PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED"] == "false"
            assert os.environ["PREFECT_CLIENT_CSRF_SUPPORT_ENABLED"] == "false"
    assert len(statuses) == 24 * 3
    assert set(statuses) == {201}, sorted(statuses)
    assert os.environ["PREFECT_API_SSL_CERT_FILE"] == certifi.where()  # restored
    assert "PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED" not in os.environ


@pytest.mark.prefect
@pytest.mark.parametrize(
    ("url", "config"),
    [
        ("sqlite+aiosqlite:///{tmp}/prefect.db", "ImmediateWrites"),
        ("postgresql+asyncpg://user@127.0.0.1:5432/prefect", None),
    ],
)
def test_the_embedded_app_begins_sqlite_writes_immediate(tmp_path, url, config):
    """Its factory installs `immediate_writes` through Prefect's injection point on SQLite
    only; PostgreSQL keeps Prefect's configuration (row locks, no database-wide writer)."""
    from prefect.server.database.dependencies import (
        MODELS_DEPENDENCIES,
        temporary_database_config,
    )
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    from lume_operator.prefect.embedded_app import (
        RetryBusy,
        StreamsEndWithTheirClients,
        create_app,
    )

    settings = {PREFECT_API_DATABASE_CONNECTION_URL: url.format(tmp=tmp_path)}
    gc.unfreeze()
    try:
        with temporary_settings(updates=settings), temporary_database_config(None):
            app = create_app()
            assert isinstance(app, RetryBusy)
            assert isinstance(app.app, StreamsEndWithTheirClients)
            installed = MODELS_DEPENDENCIES["database_config"]
            assert (type(installed).__name__ if installed else None) == config
        # Prefect's modules and app, out of the collector's full passes for the server's life.
        assert gc.get_freeze_count() > 50_000
    finally:
        gc.unfreeze()


@pytest.mark.unit
def test_the_unused_ca_bundle_holds_one_loadable_certificate(tmp_path, monkeypatch):
    monkeypatch.setenv("LUME_OPERATOR_CACHE_DIR", str(tmp_path))
    bundle = unused_ca_bundle()
    assert bundle == tmp_path / "unused-ca.pem"
    assert bundle.read_text().count("BEGIN CERTIFICATE") == 1
    context = ssl.create_default_context(cafile=str(bundle))
    assert context.cert_store_stats()["x509_ca"] == 1
    bundle.write_text("# kept\n" + bundle.read_text())
    assert unused_ca_bundle() == bundle  # a second call reuses the file, never rewrites it
    assert bundle.read_text().startswith("# kept\n")


@pytest.mark.unit
def test_the_fake_keeps_the_same_contract():
    anyio.run(contract, FakePrefect())


@pytest.mark.unit
def test_a_closed_port_is_unreachable_not_rejected():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: nothing listens there

    async def scenario() -> None:
        url = f"http://127.0.0.1:{port}/api"
        async with PrefectGateway.connect(timeout=5, api_url=url) as gateway:
            await gateway.ensure_work_pool("pool", "process", {})

    with pytest.raises(PrefectUnreachable, match="work pool 'pool': Prefect API failed"):
        anyio.run(scenario)


def _status_error(code: int, body: object) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "http://prefect.test/api/deployments/")
    response = httpx.Response(code, json=body, request=request)
    return httpx.HTTPStatusError("error", request=request, response=response)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("code", "family"),
    [
        (401, PrefectRejected),
        (403, PrefectRejected),
        (404, PrefectRejected),
        (422, PrefectRejected),
        (408, PrefectUnreachable),
        (429, PrefectUnreachable),
        (500, PrefectUnreachable),
        (503, PrefectUnreachable),
    ],
)
def test_status_codes_are_told_apart(code, family):
    error = translate(_status_error(code, {"detail": "nope"}), "deployment x/y")
    assert type(error) is family
    assert error.status_code == code
    assert str(error) == f"deployment x/y: Prefect answered {code}: nope"


@pytest.mark.unit
def test_transport_errors_and_timeouts_are_outages():
    assert isinstance(translate(httpx.ConnectError("refused"), "x"), PrefectUnreachable)
    assert isinstance(translate(httpx.ReadTimeout("slow"), "x"), PrefectUnreachable)
    assert "timed out" in str(translate(TimeoutError(), "x"))
    assert isinstance(translate(ValueError("odd"), "x"), PrefectRejected)
    already = PrefectRejected("as is", 400)
    assert translate(already, "x") is already
    assert issubclass(PrefectUnreachable, PrefectError)


@pytest.mark.unit
def test_idempotency_keys_are_deterministic():
    assert idempotency_key("u", 1, 0) == idempotency_key("u", 1, 0)
    assert (
        len(
            {
                idempotency_key("u", 1, 0),
                idempotency_key("u", 2, 0),
                idempotency_key("u", 1, 1),
                idempotency_key("u", 1, 0, "step"),
            }
        )
        == 4
    )


@pytest.mark.unit
@pytest.mark.parametrize(("code", "asked"), [(503, 5), (429, 5), (500, 1), (502, 1)])
def test_a_busy_server_is_asked_again_in_a_new_slot_other_outages_fail_at_once(code, asked):
    """Prefect's client would retry these five times with backoff (2 s, 4 s, ...) inside one
    call, holding its slot. The operator's gateway asks once per slot: a busy server (429, 503:
    a SQLite server's writer lock) again after a short pause, 4 times, while its limit halves;
    another 5xx fails at once, to the object's own backoff."""
    import http.server
    import threading

    seen: list[str] = []

    class Busy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"detail": "database is locked"}')

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    limit = AdaptiveLimit(initial=16)

    async def scenario() -> None:
        url = f"http://127.0.0.1:{server.server_address[1]}/api"
        async with PrefectGateway.connect(
            timeout=20, api_url=url, limit=limit, retries=False
        ) as gateway:
            with anyio.fail_after(5):  # with the client's retries: 2 + 4 + 8 + ... seconds
                await gateway.read_deployment("beam-stats", "default")

    try:
        with pytest.raises(PrefectUnreachable, match=f"answered {code}: database is locked"):
            anyio.run(scenario)
    finally:
        server.shutdown()
    assert seen == ["/api/deployments/name/beam-stats/default"] * asked
    assert limit.limit == max(1, 16 / 2**asked) and limit.in_flight == 0


@pytest.mark.prefect
def test_a_mass_deploy_on_the_real_server_keeps_within_the_limit(shared_prefect_api):
    """30 objects of one flow deploy at once through one limit of 4: the flow is created once,
    never more than 4 calls are in flight, and every deployment exists."""
    limit = AdaptiveLimit(initial=4, maximum=4)
    creates = 0

    async def scenario() -> None:
        nonlocal creates
        url = shared_prefect_api.api_url
        async with PrefectGateway.connect(
            timeout=30, api_url=url, limit=limit, retries=False
        ) as gateway:
            create_flow = gateway.client.create_flow_from_name

            async def counted(name: str) -> object:
                nonlocal creates
                creates += 1
                return await create_flow(name)

            gateway.client.create_flow_from_name = counted  # a spy: the real call is made
            await gateway.ensure_work_pool("mass", "process", {})

            async def deploy(i: int) -> str:
                spec = _spec()
                spec.name, spec.work_pool_name = f"d{i:02d}", "mass"
                for _ in range(20):  # a SQLite server may answer 503 under load: ask again
                    try:
                        return await gateway.ensure_deployment(spec, fresh=True)
                    except PrefectUnreachable:
                        await anyio.sleep(0.5)
                raise AssertionError("Prefect stayed busy")

            ids = await asyncio.gather(*(deploy(i) for i in range(30)))
            assert len(set(ids)) == 30
            for i in (0, 29):
                assert await gateway.read_deployment("beam-stats", f"d{i:02d}") is not None

    try:
        anyio.run(scenario)
    finally:
        shared_prefect_api.reset()
    assert creates == 1
    assert limit.peak == 4 and limit.in_flight == 0
