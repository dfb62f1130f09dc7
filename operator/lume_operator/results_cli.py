"""`lume-operator results list|show|get`: the results a LumeFlow or FlowOfFlows recorded.

Status records only where results are (a file's name on a filesystem, a DB document's store and
id), so that it stays small; these commands read that status, from a local run's status file or
from a resource in a cluster, and fetch the content for the user, who then needs neither Prefect
nor kubectl nor SQL to get a result back. Every failure is one line and exit 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import wraps
from pathlib import Path
from typing import Any

import click
import yaml
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lume_operator import GROUP, VERSION
from lume_operator.api.crds import PLURALS as ALL_PLURALS
from lume_operator.api.keypath import KeyPathError, split, walk

# Commands import Prefect, lume-base and the Kubernetes client only when they need them:
# listing a status file should not wait seconds for imports it never uses.

KIND_ALIASES = {
    "lf": "LumeFlow",
    "lumeflow": "LumeFlow",
    "lumeflows": "LumeFlow",
    "fof": "FlowOfFlows",
    "flowofflow": "FlowOfFlows",
    "flowofflows": "FlowOfFlows",
}
# The kinds whose status has results.
PLURALS = {kind: ALL_PLURALS[kind] for kind in ("LumeFlow", "FlowOfFlows")}
DEFAULT_STATUS_FILE = Path("lume-results/status.yaml")
RUN_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)
# The file types whose content `get` checks by loading it; others are only copied.
CHECKED_TYPES = ("HDF5File", "TextFile")


class ResultsCLIError(Exception):
    """A failure the user can act on: printed as one line, exit status 1."""


@dataclass(frozen=True)
class Result:
    """One entry of status.results (or of a step's), as the status records it."""

    name: str
    type: str
    location: str
    filesystem: str | None = None
    step: str | None = None

    @property
    def key(self) -> str:
        """How a user names it: `NAME`, or `STEP/NAME` in a FlowOfFlows."""
        return f"{self.step}/{self.name}" if self.step else self.name

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"step": self.step} if self.step else {}
        data.update(name=self.name, type=self.type)
        if self.filesystem:
            data["filesystem"] = self.filesystem
        data["location"] = self.location
        return data


@dataclass(frozen=True)
class Target:
    """The resource (or one step of it) whose results were asked for."""

    kind: str
    namespace: str | None
    name: str
    results: list[Result]
    step: str | None = None
    # The result storages the namespace's SchedulingBackends declare, by filesystem
    # identifier (read from the cluster): where an object store is and how to reach it.
    storages: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"{self.kind} {where}" + (f" step {self.step}" if self.step else "")


@dataclass(frozen=True)
class Access:
    """How to reach result storage from here: options over what the backend declares and the
    standard AWS configuration (environment, ~/.aws); never a key on the command line."""

    endpoint_url: str | None = None
    profile: str | None = None
    volume_path: Path | None = None


@dataclass(frozen=True)
class Source:
    """Where status is read: a status file, or a cluster through a kubeconfig."""

    status_file: Path | None
    kubeconfig: str | None
    context: str | None
    namespace: str | None

    @property
    def in_cluster(self) -> bool:
        return self.status_file is None


# --- finding the target -------------------------------------------------------------------------


def parse_target(text: str) -> tuple[str | None, str]:
    """(kind, name) for `lf/NAME` and the like; (None, id) for a flow run id."""
    if RUN_ID.match(text):
        return None, text.lower()
    kind, slash, name = text.partition("/")
    if slash and name and "/" not in name and kind.lower() in KIND_ALIASES:
        return KIND_ALIASES[kind.lower()], name
    raise ResultsCLIError(
        f"unknown target {text!r}: give lf/NAME, lumeflow/NAME, fof/NAME, flowofflows/NAME "
        "or a flow run id (a UUID)"
    )


