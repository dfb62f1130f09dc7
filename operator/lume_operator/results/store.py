"""The DB result store: flow results as JSON documents in SQLite (embedded) or PostgreSQL.

A document records what one flow run produced (outputs, File descriptions) and what it was given
(inputs). A hash of (flow name, inputs) is unique, so saving a run twice is a no-op and a run can
be found again by its inputs. Flows return the document's location (`{"store", "id", "type":
"DBResult"}`), never its content, so Kubernetes status stays small.

Prefect-free (the tasks are in `lume_operator.results.db_tasks`). Errors are `ResultStoreError`
subclasses whose messages name the store (password masked) and the document, key or URL at
fault; SQLAlchemy and driver exceptions never escape raw.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticSerializationError, to_jsonable_python
from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Index,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    delete,
    event,
    insert,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, Engine, create_engine, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    IntegrityError,
    NoSuchModuleError,
    OperationalError,
    SQLAlchemyError,
)

from lume_operator.api.keypath import KeyPathError, walk
from lume_operator.results.discover import find_values
from lume_operator.results.filesystems import results_dir

from .discover import find_file_descriptions, is_file_description

STORE_URL_ENV = "LUME_RESULT_STORE_URL"
DEFAULT_DB_NAME = "lume-results.sqlite"
DB_RESULT_TYPE = "DBResult"
TABLE_NAME = "lume_result_documents"
# Not alembic's default name: the store may share a database with Prefect, which has its own.
VERSION_TABLE = "lume_results_alembic_version"
SUPPORTED_URLS = "sqlite:///<path> or postgresql+psycopg://<user>@<host>/<database>"
MIGRATIONS_DIR = Path(__file__).with_name("migrations")

# --- errors -------------------------------------------------------------------------------------


class ResultStoreError(Exception):
    """Base class of every result store error; the message is complete and safe to show."""


class StoreURLError(ResultStoreError, ValueError):
    """The store URL cannot be parsed or names a database/driver that is not available."""


class StoreUnreachableError(ResultStoreError, ConnectionError):
    """The database cannot be opened or connected to (server down, no such file or database)."""


class StoreSchemaError(ResultStoreError):
    """The database's schema cannot be brought to this version (e.g. it is newer than the code)."""


class StoreOperationError(ResultStoreError):
    """A read or write failed inside the database; nothing was half written."""


class DocumentError(ResultStoreError, ValueError):
    """A document cannot be stored as given (not JSON, bad File description)."""


class DocumentNotFoundError(ResultStoreError, KeyError):
    """No document has the requested id in the store."""

    def __str__(self) -> str:
        # KeyError would repr() the message, wrapping it in quotes.
        return str(self.args[0]) if self.args else ""


class AttributeIndexError(ResultStoreError, LookupError):
    """An attributeIndex does not resolve in a document's outputs; names the failing key and path."""


class LocationError(ResultStoreError, ValueError):
    """A value is not a DB result location, or names a store this process cannot open."""


# --- URLs ---------------------------------------------------------------------------------------

_PASSWORD_IN_URL = re.compile(r"(?P<head>://[^:/@]*:)[^@]*(?P<tail>@)")


def default_store_url() -> str:
    """`$LUME_RESULT_STORE_URL`, else a SQLite file in the results directory (next to files)."""
    configured = os.environ.get(STORE_URL_ENV)
    if configured:
        return configured
    return f"sqlite:///{results_dir() / DEFAULT_DB_NAME}"


def mask_url(url: str | URL) -> str:
    """The URL with its password replaced by `***`, also for strings that do not parse."""
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return _PASSWORD_IN_URL.sub(r"\g<head>***\g<tail>", url)


