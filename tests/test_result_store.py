"""DB result store: the same tests on SQLite and on the real PostgreSQL server (127.0.0.1:5432).

Each PostgreSQL test gets a fresh schema (via the URL's search_path), dropped afterwards, so
runs are repeatable and never touch other tables in database `test`.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, func, inspect, select, text

from lume_operator.results import TextFile
from lume_operator.results.store import (
    VERSION_TABLE,
    AttributeIndexError,
    DocumentNotFoundError,
    LocationError,
    ResultDocument,
    ResultStoreError,
    SQLResultStore,
    StoreOperationError,
    StoreSchemaError,
    StoreUnreachableError,
    StoreURLError,
    alembic_config,
    db_location,
    default_store_url,
    documents,
    find_db_locations,
    mask_url,
    metadata,
    open_store,
    resolve,
    unique_hash,
    upgrade,
)
from tests.k8s.prefect_server import PrefectServer

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=test"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database URL: a new SQLite file, or a new PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'results.sqlite'}"
        return
    schema = f"lume_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        from lume_operator.results.db_tasks import close_stores

        close_stores()  # cached engines would keep connections into the schema
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def store(store_url: str) -> Iterator[SQLResultStore]:
    with open_store(store_url) as opened:
        yield opened


def count_rows(store: SQLResultStore) -> int:
    with store.engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(documents)).scalar_one()


def document(**changes: Any) -> ResultDocument:
    fields: dict[str, Any] = {
        "flow_name": "beam-stats",
        "inputs": {"n_particles": 1000, "sigma_x": 0.001},
        "outputs": {"mean": [0.1, 0.2], "summary": {"n": 1000}},
    }
    return ResultDocument(**{**fields, **changes})


# --- documents, idempotency, lookups -------------------------------------------------------------


def test_save_and_get_round_trip(store: SQLResultStore, tmp_path: Path) -> None:
    note = TextFile(filename=str(tmp_path / "note.txt"))
    saved = document(
        flow_run_id="1b6e2a0c-7d4f-4b47-9b43-1f2f5f0f7c11",
        resource="LumeFlow/beam",
        outputs={"stats": {"mean": np.float64(0.5), "hist": np.arange(3)}, "report": note},
    )
    document_id = store.save(saved)

    loaded = store.get(document_id)
    assert loaded.id == document_id
    assert (loaded.flow_name, loaded.flow_run_id, loaded.resource) == (
        "beam-stats",
        "1b6e2a0c-7d4f-4b47-9b43-1f2f5f0f7c11",
        "LumeFlow/beam",
    )
    assert loaded.inputs == {"n_particles": 1000, "sigma_x": 0.001}
    assert loaded.outputs == {
        "stats": {"mean": 0.5, "hist": [0, 1, 2]},
        "report": note.description(),
    }
    assert loaded.files == {"report": note.description()}  # found in outputs by default
    assert loaded.created_at is not None and loaded.created_at.tzinfo is not None
    assert loaded.unique_hash == saved.unique_hash


def test_same_flow_and_inputs_twice_is_a_no_op(store: SQLResultStore) -> None:
    first = store.save(document())
    # Key order and 1 vs 1.0 do not make other inputs; the first outputs win.
    again = store.save(
        document(inputs={"sigma_x": 0.001, "n_particles": 1000.0}, outputs={"other": True})
    )
    assert again == first
    assert count_rows(store) == 1
    assert store.get(first).outputs == document().outputs

    other_inputs = store.save(document(inputs={"n_particles": 2000, "sigma_x": 0.001}))
    other_flow = store.save(document(flow_name="beam-hist"))
    assert len({first, other_inputs, other_flow}) == 3
    assert count_rows(store) == 3


def test_concurrent_saves_of_one_run_agree(store: SQLResultStore) -> None:
    ids: list[str] = []
    errors: list[BaseException] = []

    def save() -> None:
        try:
            ids.append(store.save(document(inputs={"seed": 7})))
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=save) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(set(ids)) == 1 and len(ids) == 8
    assert count_rows(store) == 1


def test_find_by_inputs(store: SQLResultStore) -> None:
    document_id = store.save(document(inputs={"n": 3, "options": {"b": [1, 2], "a": "x"}}))
    store.save(document(inputs={"n": 4, "options": {"b": [1, 2], "a": "x"}}))

    found = store.find("beam-stats", {"options": {"a": "x", "b": [1.0, 2]}, "n": 3})
    assert found is not None and found.id == document_id
    assert store.find("beam-stats", {"n": 5}) is None
    assert store.find("other-flow", {"n": 3, "options": {"b": [1, 2], "a": "x"}}) is None
    assert unique_hash("f", {"a": 1, "b": 2.0}) == unique_hash("f", {"b": 2, "a": 1.0})


def test_query_filters_newest_first(store: SQLResultStore) -> None:
    from datetime import UTC, datetime, timedelta

    start = datetime(2025, 1, 1, tzinfo=UTC)
    for index in range(4):
        store.save(
            document(
                inputs={"i": index},
                flow_run_id=f"run-{index % 2}",
                resource="LumeFlow/a" if index < 3 else "LumeFlow/b",
                created_at=start + timedelta(minutes=index),
            )
        )
    store.save(document(flow_name="other", inputs={"i": 0}))

    newest = store.query(flow_name="beam-stats")
    assert [doc.inputs["i"] for doc in newest] == [3, 2, 1, 0]
    assert [doc.inputs["i"] for doc in store.query(flow_run_id="run-0")] == [2, 0]
    assert [doc.inputs["i"] for doc in store.query(resource="LumeFlow/a", limit=2)] == [2, 1]
    assert len(store.query()) == 5


def test_delete(store: SQLResultStore) -> None:
    document_id = store.save(document())
    assert store.delete(document_id) is True
    assert store.delete(document_id) is False
    assert count_rows(store) == 0


def test_location_and_find_db_locations(store: SQLResultStore) -> None:
    document_id = store.save(document())
    location = store.location(document_id)
    assert location == {"store": store.url, "id": document_id, "type": "DBResult"}
    returned = {"db": location, "runs": [1, location], "file": {"filename": "x"}}
    assert find_db_locations(returned) == [("db", location), ("runs.1", location)]
    assert find_db_locations(location) == [("return", location)]


# --- migrations -----------------------------------------------------------------------------------


def test_upgrade_from_an_older_schema_keeps_documents(store_url: str) -> None:
    upgrade(store_url, "0001_documents")
    engine = create_engine(store_url)
    with engine.begin() as connection:
        indexes = inspect(connection).get_indexes("lume_result_documents")
        assert not [index for index in indexes if index["name"].startswith("ix_")]
        connection.execute(
            text(
                "INSERT INTO lume_result_documents (id, flow_name, inputs, outputs, files, "
                "created_at, unique_hash) VALUES ('old-1', 'f', '{\"a\": 1}', '[1, 2]', '{}', "
                ":created, :hash)"
            ),
            {"created": "2024-05-01 12:00:00+00:00", "hash": unique_hash("f", {"a": 1})},
        )
    engine.dispose()

    with open_store(store_url) as store:  # upgrades to head
        with store.engine.connect() as connection:
            indexes = {index["name"] for index in inspect(connection).get_indexes(documents.name)}
        assert indexes >= {
            "ix_lume_result_documents_flow_created",
            "ix_lume_result_documents_flow_run_id",
            "ix_lume_result_documents_resource_created",
        }
        old = store.get("old-1")
        assert (old.inputs, old.outputs) == ({"a": 1}, [1, 2])
        assert store.find("f", {"a": 1.0}) == old
        new_id = store.save(document())

    # Again, by Alembic's own command path (env.py opening its own engine): a no-op.
    command.upgrade(alembic_config(url=store_url), "head")
    with open_store(store_url) as store:
        assert {doc.id for doc in store.query()} == {"old-1", new_id}


def test_migrated_schema_matches_the_table_the_store_uses(store: SQLResultStore) -> None:
    with store.engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"version_table": VERSION_TABLE, "compare_type": True}
        )
        assert compare_metadata(context, metadata) == []


def test_database_from_a_newer_version_is_refused(store_url: str) -> None:
    open_store(store_url).close()
    engine = create_engine(store_url)
    with engine.begin() as connection:
        connection.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '9999_future'"))
    engine.dispose()
    with pytest.raises(StoreSchemaError, match="9999_future") as raised:
        open_store(store_url)
    assert "newer lume-operator" in str(raised.value)


# --- bad input: each a clear message, no password, no raw SQLAlchemy error ----------------------


def assert_clean(error: pytest.ExceptionInfo[BaseException]) -> None:
    assert isinstance(error.value, ResultStoreError)
    # No chained driver/SQLAlchemy traceback is shown with it.
    assert error.value.__cause__ is None
    assert error.value.__context__ is None or error.value.__suppress_context__
    assert "hunter2" not in str(error.value)
    assert "sqlalche.me" not in str(error.value)


def test_unreachable_postgresql_server() -> None:
    with pytest.raises(StoreUnreachableError) as raised:
        open_store("postgresql+psycopg://postgres:hunter2@127.0.0.1:1/test")
    assert_clean(raised)
    message = str(raised.value)
    assert message.startswith(
        "cannot connect to result store postgresql+psycopg://postgres:***@127.0.0.1:1/test: "
    )
    assert "refused" in message.lower()


def test_missing_postgresql_database() -> None:
    with pytest.raises(
        StoreUnreachableError, match='database "no_such_db" does not exist'
    ) as raised:
        open_store("postgresql://postgres:hunter2@127.0.0.1:5432/no_such_db")
    assert_clean(raised)
    assert "postgresql+psycopg://postgres:***@127.0.0.1:5432/no_such_db" in str(raised.value)


def test_sqlite_file_in_a_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(StoreUnreachableError) as raised:
        open_store(f"sqlite:///{missing}/results.sqlite")
    assert str(raised.value) == (
        f"cannot open result store sqlite:///{missing}/results.sqlite: "
        f"directory {str(missing)!r} does not exist"
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("not a url", "invalid result store URL 'not a url': not a database URL"),
        (
            "mongodb://admin:hunter2@db:27017/results",
            "invalid result store URL mongodb://admin:***@db:27017/results: unknown database "
            "or driver 'mongodb'",
        ),
        (
            "postgresql+nodriver://admin:hunter2@db/results",
            "unknown database or driver 'postgresql+nodriver'",
        ),
        (
            "mysql+mysqldb://admin:hunter2@db/results",
            "the driver for 'mysql+mysqldb' is not installed (MySQLdb)",
        ),
        ("http://user:hunter2@host", "unknown database or driver 'http'"),
    ],
)
def test_wrong_url(url: str, expected: str) -> None:
    with pytest.raises(StoreURLError) as raised:
        open_store(url)
    assert_clean(raised)
    assert expected in str(raised.value)


def test_document_that_does_not_exist(store: SQLResultStore) -> None:
    with pytest.raises(DocumentNotFoundError) as raised:
        store.get("0000-missing")
    assert_clean(raised)
    assert (
        str(raised.value)
        == f"no result document with id '0000-missing' in result store {store.url}"
    )


def test_attribute_index_that_does_not_resolve(store: SQLResultStore) -> None:
    saved = store.get(store.save(document(outputs={"stats": {"mean": [1, 2]}, "n": 3})))
    assert resolve(saved, ["stats", "mean", "1"]) == 2
    assert resolve(saved, ["stats", "mean", -1]) == 2
    assert resolve(saved, None) == saved.outputs

    cases = {
        ("stats", "median"): (
            f"attributeIndex of result document {saved.id!r}: ['stats']['median']: "
            "no key 'median' (has 'mean')"
        ),
        ("stats", "mean", 5): "['stats']['mean'][5]: index 5 is out of range (the list has 2",
        ("stats", "mean", "first"): "['stats']['mean']['first']: 'first' indexes a list",
        ("n", "x"): "['n']['x']: cannot index a int",
    }
    for index, expected in cases.items():
        with pytest.raises(AttributeIndexError) as raised:
            resolve(saved, list(index))
        assert expected in str(raised.value)
    with pytest.raises(AttributeIndexError, match=r"\['b'\]: no key 'b' \(has 'a'\)"):
        resolve({"a": 1}, ["b"])


def test_failed_save_writes_nothing(store: SQLResultStore) -> None:
    document_id = store.save(document())
    # Same id, other inputs: the insert fails inside its transaction.
    with pytest.raises(StoreOperationError) as raised:
        store.save(document(id=document_id, inputs={"n_particles": 5}))
    assert_clean(raised)
    assert str(raised.value) == (
        f"result store {store.url} already holds a result document with id {document_id!r} but "
        "other flow or inputs; choose another id or none"
    )
    assert count_rows(store) == 1
    assert store.get(document_id).inputs == document().inputs


def test_a_save_failing_after_its_insert_leaves_nothing(
    store: SQLResultStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    insert_then_fail = store._insert_or_existing

    def failing(connection: Any, row: dict[str, Any], caller_id: bool) -> str:
        insert_then_fail(connection, row, caller_id)
        connection.execute(text("SELECT * FROM no_such_table"))
        return row["id"]

    monkeypatch.setattr(store, "_insert_or_existing", failing)
    with pytest.raises(StoreOperationError) as raised:
        store.save(document())
    assert_clean(raised)
    assert str(raised.value).startswith(
        f"saving the result document of flow 'beam-stats' to result store {store.url} failed: "
    )
    assert "no_such_table" in str(raised.value)
    assert count_rows(store) == 0


def test_document_that_is_not_json() -> None:
    with pytest.raises(ValueError, match=r"outputs\.x\.1 holds a object, which is not JSON"):
        document(outputs={"x": [1, object()]})
    with pytest.raises(ValueError, match=r"inputs\.sigma is nan, which JSON cannot hold"):
        document(inputs={"sigma": float("nan")})
    with pytest.raises(ValueError, match=r"inputs has a non-string key 1"):
        document(inputs={1: "a"})
    with pytest.raises(ValueError, match=r"files\['x'\] is not a File description"):
        document(files={"x": {"filename": "a"}})


def test_masking_and_default_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert mask_url("postgresql://u:hunter2@h/db") == "postgresql://u:***@h/db"
    assert mask_url("bad://u:hunter2@h:x:y/db") == "bad://u:***@h:x:y/db"
    assert db_location("postgresql://u:hunter2@h/db", "id-1") == {
        "store": "postgresql://u:***@h/db",
        "id": "id-1",
        "type": "DBResult",
    }
    monkeypatch.delenv("LUME_RESULT_STORE_URL", raising=False)
    monkeypatch.setenv("LUME_RESULTS_DIR", str(tmp_path / "results"))
    assert default_store_url() == f"sqlite:///{tmp_path / 'results' / 'lume-results.sqlite'}"
    with open_store() as store:
        assert store.url == default_store_url()


def test_load_location_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from lume_operator.results.db_tasks import load_db_result

    monkeypatch.setenv("LUME_RESULTS_DIR", str(tmp_path))
    monkeypatch.delenv("LUME_RESULT_STORE_URL", raising=False)
    masked = {"store": "postgresql+psycopg://u:***@db/results", "id": "x", "type": "DBResult"}
    with pytest.raises(LocationError) as raised:
        load_db_result.fn(masked)
    assert str(raised.value) == (
        "result location 'x' is in store postgresql+psycopg://u:***@db/results, whose password "
        "is not configured here: set LUME_RESULT_STORE_URL (or pass store_url) to that store's URL"
    )
    with pytest.raises(LocationError, match="not a DB result location: {'id': 'x'}"):
        load_db_result.fn({"id": "x"})


# --- Prefect tasks in real flows ----------------------------------------------------------------


@pytest.mark.prefect
def test_prefect_tasks_save_and_load_in_flows(
    store_url: str,
    prefect_home: Path,
    shared_prefect_server: PrefectServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefect import flow
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_LOGGING_TO_API_ENABLED,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        temporary_settings,
    )

    from lume_operator.results.db_tasks import load_db_result, save_db_result

    monkeypatch.setenv("LUME_RESULT_STORE_URL", store_url)
    report = TextFile(filename=str(tmp_path / "report.txt"))

    @flow(name="beam-sim")
    def simulate(n: int, sigma: float = 0.5) -> dict[str, Any]:
        report.write(f"n={n}")
        stats = {"mean": n * sigma, "values": list(range(n))}
        return save_db_result({"stats": stats, "report": report})

    @flow(name="beam-consumer")
    def consume(location: dict[str, str]) -> float:
        return load_db_result(location, ["stats", "mean"]) + 1

    settings = {
        PREFECT_API_URL: shared_prefect_server.api_url,  # not an ephemeral server of its own
        PREFECT_HOME: prefect_home,
        PREFECT_SERVER_ANALYTICS_ENABLED: False,
        PREFECT_LOGGING_TO_API_ENABLED: False,
    }
    with temporary_settings(updates=settings):
        location = simulate(4)
        again = simulate(n=4, sigma=0.5)  # same flow and inputs: the same document
        other = simulate(3)
        loaded = consume(location)

    with open_store(store_url) as store:
        assert location == {"store": store.url, "id": location["id"], "type": "DBResult"}
        assert again == location and other["id"] != location["id"]
        assert loaded == 3.0
        saved = store.get(location["id"])
        assert saved.flow_name == "beam-sim"
        assert saved.inputs == {"n": 4, "sigma": 0.5}
        assert saved.flow_run_id and saved.flow_run_id != store.get(other["id"]).flow_run_id
        assert saved.files == {"report": report.description()}
        assert count_rows(store) == 2
    assert find_db_locations({"result": location}) == [("result", location)]