def _results(entries: Iterable[dict[str, Any]] | None, step: str | None = None) -> list[Result]:
    return [
        Result(
            name=str(entry.get("name", "")),
            type=str(entry.get("type", "")),
            location=str(entry.get("location", "")),
            filesystem=entry.get("filesystem"),
            step=step,
        )
        for entry in entries or []
    ]


def _namespace(document: dict[str, Any]) -> str | None:
    return (document.get("metadata") or {}).get("namespace")


def _name(document: dict[str, Any]) -> str:
    return str((document.get("metadata") or {}).get("name", ""))


def _status(document: dict[str, Any]) -> dict[str, Any]:
    return document.get("status") or {}


def _whole(document: dict[str, Any]) -> Target:
    kind, status = document.get("kind", ""), _status(document)
    if kind == "FlowOfFlows":
        results = [
            result
            for step in status.get("steps") or []
            for result in _results(step.get("results"), step.get("name"))
        ]
    else:
        results = _results(status.get("results"))
    return Target(kind, _namespace(document), _name(document), results)


def select_target(
    documents: list[dict[str, Any]],
    kind: str | None,
    name: str,
    namespace: str | None,
    where: str,
) -> Target:
    """The target among status documents: by kind and name, or by a flow run id."""
    documents = [
        doc
        for doc in documents
        if doc.get("kind") in PLURALS and namespace in (None, _namespace(doc))
    ]
    scope = f" in namespace {namespace!r}" if namespace else ""
    if kind is None:
        return _by_run_id(documents, name, f"{where}{scope}")
    found = [doc for doc in documents if doc["kind"] == kind and _name(doc) == name]
    if not found:
        there = ", ".join(_whole(doc).label for doc in documents)
        raise ResultsCLIError(
            f"no {kind} {name!r} in {where}{scope} "
            + (f"(there: {there})" if there else "(it holds no LumeFlow or FlowOfFlows)")
        )
    if len(found) > 1:
        spaces = ", ".join(sorted(str(_namespace(doc)) for doc in found))
        raise ResultsCLIError(
            f"{kind} {name!r} is in several namespaces in {where} ({spaces}): pass --namespace"
        )
    return _whole(found[0])


def _by_run_id(documents: list[dict[str, Any]], run_id: str, where: str) -> Target:
    def same(run: Any) -> bool:
        return isinstance(run, dict) and str(run.get("id", "")).lower() == run_id

    for doc in documents:
        status = _status(doc)
        if doc["kind"] == "LumeFlow" and same(status.get("lastRun")):
            return _whole(doc)
        if doc["kind"] == "LumeFlow":  # an older run, from the history (status.runs)
            for run in status.get("runs") or []:
                if same(run):
                    return Target(
                        "LumeFlow", _namespace(doc), _name(doc), _results(run.get("results"))
                    )
        if doc["kind"] == "FlowOfFlows":
            if same(status.get("run")):
                return _whole(doc)
            for step in status.get("steps") or []:
                if same(step.get("run")):
                    return Target(
                        "FlowOfFlows",
                        _namespace(doc),
                        _name(doc),
                        _results(step.get("results"), step.get("name")),
                        step=step.get("name"),
                    )
    raise ResultsCLIError(
        f"flow run {run_id} is in no status in {where} (looked at each LumeFlow's runs, "
        "each FlowOfFlows' run and its steps' runs)"
    )


def read_status_file(path: Path) -> list[dict[str, Any]]:
    """The documents `lume-operator run --status-out` wrote."""
    if not path.is_file():
        raise ResultsCLIError(
            f"status file {str(path)!r} does not exist (write one with `lume-operator run "
            "--status-out FILE`, or read a cluster with --kubeconfig/--context)"
        )
    try:
        documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ResultsCLIError(f"cannot read status file {str(path)!r}: {first}") from None
    if not all(isinstance(doc, dict) for doc in documents):
        raise ResultsCLIError(f"status file {str(path)!r} is not a list of resource documents")
    return documents