def parse_store_url(url: str | URL) -> URL:
    """Parse and normalise a store URL: plain `postgresql://` and `postgres://` mean psycopg 3.

    SQLAlchemy's default PostgreSQL driver is psycopg2, which this package does not install.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StoreURLError(
            f"invalid result store URL {mask_url(url)!r}: not a database URL "
            f"(expected {SUPPORTED_URLS})"
        ) from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _scrub(message: str, url: URL) -> str:
    """A driver message, first line only, with the URL's password removed if it was echoed."""
    text = message.strip().splitlines()[0] if message.strip() else message
    if url.password:
        text = text.replace(str(url.password), "***")
    return text


def _driver_message(error: BaseException, url: URL) -> str:
    original = getattr(error, "orig", None)
    return _scrub(str(original if original is not None else error), url)


# --- documents ----------------------------------------------------------------------------------


def _jsonable(value: Any, where: str) -> Any:
    """`value` as plain JSON types (numpy scalars and arrays converted); rejects NaN/inf."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value}, which JSON cannot hold")
        return value
    if isinstance(value, Mapping):
        converted: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where} has a non-string key {key!r}; JSON keys are strings")
            converted[key] = _jsonable(item, f"{where}.{key}")
        return converted
    if isinstance(value, list | tuple):
        return [_jsonable(item, f"{where}.{index}") for index, item in enumerate(value)]
    if isinstance(value, BaseModel):  # File objects become their descriptions
        return _jsonable(value.model_dump(mode="json"), where)
    tolist = getattr(value, "tolist", None)  # numpy arrays and scalars
    if callable(tolist) and type(value).__module__ == "numpy":
        return _jsonable(tolist(), where)
    try:  # datetimes, UUIDs, paths, enums, sets: their usual JSON forms
        converted = to_jsonable_python(value)
    except PydanticSerializationError:
        raise ValueError(f"{where} holds a {type(value).__name__}, which is not JSON") from None
    return _jsonable(converted, where)


def _hash_form(value: Any) -> Any:
    # JSON has one number type: 1 and 1.0 are the same input (PostgreSQL's jsonb agrees).
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _hash_form(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_hash_form(item) for item in value]
    return value


def unique_hash(flow_name: str, inputs: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of (flow name, inputs): key order and 1 vs 1.0 don't matter."""
    return _hash_jsonable(flow_name, _jsonable(dict(inputs), "inputs"))


