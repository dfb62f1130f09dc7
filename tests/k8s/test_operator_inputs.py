"""Bad input and secrets, end to end: real kubectl, real kopf, the emulated API.

- Every manifest in tests/data/bad-manifests/ is refused where the DESIGN promises: by the CRD
  schema (`# expect: schema <field>`, checked here with jsonschema against the generated CRD,
  with the API server's strict unknown-field and list-map rules), or, for what only the models
  can see, by the operator ending `Stalled`/`InvalidSpec` naming the field
  (`# expect: stalled <field>`), with zero Prefect calls. The emulator does no admission, so
  the operator also gets the schema-rejected manifests; it must stall on those too.
- A canary Prefect API key never shows up outside its Secret: not in any object (status,
  annotations, events), not in the operator's log, not in Prefect's deployment, work pool or
  flow run, and the agent gets it only by `secretKeyRef`.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from lume_operator.api.manifests import format_location, parse_resource
from tests.k8s.conftest import KopfOperator, Kubectl
from tests.k8s.emulator import EmulatorServer, wait_until
from tests.k8s.prefect_server import PrefectServer

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "data" / "bad-manifests"
CRDS = ROOT / "crds"
EXAMPLE = ROOT / "examples" / "beam"
OPERATOR = "lume_operator.handlers.operator"
RESOURCES = {
    "SchedulingBackend": "lume.dev/v1alpha1/schedulingbackends",
    "LumeFlow": "lume.dev/v1alpha1/lumeflows",
    "FlowOfFlows": "lume.dev/v1alpha1/flowofflows",
}
# Schema-rejected manifests that the models once let through (the label pattern lived only in
# the CRD); `test_models_check_label_patterns` keeps them caught by the models too.
MODEL_GAPS = {"sb-label-uppercase", "lf-label-uppercase"}


# ---- the corpus --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadManifest:
    name: str
    path: Path
    body: dict[str, Any]
    expect: str  # "schema" or "stalled"
    field: str  # a substring of the field path the error must name
    cel: str | None  # for `stalled`: the CEL rule message the API server would refuse it with

    @property
    def kind(self) -> str:
        return str(self.body["kind"])

    @property
    def object_name(self) -> str:
        return str(self.body["metadata"]["name"])


def load_corpus() -> list[BadManifest]:
    found = []
    for path in sorted(CORPUS.glob("*.yaml")):
        text = path.read_text()
        expect = re.search(r"^# expect: (schema|stalled) (\S+)\s*$", text, re.M)
        assert expect, f"{path.name}: no `# expect: schema|stalled <field>` line"
        cel = re.search(r"^# cel: (.+?)\s*$", text, re.M)
        found.append(
            BadManifest(
                path.stem,
                path,
                yaml.safe_load(text),
                expect.group(1),
                expect.group(2),
                cel.group(1) if cel else None,
            )
        )
    return found


CORPUS_ITEMS = load_corpus()
SCHEMA_CASES = [m for m in CORPUS_ITEMS if m.expect == "schema"]
STALLED_CASES = [m for m in CORPUS_ITEMS if m.expect == "stalled"]


@pytest.mark.unit
def test_corpus_is_big_enough_and_covers_every_kind() -> None:
    assert len(CORPUS_ITEMS) >= 60
    for expect in ("schema", "stalled"):
        kinds = {m.kind for m in CORPUS_ITEMS if m.expect == expect}
        assert kinds == set(RESOURCES), (expect, kinds)
    identities = [(m.kind, m.object_name) for m in CORPUS_ITEMS]
    assert len(identities) == len(set(identities)), "two manifests name the same object"


# ---- the CRD schema, as the API server applies it ----------------------------------------------


def _crd_schemas() -> dict[str, dict[str, Any]]:
    schemas = {}
    for path in sorted(CRDS.glob("lume.dev_*.yaml")):
        crd = yaml.safe_load(path.read_text())
        (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
        schemas[crd["spec"]["names"]["kind"]] = version["schema"]["openAPIV3Schema"]
    return schemas


def _strict(schema: Any) -> Any:
    """Unknown fields refused, as `kubectl apply` (server-side field validation Strict) does:
    an object schema with properties and no additionalProperties/preserve-unknown-fields."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _list_map(
    validator: Any, value: Any, instance: Any, schema: dict[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    """`x-kubernetes-list-type: map`: the API server refuses two items with the same keys."""
    if value != "map" or not validator.is_type(instance, "array"):
        return
    keys = schema.get("x-kubernetes-list-map-keys") or []
    seen: set[tuple[Any, ...]] = set()
    for item in instance:
        if not isinstance(item, dict):
            continue
        key = tuple(json.dumps(item.get(k)) for k in keys)
        if key in seen:
            yield jsonschema.ValidationError(
                f"Duplicate value: {dict(zip(keys, key, strict=True))}"
            )
        seen.add(key)


ApiServerValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-list-type": _list_map}
)
SCHEMAS = {kind: _strict(schema) for kind, schema in _crd_schemas().items()}