def read_cluster(source: Source, kind: str | None, name: str) -> tuple[list[dict], str, str]:
    """(documents, namespace, where) from the cluster: the named object, or all to search."""
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config.config_exception import ConfigException

    config_file = source.kubeconfig or os.environ.get("KUBECONFIG")
    if source.kubeconfig and not Path(source.kubeconfig).is_file():
        raise ResultsCLIError(f"kubeconfig {source.kubeconfig!r} does not exist")
    try:
        api_client = config.new_client_from_config(config_file=config_file, context=source.context)
        namespace = source.namespace or _context_namespace(config_file, source.context)
    except (ConfigException, OSError, yaml.YAMLError, KeyError, TypeError) as error:
        raise ResultsCLIError(f"cannot use kubeconfig: {_first_line(error)}") from None
    server = api_client.configuration.host
    where = f"the cluster at {server}"
    api = client.CustomObjectsApi(api_client)
    try:
        if kind is not None:
            documents = [
                api.get_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURALS[kind], name, _request_timeout=30
                )
            ]
        else:
            documents = [
                item
                for plural in PLURALS.values()
                for item in api.list_namespaced_custom_object(
                    GROUP, VERSION, namespace, plural, _request_timeout=30
                ).get("items", [])
            ]
    except ApiException as error:
        if error.status == 404 and kind is not None:
            raise ResultsCLIError(
                f"no {kind} {name!r} in namespace {namespace!r} of {where}"
            ) from None
        reason = _api_reason(error)
        raise ResultsCLIError(f"{where} refused the request: {reason}") from None
    except Exception as error:  # urllib3 connection errors and timeouts, SSL errors
        raise ResultsCLIError(
            f"cannot reach the cluster at {server}: {_connection_reason(error)}"
        ) from None
    try:
        backends = [
            {**item, "kind": "SchedulingBackend"}  # list items may come without their kind
            for item in api.list_namespaced_custom_object(
                GROUP, VERSION, namespace, ALL_PLURALS["SchedulingBackend"], _request_timeout=30
            ).get("items", [])
        ]
    except Exception:  # not allowed to read them: options and the AWS configuration say
        backends = []
    finally:
        api_client.close()
    return [*documents, *backends], namespace, where