def _hash_jsonable(flow_name: str, inputs: dict[str, Any]) -> str:
    canonical = json.dumps(
        {"flow": flow_name, "inputs": _hash_form(inputs)},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ResultDocument(BaseModel):
    """One flow run's result: what it was given and what it produced.

    `files` defaults to the File descriptions found in `outputs`, keyed by their path there.
    `id` and `created_at` are set by the store on save when not given.
    """

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(default=None, max_length=64)
    flow_name: str = Field(min_length=1, max_length=255)
    flow_run_id: str | None = Field(default=None, max_length=64)
    resource: str | None = Field(
        default=None, max_length=512, description="The resource it came from, e.g. LumeFlow/name."
    )
    inputs: dict[str, Any] = Field(default_factory=dict)
    outputs: Any = None
    files: dict[str, dict[str, str]] | None = None
    created_at: datetime | None = None

    @field_validator("inputs", "outputs", mode="before")
    @classmethod
    def _to_json(cls, value: Any, info: ValidationInfo) -> Any:
        return _jsonable(value, info.field_name or "value")

    @field_validator("files")
    @classmethod
    def _check_files(cls, value: dict[str, dict[str, str]] | None) -> Any:
        for name, description in (value or {}).items():
            if not is_file_description(description):
                raise ValueError(
                    f"files[{name!r}] is not a File description "
                    "(needs exactly filename, filesystem_identifier, file_type_string)"
                )
        return value

    @model_validator(mode="after")
    def _default_files(self) -> Self:
        if self.files is None:
            self.files = dict(find_file_descriptions(self.outputs))
        return self

    @property
    def unique_hash(self) -> str:
        return _hash_jsonable(self.flow_name, self.inputs)  # already JSON: validated


def resolve(document: ResultDocument | Any, attribute_index: Sequence[str | int] | None) -> Any:
    """The value at `attribute_index` (keys or list indices, in order) in a document's outputs.

    A plain value (not a document) is indexed directly. String digits index lists, ints index
    dicts by their string form, since YAML authors write both.
    """
    is_document = isinstance(document, ResultDocument)
    value = document.outputs if is_document else document
    whose = f" of result document {document.id!r}" if is_document else ""
    try:
        return walk(value, attribute_index)
    except KeyPathError as error:
        raise AttributeIndexError(f"attributeIndex{whose}: {error}") from None


# --- locations ----------------------------------------------------------------------------------


def db_location(store_url: str | URL, document_id: str) -> dict[str, str]:
    """What a flow returns and status records for a DB result: where it is, never what."""
    return {"store": mask_url(store_url), "id": document_id, "type": DB_RESULT_TYPE}


def is_db_location(value: Any) -> bool:
    """A dict shaped like `db_location()` output."""
    return (
        isinstance(value, dict)
        and value.keys() == {"store", "id", "type"}
        and value["type"] == DB_RESULT_TYPE
        and isinstance(value["store"], str)
        and isinstance(value["id"], str)
    )


def find_db_locations(value: Any, prefix: str = "") -> list[tuple[str, dict[str, str]]]:
    """`(key path, location)` for every DB result location in a flow's return value.

    Key paths follow `find_file_descriptions` ('return' for a bare location), so status can list
    DB results next to files: type DBResult, location = store and id.
    """
    return find_values(value, is_db_location, prefix)


# --- the store ----------------------------------------------------------------------------------


metadata = MetaData()
_JSON = JSON().with_variant(postgresql.JSONB(), "postgresql")

# The current schema. Migrations never import it: each revision spells out its own DDL.
documents = Table(
    TABLE_NAME,
    metadata,
    Column("id", String(64), primary_key=True),
    Column("flow_name", String(255), nullable=False),
    Column("flow_run_id", String(64), nullable=True),
    Column("resource", String(512), nullable=True),
    Column("inputs", _JSON, nullable=False),
    Column("outputs", _JSON, nullable=True),
    Column("files", _JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("unique_hash", String(64), nullable=False),
    UniqueConstraint("unique_hash", name="uq_lume_result_documents_unique_hash"),
    Index("ix_lume_result_documents_flow_created", "flow_name", "created_at"),
    Index("ix_lume_result_documents_flow_run_id", "flow_run_id"),
    Index("ix_lume_result_documents_resource_created", "resource", "created_at"),
)


class ResultStore(ABC):
    """Where result documents live. Implementations: `SQLResultStore`."""

    @property
    @abstractmethod
    def url(self) -> str:
        """The store's URL with any password masked: safe for messages, status and locations."""

    @abstractmethod
    def save(self, document: ResultDocument) -> str:
        """Store `document` in one transaction and return its id.

        If a document with the same (flow name, inputs) exists, nothing is written and its id is
        returned: the first saved outputs win.
        """

    @abstractmethod
    def get(self, document_id: str) -> ResultDocument:
        """The document with this id; `DocumentNotFoundError` if there is none."""

    @abstractmethod
    def find(self, flow_name: str, inputs: Mapping[str, Any]) -> ResultDocument | None:
        """The document a run of `flow_name` with exactly these inputs saved, if any."""

    @abstractmethod
    def query(
        self,
        *,
        flow_name: str | None = None,
        flow_run_id: str | None = None,
        resource: str | None = None,
        limit: int = 100,
    ) -> list[ResultDocument]:
        """Documents matching every given filter, newest first."""

    @abstractmethod
    def delete(self, document_id: str) -> bool:
        """Remove a document; False if there was none."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def location(self, document_id: str) -> dict[str, str]:
        return db_location(self.url, document_id)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SQLResultStore(ResultStore):
    """Result documents in one table, through SQLAlchemy Core (SQLite or PostgreSQL)."""

    def __init__(self, url: str | URL, *, migrate: bool = True, **engine_options: Any) -> None:
        self._url = parse_store_url(url)
        self._masked = mask_url(self._url)
        self._engine = _create_engine(self._url, engine_options)
        self._upsert = _insert_unless_hash_exists(self._engine)
        if migrate:
            upgrade(self._engine)
        else:
            with self._connect():
                pass  # still fail fast on an unreachable database

    @property
    def url(self) -> str:
        return self._masked

    @property
    def engine(self) -> Engine:
        return self._engine

    @contextmanager
    def _connect(self, begin: bool = False) -> Iterator[Connection]:
        try:
            connection = self._engine.connect()
        except SQLAlchemyError as error:
            raise _unreachable(self._url, error) from None
        try:
            with connection:
                if begin:
                    with connection.begin():
                        yield connection
                else:
                    yield connection
        except DBAPIError as error:
            if error.connection_invalidated or _is_connect_failure(error):
                raise _unreachable(self._url, error) from None
            raise

    def save(self, document: ResultDocument) -> str:
        row = {
            "id": document.id or str(uuid.uuid4()),
            "flow_name": document.flow_name,
            "flow_run_id": document.flow_run_id,
            "resource": document.resource,
            "inputs": document.inputs,
            "outputs": document.outputs,
            "files": document.files or {},
            "created_at": document.created_at or datetime.now(UTC),
            "unique_hash": document.unique_hash,
        }
        try:
            with self._connect(begin=True) as connection:
                return self._insert_or_existing(connection, row, document.id is not None)
        except SQLAlchemyError as error:
            raise StoreOperationError(
                f"saving the result document of flow {document.flow_name!r} to result store "
                f"{self._masked} failed: {_driver_message(error, self._url)}"
            ) from None

    def _insert_or_existing(
        self, connection: Connection, row: dict[str, Any], caller_id: bool
    ) -> str:
        """INSERT .. ON CONFLICT DO NOTHING on the hash: concurrent saves of one run agree."""
        if caller_id and self._caller_id_taken(connection, row):
            return row["id"]
        if self._upsert is not None:
            # rowcount is unreliable across drivers; RETURNING yields no row when skipped.
            inserted = connection.execute(self._upsert, row).scalar_one_or_none()
            if inserted is not None:
                return inserted
        else:
            try:
                with connection.begin_nested():
                    connection.execute(insert(documents), row)
                return row["id"]
            except IntegrityError:
                pass
        return connection.execute(
            select(documents.c.id).where(documents.c.unique_hash == row["unique_hash"])
        ).scalar_one()

    def _caller_id_taken(self, connection: Connection, row: dict[str, Any]) -> bool:
        """Whether a caller-chosen id is already this run's; an error if another run has it."""
        taken = connection.execute(
            select(documents.c.unique_hash).where(documents.c.id == row["id"])
        ).scalar_one_or_none()
        if taken is None:
            return False
        if taken == row["unique_hash"]:
            return True
        raise StoreOperationError(
            f"result store {self._masked} already holds a result document with id "
            f"{row['id']!r} but other flow or inputs; choose another id or none"
        )

    def get(self, document_id: str) -> ResultDocument:
        row = self._one(select(documents).where(documents.c.id == document_id), document_id)
        if row is None:
            raise DocumentNotFoundError(
                f"no result document with id {document_id!r} in result store {self._masked}"
            )
        return _document(row)

    def find(self, flow_name: str, inputs: Mapping[str, Any]) -> ResultDocument | None:
        try:
            digest = unique_hash(flow_name, inputs)
        except ValueError as error:
            raise DocumentError(f"cannot look up inputs of flow {flow_name!r}: {error}") from None
        row = self._one(select(documents).where(documents.c.unique_hash == digest), flow_name)
        return None if row is None else _document(row)

    def query(
        self,
        *,
        flow_name: str | None = None,
        flow_run_id: str | None = None,
        resource: str | None = None,
        limit: int = 100,
    ) -> list[ResultDocument]:
        statement = select(documents)
        for column, value in (
            (documents.c.flow_name, flow_name),
            (documents.c.flow_run_id, flow_run_id),
            (documents.c.resource, resource),
        ):
            if value is not None:
                statement = statement.where(column == value)
        statement = statement.order_by(documents.c.created_at.desc()).limit(limit)
        try:
            with self._connect() as connection:
                rows = connection.execute(statement).mappings().all()
        except SQLAlchemyError as error:
            raise self._read_error("querying result documents", error) from None
        return [_document(row) for row in rows]

    def delete(self, document_id: str) -> bool:
        try:
            with self._connect(begin=True) as connection:
                result = connection.execute(delete(documents).where(documents.c.id == document_id))
        except SQLAlchemyError as error:
            raise self._read_error(f"deleting result document {document_id!r}", error) from None
        return result.rowcount == 1

    def close(self) -> None:
        self._engine.dispose()

    def _one(self, statement: Any, what: str) -> Any:
        try:
            with self._connect() as connection:
                return connection.execute(statement).mappings().one_or_none()
        except SQLAlchemyError as error:
            raise self._read_error(f"reading result document {what!r}", error) from None

    def _read_error(self, action: str, error: SQLAlchemyError) -> StoreOperationError:
        return StoreOperationError(
            f"{action} in result store {self._masked} failed: {_driver_message(error, self._url)}"
        )

    def __repr__(self) -> str:
        return f"SQLResultStore({self._masked!r})"


def _insert_unless_hash_exists(engine: Engine) -> Any:
    """INSERT .. ON CONFLICT (unique_hash) DO NOTHING RETURNING id, where the dialect has it."""
    if not engine.dialect.insert_returning:
        return None
    if engine.dialect.name == "postgresql":
        dialect_insert: Any = postgresql.insert
    elif engine.dialect.name == "sqlite":
        dialect_insert = sqlite.insert
    else:
        return None
    return (
        dialect_insert(documents)
        .on_conflict_do_nothing(index_elements=["unique_hash"])
        .returning(documents.c.id)
    )


def _document(row: Mapping[str, Any]) -> ResultDocument:
    created = row["created_at"]
    if created.tzinfo is None:  # SQLite keeps no time zone; we always write UTC
        created = created.replace(tzinfo=UTC)
    # Trusted: everything in the table was validated on the way in.
    return ResultDocument.model_construct(
        id=row["id"],
        flow_name=row["flow_name"],
        flow_run_id=row["flow_run_id"],
        resource=row["resource"],
        inputs=row["inputs"],
        outputs=row["outputs"],
        files=row["files"],
        created_at=created,
    )


def _create_engine(url: URL, options: dict[str, Any]) -> Engine:
    masked = mask_url(url)
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            parent = Path(database).expanduser().absolute().parent
            if not parent.is_dir():
                raise StoreUnreachableError(
                    f"cannot open result store {masked}: directory {str(parent)!r} does not exist"
                )
        # Several flow runs may write at once: wait for the lock instead of failing at once.
        options.setdefault("connect_args", {}).setdefault("timeout", 30)
    elif url.get_backend_name() == "postgresql":
        options.setdefault("pool_pre_ping", True)
        options.setdefault("connect_args", {}).setdefault("connect_timeout", 10)
    try:
        engine = create_engine(url, **options)
    except NoSuchModuleError:
        raise StoreURLError(
            f"invalid result store URL {masked}: unknown database or driver {url.drivername!r} "
            f"(expected {SUPPORTED_URLS})"
        ) from None
    except ImportError as error:
        raise StoreURLError(
            f"invalid result store URL {masked}: the driver for {url.drivername!r} is not "
            f"installed ({error.name or error}); use {SUPPORTED_URLS}"
        ) from None
    except (ArgumentError, TypeError, ValueError) as error:
        raise StoreURLError(
            f"invalid result store URL {masked}: {_scrub(str(error), url)}"
        ) from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_on_connect)
    return engine


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Foreign keys are off by default in SQLite; keep behaviour aligned with PostgreSQL.
    dbapi_connection.execute("PRAGMA foreign_keys=ON")


def _is_connect_failure(error: DBAPIError) -> bool:
    return isinstance(error, OperationalError) and any(
        marker in str(error.orig).lower()
        for marker in ("unable to open database", "connection", "could not connect", "server")
    )


def _unreachable(url: URL, error: BaseException) -> StoreUnreachableError:
    return StoreUnreachableError(
        f"cannot connect to result store {mask_url(url)}: {_driver_message(error, url)}"
    )


# --- migrations ---------------------------------------------------------------------------------

_migrate_lock = threading.Lock()


def alembic_config(connection: Connection | None = None, url: str | URL | None = None) -> Any:
    """An Alembic Config for the packaged migrations, built in code (no alembic.ini).

    Pass a connection to migrate on it, or a URL for Alembic commands that open their own.
    """

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("version_table", VERSION_TABLE)
    if url is not None:
        # ConfigParser interpolation: a literal % in a password must be doubled.
        rendered = parse_store_url(url).render_as_string(hide_password=False)
        config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def upgrade(target: Engine | str | URL, revision: str = "head") -> None:
    """Bring the store's schema to `revision` (default the newest), keeping every document.

    Runs at every `open_store`; a no-op when the schema is current. On PostgreSQL an advisory
    lock serialises processes that open a new database at the same time.
    """

    engine = target if isinstance(target, Engine) else _create_engine(parse_store_url(target), {})
    url = engine.url
    try:
        with _migrate_lock, engine.connect() as connection:
            if engine.dialect.name == "postgresql":
                connection.exec_driver_sql("SELECT pg_advisory_lock(7061636875)")
            try:
                if revision == "head" and _current_revision(connection) == _head_revision():
                    return
                command.upgrade(alembic_config(connection), revision)
                connection.commit()
            finally:
                if engine.dialect.name == "postgresql":
                    connection.rollback()
                    connection.exec_driver_sql("SELECT pg_advisory_unlock(7061636875)")
                    connection.commit()
    except CommandError as error:
        raise StoreSchemaError(
            f"cannot migrate result store {mask_url(url)} to {revision!r}: {error} (a database "
            "written by a newer lume-operator needs that version or newer)"
        ) from None
    except DBAPIError as error:
        if isinstance(error, OperationalError) and _is_connect_failure(error):
            raise _unreachable(url, error) from None
        raise StoreSchemaError(
            f"migrating result store {mask_url(url)} failed: {_driver_message(error, url)}"
        ) from None
    except SQLAlchemyError as error:
        raise _unreachable(url, error) from None
    finally:
        if engine is not target:
            engine.dispose()


def _current_revision(connection: Connection) -> str | None:

    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    revision = context.get_current_revision()
    connection.rollback()  # end the read's implicit transaction before migrating
    return revision


_head: str | None = None


def _head_revision() -> str | None:
    global _head
    if _head is None:
        _head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    return _head


def open_store(url: str | URL | None = None, *, migrate: bool = True) -> SQLResultStore:
    """Open (and, by default, create or upgrade) the store at `url`.

    Default URL: `$LUME_RESULT_STORE_URL`, else a SQLite file in the results directory.
    """
    return SQLResultStore(url if url is not None else default_store_url(), migrate=migrate)


__all__ = [
    "DB_RESULT_TYPE",
    "STORE_URL_ENV",
    "AttributeIndexError",
    "DocumentError",
    "DocumentNotFoundError",
    "LocationError",
    "ResultDocument",
    "ResultStore",
    "ResultStoreError",
    "SQLResultStore",
    "StoreOperationError",
    "StoreSchemaError",
    "StoreURLError",
    "StoreUnreachableError",
    "alembic_config",
    "db_location",
    "default_store_url",
    "find_db_locations",
    "is_db_location",
    "mask_url",
    "open_store",
    "parse_store_url",
    "resolve",
    "unique_hash",
]