def schema_errors(body: dict[str, Any]) -> list[str]:
    """`field.path: why` for every schema error, naming the field itself for unknown and
    missing fields (jsonschema reports those at the parent object)."""
    errors = []
    for error in ApiServerValidator(SCHEMAS[body["kind"]]).iter_errors(body):
        path = format_location(error.absolute_path)
        fields = [""]
        if error.validator == "additionalProperties":
            known = error.schema.get("properties", {})
            fields = [f for f in error.instance if f not in known]
        elif error.validator == "required":
            fields = [f for f in error.validator_value if f not in error.instance]
        for field in fields:
            at = ".".join(part for part in (path, field) if part)
            errors.append(f"{at}: {error.message}")
    return errors


def cel_messages(schema: Any) -> list[str]:
    if isinstance(schema, list):
        return [m for item in schema for m in cel_messages(item)]
    if not isinstance(schema, dict):
        return []
    found = [rule["message"] for rule in schema.get("x-kubernetes-validations") or []]
    return found + [m for value in schema.values() for m in cel_messages(value)]


@pytest.mark.unit
@pytest.mark.parametrize("manifest", SCHEMA_CASES, ids=lambda m: m.name)
def test_the_crd_schema_refuses_it_naming_the_field(manifest: BadManifest) -> None:
    errors = schema_errors(manifest.body)
    assert errors, f"{manifest.name}: the CRD schema accepts it"
    assert any(e.startswith(manifest.field) for e in errors), errors


@pytest.mark.unit
@pytest.mark.parametrize("manifest", STALLED_CASES, ids=lambda m: m.name)
def test_only_the_models_or_cel_can_refuse_it(manifest: BadManifest) -> None:
    """A `stalled` case really passes the schema (else it belongs to the schema cases); when a
    CEL rule covers it, the CRD carries that rule for a real API server."""
    assert schema_errors(manifest.body) == []
    if manifest.cel:
        assert any(manifest.cel in m for m in cel_messages(SCHEMAS[manifest.kind])), manifest.cel


@pytest.mark.unit
def test_valid_examples_pass_the_schema() -> None:
    """The strict schema check itself refuses nothing valid."""
    for path in [EXAMPLE / "backend.yaml", EXAMPLE / "lumeflow.yaml"]:
        assert schema_errors(yaml.safe_load(path.read_text())) == [], path
    for body in yaml.safe_load_all((ROOT / "examples" / "pipeline" / "pipeline.yaml").read_text()):
        if body and body.get("kind") in SCHEMAS:
            assert schema_errors(body) == [], body["metadata"]["name"]


@pytest.mark.unit
def test_models_check_label_patterns() -> None:
    for name in sorted(MODEL_GAPS):
        body = yaml.safe_load((CORPUS / f"{name}.yaml").read_text())
        _resource, problems = parse_resource(body, name)
        assert any(p.path.startswith("spec.labels") for p in problems), name


@pytest.mark.unit
def test_an_invalid_cron_says_why() -> None:
    body = yaml.safe_load((CORPUS / "lf-invalid-timezone.yaml").read_text())
    _resource, problems = parse_resource(body, "lf-invalid-timezone")
    message = "; ".join(p.message for p in problems)
    assert "Mars/Olympus_Mons" in message and "errors.pydantic.dev" not in message, message


# ---- the operator: Stalled, zero Prefect calls -------------------------------------------------