def declared_storages(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The result storages of the SchedulingBackends among `documents`, by identifier."""
    from lume_operator.api.backend import ResultStorage

    storages: dict[str, dict[str, Any]] = {}
    for doc in documents:
        if doc.get("kind") != "SchedulingBackend":
            continue
        declared = (doc.get("spec") or {}).get("resultStorage")
        try:
            storage = ResultStorage.model_validate(declared) if declared else None
        except ValueError:
            continue
        if storage is not None:
            storages[storage.identifier] = storage.to_wire()
    return storages


def _context_namespace(config_file: str | None, context: str | None) -> str:
    from kubernetes import config

    contexts, active = config.list_kube_config_contexts(config_file=config_file)
    chosen = next((c for c in contexts if c.get("name") == context), None) if context else active
    return ((chosen or {}).get("context") or {}).get("namespace") or "default"


def _api_reason(error: Any) -> str:
    try:
        message = json.loads(error.body).get("message")
    except (TypeError, ValueError, AttributeError):
        message = None
    return f"{error.status} {error.reason}" + (f": {message}" if message else "")


def _connection_reason(error: BaseException) -> str:
    reason = getattr(error, "reason", None) or error
    text = _first_line(reason)
    # urllib3 wraps the OS error in "<object at 0x..>: Failed to establish ...": keep the why.
    return re.sub(r"^<[^>]*>: ", "", text)


def _first_line(error: BaseException | str) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def find_target(source: Source, text: str) -> Target:
    kind, name = parse_target(text)
    if source.in_cluster:
        documents, namespace, where = read_cluster(source, kind, name)
        found = select_target(documents, kind, name, namespace, where)
        return replace(found, storages=declared_storages(documents))
    assert source.status_file is not None
    documents = read_status_file(source.status_file)
    where = f"status file {str(source.status_file)!r}"
    return select_target(documents, kind, name, source.namespace, where)


def find_result(target: Target, name: str) -> Result:
    """The result `name` (or `STEP/NAME`) of the target; a name unique across steps is enough."""
    for result in target.results:
        if name in (result.key, f"{target.step}/{result.name}" if target.step else None):
            return result
    matches = [result for result in target.results if result.name == name]
    if len(matches) == 1 and target.kind == "FlowOfFlows":
        return matches[0]
    if len(matches) > 1:
        keys = ", ".join(result.key for result in matches)
        raise ResultsCLIError(
            f"result {name!r} is in several steps of {target.label} ({keys}): give STEP/NAME"
        )
    names = ", ".join(result.key for result in target.results)
    raise ResultsCLIError(
        f"no result {name!r} in {target.label} "
        + (f"(its results: {names})" if names else "(it has no results recorded)")
    )


# --- reading results ----------------------------------------------------------------------------


def db_location(result: Result) -> dict[str, str]:
    """The `{"store", "id", "type"}` location a DBResult's `STORE#ID` stands for."""
    store, hash_sign, document_id = result.location.rpartition("#")
    if not hash_sign or not store or not document_id:
        raise ResultsCLIError(
            f"result {result.key!r}: DB location {result.location!r} is not STORE_URL#ID"
        )
    return {"store": store, "id": document_id, "type": "DBResult"}


def load_document(result: Result, store_url: str | None) -> Any:
    """The stored document of a DBResult; store errors are the store's own messages."""
    from lume_operator.results.db_tasks import get_store, store_for_location
    from lume_operator.results.store import STORE_URL_ENV, ResultStoreError

    location = db_location(result)
    configured = store_url or os.environ.get(STORE_URL_ENV)
    if not configured and ":***@" in location["store"]:
        raise ResultsCLIError(
            f"result {result.key!r} is in store {location['store']}, whose password is not "
            f"configured here: set {STORE_URL_ENV} (or pass --store-url) to that store's URL"
        )
    try:
        _refuse_missing_sqlite(location["store"])
        # Without a configured URL, store_for_location would work out the default one, which
        # creates ./results; the location's own URL is then the only candidate anyway.
        store = (
            store_for_location(location, store_url) if configured else get_store(location["store"])
        )
        return store.get(location["id"])
    except ResultStoreError as error:
        raise ResultsCLIError(str(error)) from None


def _refuse_missing_sqlite(url: Any) -> None:
    """Opening a SQLite store creates it: a read must not leave an empty database behind."""
    from lume_operator.results.store import StoreUnreachableError, mask_url, parse_store_url

    try:
        parsed = parse_store_url(url)
    except Exception:
        return  # the store reports a bad URL itself
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or database in ("", ":memory:"):
        return
    if database.startswith("file:"):
        return
    path = Path(database).expanduser()
    if path.parent.is_dir() and not path.exists():
        raise StoreUnreachableError(
            f"cannot open result store {mask_url(parsed)}: file {str(path)!r} does not exist"
        )


def filesystem_for(result: Result, target: Target, access: Access) -> Any:
    """The filesystem a file result (or a value's record) is read from here: an object store
    reached with the options, the backend's declared endpoint and the AWS configuration; a
    claim where `--volume-path` says it is mounted here; else as the status names it."""
    from lume_operator.results import (
        FilesystemError,
        LocalFilesystem,
        MountedFilesystem,
        ObjectStoreFilesystem,
        get_filesystem,
    )

    identifier = result.filesystem or "local"
    location = result.location.rpartition("#")[0] if result.type == "value" else result.location
    if location.startswith("s3://"):
        declared = next(
            (
                spec["objectStore"]
                for root, spec in target.storages.items()
                if "objectStore" in spec and location.startswith(root.rstrip("/") + "/")
            ),
            {},
        )
        bucket = location.removeprefix("s3://").partition("/")[0]
        store = ObjectStoreFilesystem(
            identifier=identifier,
            url=declared.get("url") or f"s3://{bucket}",
            endpoint_url=access.endpoint_url or declared.get("endpointUrl"),
            region=declared.get("region"),
        )
        return store.with_profile(access.profile) if access.profile else store
    if identifier in target.storages and "volume" in target.storages[identifier]:
        if access.volume_path is None:
            return LocalFilesystem()  # where the claim is mounted at the runs' own path
        mount = target.storages[identifier]["volume"]["mountPath"]
        return MountedFilesystem(
            identifier=identifier, mount_path=access.volume_path, mount_alias=mount
        )
    try:
        return get_filesystem(identifier)
    except FilesystemError as error:
        if identifier.startswith("pvc/"):
            return LocalFilesystem()  # a claim read where it is mounted at the same path
        raise ResultsCLIError(f"result {result.key!r}: {error}") from None


def _local_path(filesystem: Any, location: str) -> str | None:
    from lume_operator.results import FilesystemError

    try:
        return str(filesystem.resolve(location))
    except FilesystemError:
        return None


def is_file(result: Result) -> bool:
    return result.type not in ("DBResult", "value")


def details(
    result: Result, target: Target, store_url: str | None, access: Access | None = None
) -> dict[str, Any]:
    """What `show` prints: where the result is and, for a DB result, the document's metadata."""
    info: dict[str, Any] = {"resource": target.label.split(" step ")[0], **result.as_dict()}
    if result.type == "DBResult":
        location = db_location(result)
        info.update(store=location["store"], id=location["id"])
        document = load_document(result, store_url)
        created = document.created_at
        info["document"] = {
            "flow": document.flow_name,
            "runId": document.flow_run_id,
            "resource": document.resource,
            "created": created.isoformat() if created else None,
            "inputs": document.inputs,
            **({"files": document.files} if document.files else {}),
        }
    elif is_file(result):
        filesystem = filesystem_for(result, target, access or Access())
        local = _local_path(filesystem, result.location)
        if local is not None:
            info["path"] = local
        with _storage_errors(result):
            info["exists"] = filesystem.exists(result.location)
            if info["exists"]:
                info["size"] = filesystem.size(result.location)
    return info


@contextlib.contextmanager
def _storage_errors(result: Result) -> Iterator[None]:
    """A storage's failure (unreachable, access denied, outside its root) as one line."""
    from lume_operator.results import FilesystemError

    try:
        yield
    except FilesystemError as error:
        raise ResultsCLIError(f"result {result.key!r}: {error}") from None


def read_value(result: Result, target: Target | None = None, access: Access | None = None) -> Any:
    """A plain value from the Prefect result record its location names (`KEY#PATH`): a file
    here, or a record in the backend's object store."""
    storage_key, _, key_path = result.location.rpartition("#")
    if storage_key.startswith("s3://") and target is not None:
        filesystem = filesystem_for(result, target, access or Access())
        with _storage_errors(result):
            try:
                content = filesystem.read_bytes(storage_key)
            except FileNotFoundError:
                raise ResultsCLIError(
                    f"result {result.key!r}: Prefect result {storage_key!r} does not exist"
                ) from None
        value = _stored_value(result, storage_key, content)
    else:
        path = Path(storage_key)
        if not storage_key or not path.is_file():
            raise ResultsCLIError(
                f"result {result.key!r} is a plain value kept by Prefect at "
                f"{result.location!r}, which is not a file here: `get` fetches it only where "
                "that storage is local or an object store"
            )
        try:
            content = path.read_bytes()
        except OSError as error:
            raise ResultsCLIError(
                f"result {result.key!r}: Prefect result {storage_key!r}: {_first_line(error)}"
            ) from None
        value = _stored_value(result, storage_key, content)
    try:
        value = walk(value, split(key_path))
    except KeyPathError as error:
        raise ResultsCLIError(
            f"result {result.key!r}: not in the value stored at {storage_key!r}: {error}"
        ) from None
    return value


def _stored_value(result: Result, storage_key: str, content: bytes) -> Any:
    """The value in a Prefect result record, read as the operator reads it (JSON only,
    nothing unpickled or imported: prefect/records.py)."""
    # Prefect's serializers take a second to import: only `get` of a value needs them.
    from lume_operator.prefect.records import ResultRefused, json_result

    where = f"result {result.key!r}: Prefect result {storage_key!r}"
    try:
        return json_result(content, where)
    except ResultRefused as error:
        raise ResultsCLIError(str(error)) from None


def copy_file(
    result: Result,
    output: Path | None,
    force: bool,
    target: Target | None = None,
    access: Access | None = None,
) -> tuple[Path, int]:
    """Copy a file result to `output` (default: its name in the cwd), after checking it loads;
    from an object store it is downloaded once, checked, then put in place."""
    from lume_operator.results import file_type

    filesystem = filesystem_for(result, target or Target("", None, "", []), access or Access())
    location = result.location
    local = _local_path(filesystem, location)
    where = "" if local in (None, location) else f" at {local!r}"
    name = posixpath.basename(location.rstrip("/")) or "result"
    destination = output if output is not None else Path.cwd() / name
    if destination.is_dir():
        destination = destination / name
    if (
        local is not None
        and destination.exists()
        and destination.resolve() == Path(local).resolve()
    ):
        raise ResultsCLIError(f"{str(destination)!r} is the result file itself; choose another -o")
    if destination.exists() and not force:
        raise ResultsCLIError(f"{str(destination)!r} exists; pass --force to overwrite it")
    if not destination.parent.is_dir():
        raise ResultsCLIError(f"directory {str(destination.parent)!r} does not exist")
    missing = ResultsCLIError(
        f"result {result.key!r}: file {location!r} (filesystem "
        f"{result.filesystem or 'local'!r}) does not exist{where}"
    )
    with contextlib.ExitStack() as stack:
        stack.enter_context(_storage_errors(result))
        try:
            source = stack.enter_context(filesystem.reading(location))
        except FileNotFoundError:
            raise missing from None
        if not source.is_file():
            raise missing
        if result.type in CHECKED_TYPES:
            try:  # a known type's own serializer: nothing named by the data is imported
                file_type(result.type).serializer_class().deserialize(str(source))
            except Exception as error:
                raise ResultsCLIError(
                    f"result {result.key!r}: {local or location!r} does not load as a "
                    f"{result.type}: {_first_line(error)}"
                ) from None
        try:
            shutil.copyfile(source, destination)
        except OSError as error:
            raise ResultsCLIError(
                f"cannot write {str(destination)!r}: {error.strerror or error}"
            ) from None
    return destination, destination.stat().st_size


def _plain(value: Any) -> Any:
    """Values to print: numpy arrays and scalars (from a stored value) as lists and numbers."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()
    return value


def dump(value: Any, fmt: str) -> str:
    value = _plain(value)
    if fmt == "json":
        return json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n"
    text = yaml.safe_dump(value, sort_keys=False, allow_unicode=True, default_flow_style=False)
    return text.removesuffix("...\n")  # a bare scalar's document-end marker


# --- the commands -------------------------------------------------------------------------------


def _err_console() -> Console:
    return Console(stderr=True, soft_wrap=True, highlight=False)


def _friendly(command: Callable[..., None]) -> Callable[..., None]:
    """One line and exit 1 for every failure; LUME_OPERATOR_DEBUG=1 shows unexpected ones."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except ResultsCLIError as error:
            _err_console().print(f"[red]error[/red] {escape(str(error))}")
            sys.exit(1)
        except Exception as error:
            if os.environ.get("LUME_OPERATOR_DEBUG"):
                raise
            message = f"{type(error).__name__}: {_first_line(error)}"
            _err_console().print(f"[red]error[/red] {escape(message)}")
            sys.exit(1)

    return wrapper


def _source_options(command: Callable[..., None]) -> Callable[..., None]:
    options = [
        click.option(
            "--status",
            "status_file",
            type=click.Path(path_type=Path, dir_okay=False),
            help=f"Status file of a local run (`run --status-out`). Default: {DEFAULT_STATUS_FILE} "
            "unless --kubeconfig or --context is given.",
        ),
        click.option("--kubeconfig", help="Read status from the cluster of this kubeconfig."),
        click.option("--context", help="Kubeconfig context (implies reading the cluster)."),
        click.option(
            "-n",
            "--namespace",
            help="Namespace of the resource. Default: the context's (cluster), any (file).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _source(
    status_file: Path | None, kubeconfig: str | None, context: str | None, namespace: str | None
) -> Source:
    if status_file is not None and (kubeconfig or context):
        raise ResultsCLIError("give either --status or --kubeconfig/--context, not both")
    if status_file is None and not (kubeconfig or context):
        status_file = DEFAULT_STATUS_FILE
    return Source(status_file, kubeconfig, context, namespace)


TARGET_HELP = "lf/NAME, fof/NAME (also lumeflow/, flowofflows/) or a flow run id."


@click.group("results")
def results_group() -> None:
    """List, show and fetch results recorded in a LumeFlow's or FlowOfFlows' status.

    TARGET is lf/NAME, fof/NAME (or lumeflow/NAME, flowofflows/NAME), or a flow run id: a
    LumeFlow's last run, a FlowOfFlows' parent run or one of its steps' runs. Status comes from
    the status file of a local run (default lume-results/status.yaml) or, with --kubeconfig or
    --context, from the resource in the cluster.
    """


@results_group.command("list")
@click.argument("target")
@_source_options
@click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "wide", "yaml", "json"]),
    default="table",
    show_default=True,
    help="table: locations shortened in the middle to fit the terminal; wide: in full.",
)
@_friendly
def list_command(
    target: str,
    status_file: Path | None,
    kubeconfig: str | None,
    context: str | None,
    namespace: str | None,
    output: str,
) -> None:
    """Each result of TARGET with its type and location (and step, for a FlowOfFlows)."""
    found = find_target(_source(status_file, kubeconfig, context, namespace), target)
    if output not in ("table", "wide"):
        click.echo(dump([result.as_dict() for result in found.results], output), nl=False)
        return
    width = _width() if output == "table" else None
    console = Console(soft_wrap=True, highlight=False, width=width or 4096)
    if not found.results:
        console.print(escape(f"{found.label}: no results recorded"))
        return
    stepped = found.kind == "FlowOfFlows"
    mounted = any(r.filesystem not in (None, "local") for r in found.results)
    table = Table(
        title=escape(found.label), title_justify="left", box=box.SIMPLE_HEAD, show_edge=False
    )
    columns = (["STEP"] if stepped else []) + ["NAME", "TYPE"] + (["FILESYSTEM"] if mounted else [])
    for column in columns:
        table.add_column(column, no_wrap=True)
    table.add_column("LOCATION", no_wrap=True)
    rows = []
    for result in found.results:
        row = ([result.step or ""] if stepped else []) + [result.name, result.type]
        row += [result.filesystem or ""] if mounted else []
        rows.append(row)
    # Each column is as wide as its widest cell or header, plus a space either side.
    used = sum(
        max(len(column), *(len(row[i]) for row in rows)) + 2 for i, column in enumerate(columns)
    )
    room = max(20, width - used - len(columns) - 3) if width else None
    for row, result in zip(rows, found.results, strict=True):
        location = _shorten(result.location, room) if room else result.location
        table.add_row(*(escape(cell) for cell in [*row, location]))
    console.print(table)


def _width() -> int | None:
    """The terminal's width, or COLUMNS when set; None (no limit) for a pipe without it."""
    if sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else None


def _shorten(text: str, room: int) -> str:
    """`text` cut in the middle to `room` characters, so both ends of a path stay readable."""
    if len(text) <= room:
        return text
    keep = room - 1
    head = keep // 2
    return f"{text[:head]}…{text[len(text) - (keep - head) :]}"


def _storage_options(command: Callable[..., None]) -> Callable[..., None]:
    options = [
        click.option(
            "--endpoint-url",
            help="Endpoint of the S3-compatible store of s3:// results (MinIO, Ceph). Default: "
            "the backend's resultStorage.objectStore.endpointUrl (read from the cluster), else "
            "the AWS configuration (AWS_ENDPOINT_URL_S3, ~/.aws/config).",
        ),
        click.option(
            "--profile",
            help="AWS profile whose credentials read s3:// results. Default: the standard AWS "
            "credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, ~/.aws/credentials).",
        ),
        click.option(
            "--volume-path",
            type=click.Path(path_type=Path, file_okay=False),
            help="Where the backend's result volume (its claim) is mounted here. Default: "
            "at the path the runs mount it.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@results_group.command("show")
@click.argument("target")
@click.argument("name")
@_source_options
@_storage_options
@click.option("--store-url", help="Store URL with password, for DB locations that mask it.")
@click.option(
    "-o", "--output", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True
)
@_friendly
def show_command(
    target: str,
    name: str,
    status_file: Path | None,
    kubeconfig: str | None,
    context: str | None,
    namespace: str | None,
    endpoint_url: str | None,
    profile: str | None,
    volume_path: Path | None,
    store_url: str | None,
    output: str,
) -> None:
    """Where result NAME (STEP/NAME in a FlowOfFlows) is; for a DB result, its document's metadata."""
    found = find_target(_source(status_file, kubeconfig, context, namespace), target)
    result = find_result(found, name)
    access = Access(endpoint_url, profile, volume_path)
    click.echo(dump(details(result, found, store_url, access), output), nl=False)


@results_group.command("get")
@click.argument("target")
@click.argument("name")
@_source_options
@_storage_options
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Where to copy a file result (default: its file name here), or write a DB document's "
    "outputs (default: stdout).",
)
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["yaml", "json"]),
    default="yaml",
    show_default=True,
    help="How to print a DB result's outputs or a plain value.",
)
@click.option("--store-url", help="Store URL with password, for DB locations that mask it.")
@_friendly
def get_command(
    target: str,
    name: str,
    status_file: Path | None,
    kubeconfig: str | None,
    context: str | None,
    namespace: str | None,
    endpoint_url: str | None,
    profile: str | None,
    volume_path: Path | None,
    output: Path | None,
    force: bool,
    fmt: str,
    store_url: str | None,
) -> None:
    """Fetch result NAME: copy a file, or print a DB document's outputs (or a plain value)."""
    found = find_target(_source(status_file, kubeconfig, context, namespace), target)
    result = find_result(found, name)
    access = Access(endpoint_url, profile, volume_path)
    if is_file(result):
        path, size = copy_file(result, output, force, found, access)
        _err_console().print(escape(f"{result.type} {result.key} -> {path} ({size} bytes)"))
        return
    if result.type == "DBResult":
        value = load_document(result, store_url).outputs
    else:
        value = read_value(result, found, access)
    text = dump(value, fmt)
    if output is None:
        click.echo(text, nl=False)
        return
    if output.exists() and not force:
        raise ResultsCLIError(f"{str(output)!r} exists; pass --force to overwrite it")
    try:
        output.write_text(text)
    except OSError as error:
        raise ResultsCLIError(f"cannot write {str(output)!r}: {error.strerror or error}") from None
    _err_console().print(escape(f"{result.type} {result.key} -> {output}"))


__all__ = ["Result", "ResultsCLIError", "Target", "find_result", "parse_target", "results_group"]