class RecordingPrefect:
    """Stands where Prefect would be: records every request and answers 503."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self) -> None:
                recorder.requests.append((self.command, self.path))
                body = b'{"detail": "recording stand-in for Prefect"}'
                self.send_response(503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _record

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/api"

    def __enter__(self) -> RecordingPrefect:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recording_prefect(monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordingPrefect]:
    with RecordingPrefect() as recorder:
        monkeypatch.setenv("PREFECT_API_URL", recorder.api_url)
        monkeypatch.setenv("LUME_PREFECT_API_URL", recorder.api_url)
        # Timers each 1 s, not 5 (read when the operator module is first imported here).
        monkeypatch.setenv("LUME_OPERATOR_FOLLOW_INTERVAL", "1")
        yield recorder


def stalled_condition(server: EmulatorServer, manifest: BadManifest) -> dict[str, Any] | None:
    obj = server.emulator.get_object(RESOURCES[manifest.kind], "default", manifest.object_name)
    conditions = ((obj or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == "Stalled"), None)


def test_the_operator_stalls_on_every_bad_manifest_without_calling_prefect(
    recording_prefect: RecordingPrefect,
    k8s_emulator: EmulatorServer,
    kubectl: Kubectl,
    run_kopf_operator: Callable[..., KopfOperator],
    caplog: pytest.LogCaptureFixture,
) -> None:
    operator = run_kopf_operator(OPERATOR)
    cases = list(CORPUS_ITEMS)
    files = [arg for m in cases for arg in ("-f", str(m.path))]
    kubectl("apply", "--validate=false", *files, timeout=60)

    wait_until(
        lambda: all(stalled_condition(k8s_emulator, m) for m in cases), timeout=60, interval=0.2
    )
    for manifest in cases:
        obj = k8s_emulator.emulator.get_object(
            RESOURCES[manifest.kind], "default", manifest.object_name
        )
        assert obj is not None
        status = obj["status"]
        stalled = stalled_condition(k8s_emulator, manifest)
        assert stalled is not None
        where = f"{manifest.name}: {stalled}"
        assert stalled["status"] == "True" and stalled["reason"] == "InvalidSpec", where
        assert manifest.field in stalled["message"], where
        assert "Traceback" not in stalled["message"], where
        assert status["observedGeneration"] == obj["metadata"]["generation"], where
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "False" and ready["reason"] == "InvalidSpec", where

    events = yaml.safe_load(kubectl("get", "events", "-o", "yaml").stdout)["items"]
    warned = {
        (e["involvedObject"]["kind"], e["involvedObject"]["name"])
        for e in events
        if e["reason"] == "InvalidSpec" and e["type"] == "Warning"
    }
    missing = {(m.kind, m.object_name) for m in cases} - warned
    assert not missing, f"no InvalidSpec event for {sorted(missing)}"

    # Timers and retries get their chance to call Prefect; none may. Each object has one
    # timer; wait until each timer ran twice per object of its kind since all were stalled.
    # A LumeFlow's follow timer runs only while it has a run to follow (none has: not one
    # was deployed), so it must not run at all.
    objects = {kind: sum(m.kind == kind for m in cases) for kind in RESOURCES}
    timers = {
        "backend_health": objects["SchedulingBackend"],
        "composition_follow": objects["FlowOfFlows"],
    }
    stalled_at = len(caplog.records)

    def timer_rounds() -> dict[str, int]:
        messages = [r.getMessage() for r in caplog.records[stalled_at:]]
        return {t: messages.count(f"Timer {t!r} succeeded.") for t in [*timers, "flow_follow"]}

    wait_until(
        lambda: all(timer_rounds()[t] >= 2 * n for t, n in timers.items()) or None,
        timeout=60,
        interval=0.2,
    )
    assert objects["LumeFlow"] and timer_rounds()["flow_follow"] == 0
    assert recording_prefect.requests == []
    assert operator.alive
    failures = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("kopf") and r.levelno >= logging.ERROR
    ]
    assert not failures, failures


# ---- secrets stay secret -----------------------------------------------------------------------

CANARY = "pnu_canary-7f3a9c51e2d84b06-never-print-me"
SECRET_NAME = "prefect-api"


def _canary_forms() -> list[str]:
    encoded = base64.b64encode(CANARY.encode()).decode()
    return [CANARY, encoded, encoded.rstrip("=")[:24]]


def _leaks(text: str) -> list[str]:
    return [form for form in _canary_forms() if form in text]


@pytest.fixture
def prefect_server(
    shared_prefect_server: PrefectServer, monkeypatch: pytest.MonkeyPatch
) -> PrefectServer:
    """The session's Prefect server, empty; reached only through the backend's `apiUrl`."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("LUME_OPERATOR_FOLLOW_INTERVAL", "1")  # timers read Prefect with the key
    return shared_prefect_server


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.load(reply)


@pytest.mark.prefect
def test_a_canary_api_key_appears_nowhere_but_in_its_secret(
    prefect_server: PrefectServer,
    k8s_emulator: EmulatorServer,
    kubectl: Kubectl,
    run_kopf_operator: Callable[..., KopfOperator],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The operator's import of Prefect sets the root logger to WARNING, whatever `kopf run
    # --verbose` asked for; INFO (kopf's handler and timer records) is checked below. Not
    # DEBUG: there `kubernetes.client.rest` logs each response body, the Secret's included.
    monkeypatch.setenv("PREFECT_LOGGING_ROOT_LEVEL", "INFO")
    operator = run_kopf_operator(OPERATOR, in_subprocess=True)
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SECRET_NAME, "namespace": "default"},
        "type": "Opaque",
        "data": {"api-key": base64.b64encode(CANARY.encode()).decode()},
    }
    backend = yaml.safe_load((EXAMPLE / "backend.yaml").read_text())
    backend["spec"]["prefect"] = {
        "apiUrl": prefect_server.api_url,
        "apiKeySecretRef": {"name": SECRET_NAME, "key": "api-key"},
    }
    flow = yaml.safe_load((EXAMPLE / "lumeflow.yaml").read_text())
    flow["spec"]["run"] = {"policy": "OnRequest"}
    # One requested run: created in Prefect, never started (no worker), followed by the timer.
    flow["metadata"]["annotations"] = {"lume.dev/run-request": "1"}
    manifests = yaml.safe_dump_all([secret, backend, flow])
    kubectl("apply", "--validate=false", "-f", "-", input=manifests)

    def flow_status() -> dict[str, Any]:
        obj = k8s_emulator.emulator.get_object(RESOURCES["LumeFlow"], "default", "beam-stats")
        return (obj or {}).get("status") or {}

    status = wait_until(
        lambda: (flow_status().get("lastRun") or {}).get("id") and flow_status(),
        timeout=90,
        interval=0.5,
    )

    # A few timer rounds (health, follow), each with the key.
    def rounds(timer: str, log: str) -> int:
        return log.count(f"Timer {timer!r} succeeded.")

    before = operator.output()
    wait_until(
        lambda: (
            (log := operator.output())
            and rounds("backend_health", log) >= rounds("backend_health", before) + 2
            and rounds("flow_follow", log) >= rounds("flow_follow", before) + 2
        ),
        timeout=30,
        interval=0.2,
    )
    assert operator.alive, operator.output()[-4000:]
    # It did read the key (else this test would prove nothing).
    secret_path = f"/api/v1/namespaces/default/secrets/{SECRET_NAME}"
    assert k8s_emulator.emulator.count("GET", secret_path) >= 1

    # 1. No object but the Secret, in any version it ever had: specs, statuses, annotations,
    #    events, the agent's objects.
    checked = 0
    for (resource, namespace, name), stored in list(k8s_emulator.emulator._objects.items()):
        if resource.plural == "secrets" and name == SECRET_NAME:
            continue
        for version in stored.history.raw:
            if version is None:
                continue
            text = json.dumps(version.raw, default=str)
            assert not _leaks(text), f"canary in {resource} {namespace}/{name}: {text[:2000]}"
            checked += 1
    assert checked > 10

    # 2. The operator's log (`kopf run --verbose`, INFO and above).
    log = operator.output()
    assert "flow_reconcile" in log, log[-2000:]
    assert not _leaks(log), [line for line in log.splitlines() if _leaks(line)][:5]

    # 3. Prefect: the deployment's job variables, the work pool's template, the flow run.
    api = prefect_server.api_url
    deployment = _get_json(f"{api}/deployments/{status['deploymentId']}")
    pool = _get_json(f"{api}/work_pools/default-local")
    flow_run = _get_json(f"{api}/flow_runs/{status['lastRun']['id']}")
    for what, value in [("deployment", deployment), ("work pool", pool), ("flow run", flow_run)]:
        assert not _leaks(json.dumps(value)), f"canary in the Prefect {what}: {value}"
    assert deployment["job_variables"] is not None

    # 4. The agent: the key only as a reference to the Secret.
    agent = k8s_emulator.emulator.get_object("apps/v1/deployments", "default", "local-agent")
    assert agent is not None
    env = agent["spec"]["template"]["spec"]["containers"][0]["env"]
    key_env = [e for e in env if e["name"] == "PREFECT_API_KEY"]
    assert key_env == [
        {
            "name": "PREFECT_API_KEY",
            "valueFrom": {"secretKeyRef": {"name": SECRET_NAME, "key": "api-key"}},
        }
    ]
    assert all("value" not in e for e in key_env)
