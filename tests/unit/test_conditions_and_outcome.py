"""conditions (kstatus without flapping times), Outcome helpers, run phases and settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from lume_operator.api.backend import SchedulingBackendStatus
from lume_operator.api.common import Condition
from lume_operator.api.flow import FlowRunStatus, LumeFlowStatus, ResultSpec, ResultStatus
from lume_operator.prefect.port import (
    FlowRunView,
    PrefectNotConfigured,
    PrefectRejected,
    PrefectUnreachable,
    RunState,
    WorkPoolOwnedElsewhere,
    idempotency_key,
    owned_by,
    owner_mark,
    pool_owner,
)
from lume_operator.reconcile import conditions
from lume_operator.reconcile.flowrun import (
    PHASES,
    ResultError,
    phase_of,
    result_statuses,
    run_status,
)
from lume_operator.reconcile.outcome import (
    Event,
    Outcome,
    Waiting,
    invalid,
    masked,
    parse_object,
    prefect_trouble,
    set_conditions,
    status_of,
)
from lume_operator.results.store import DB_RESULT_TYPE
from lume_operator.settings import OperatorSettings
from tests.unit.conftest import (
    backend_manifest,
    events,
    kstatus,
    lumeflow_manifest,
    make_settings,
)

pytestmark = pytest.mark.unit

OLD = "2020-01-01T00:00:00+00:00"


def old(type_: str, status: str, reason: str = "Before", message: str = "") -> dict:
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": OLD,
    }


# ---- conditions ---------------------------------------------------------------------------


def test_merge_keeps_the_time_when_the_status_is_unchanged():
    existing = [old("Ready", "False", "PrefectUnreachable", "down")]
    (merged,) = conditions.merge(existing, conditions.condition("Ready", False, "Waiting", "x"))
    assert merged == {
        "type": "Ready",
        "status": "False",
        "reason": "Waiting",
        "message": "x",
        "lastTransitionTime": OLD,
    }


def test_merge_new_time_when_the_status_changes_or_the_condition_is_new():
    existing = [old("Ready", "False")]
    merged = conditions.merge(
        existing,
        conditions.condition("Ready", True, "Reconciled"),
        conditions.condition("Stalled", False, "Reconciled"),
    )
    assert [c["type"] for c in merged] == ["Ready", "Stalled"]
    for condition in merged:
        assert condition["lastTransitionTime"] != OLD
        assert condition["lastTransitionTime"].endswith("+00:00")
    assert existing == [old("Ready", "False")]  # not mutated


def test_merge_keeps_other_conditions_and_orders_kstatus_first():
    existing = [old("WorkPoolReady", "True"), old("AgentReady", "True"), old("Stalled", "False")]
    merged = conditions.merge(existing, *conditions.ready("Reconciled"))
    assert [c["type"] for c in merged] == [
        "Ready",
        "Reconciling",
        "Stalled",
        "AgentReady",
        "WorkPoolReady",
    ]
    by_type = {c["type"]: c for c in merged}
    assert by_type["WorkPoolReady"] == old("WorkPoolReady", "True")
    assert by_type["Stalled"]["lastTransitionTime"] == OLD  # False -> False
    assert by_type["Stalled"]["reason"] == "Reconciled"


def test_merge_without_a_time_before_gets_one():
    (merged,) = conditions.merge(
        [{"type": "Ready", "status": "True", "reason": "X"}],
        conditions.condition("Ready", True, "Y"),
    )
    assert merged["lastTransitionTime"]


def test_merge_of_nothing():
    assert conditions.merge(None) == []
    assert conditions.merge([old("Ready", "True")]) == [old("Ready", "True")]


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (conditions.ready, ("True", "False", "False")),
        (conditions.progressing, ("False", "True", "False")),
        (conditions.stalled, ("False", "False", "True")),
        # issue 12: a failed run is Stalled (kstatus "Failed"), no longer all False ("Current")
        (conditions.failed, ("False", "False", "True")),
    ],
    ids=["ready", "progressing", "stalled", "failed"],
)
def test_kstatus_sets(make, expected):
    updates = make("Why", "what happened")
    assert [u["type"] for u in updates] == ["Ready", "Reconciling", "Stalled"]
    assert tuple(u["status"] for u in updates) == expected
    assert {u["reason"] for u in updates} == {"Why"}
    # the message goes on Ready, and on the condition that is True
    for update in updates:
        wants_message = update["type"] == "Ready" or update["status"] == "True"
        assert update["message"] == ("what happened" if wants_message else "")


def test_apply_types_and_keeps_times():
    existing = [Condition.model_validate(old("Ready", "True", "Reconciled"))]
    applied = conditions.apply(existing, conditions.ready("Reconciled", "again"))
    assert all(isinstance(c, Condition) for c in applied)
    assert applied[0].last_transition_time == OLD and applied[0].message == "again"
    assert applied[1].type == "Reconciling" and applied[1].last_transition_time != OLD


def test_is_true_and_reason_of():
    existing = conditions.apply(None, conditions.progressing("AgentNotReady", "0 of 1"))
    assert not conditions.is_true(existing, "Ready")
    assert conditions.is_true(existing, "Reconciling")
    assert not conditions.is_true(existing, "WorkPoolReady")
    assert conditions.reason_of(existing) == "AgentNotReady"
    assert conditions.reason_of(existing, "Stalled") == "AgentNotReady"
    assert conditions.reason_of(existing, "AgentReady") is None
    assert conditions.reason_of(None) is None and not conditions.is_true(None, "Ready")


# ---- outcome ------------------------------------------------------------------------------


def test_status_of_reads_a_written_status():
    raw = {
        "phase": "Running",
        "observedGeneration": 3,
        "deploymentId": "d",
        "lastRun": {"id": "r", "index": 0, "generation": 3, "stateType": "RUNNING"},
        "conditions": [old("Ready", "False", "FlowRunning")],
    }
    status = status_of(LumeFlowStatus, raw)
    assert status.phase == "Running" and status.observed_generation == 3
    assert status.last_run == FlowRunStatus(id="r", index=0, generation=3, state_type="RUNNING")
    assert status.conditions[0].last_transition_time == OLD


def test_status_of_drops_unknown_fields():
    status = status_of(LumeFlowStatus, {"phase": "Ready", "legacyField": 1, "kopf": {"x": 1}})
    assert status == LumeFlowStatus(phase="Ready")


@pytest.mark.parametrize(
    "raw",
    [
        {"phase": "Exploded", "deploymentId": "d"},
        {"lastRun": {"index": "not a number"}},
        {"conditions": [{"type": "Ready"}]},  # no status
        {"observedGeneration": "three"},
    ],
)
def test_status_of_drops_a_status_that_does_not_parse(raw):
    assert status_of(LumeFlowStatus, raw) == LumeFlowStatus()


def test_status_of_nothing():
    assert status_of(SchedulingBackendStatus, None) == SchedulingBackendStatus()
    assert status_of(SchedulingBackendStatus, {}) == SchedulingBackendStatus()


@pytest.mark.parametrize(
    ("error", "reason", "message"),
    [
        (
            PrefectUnreachable("connect timeout"),
            "PrefectUnreachable",
            "Prefect API unreachable: connect timeout",
        ),
        (PrefectUnreachable("Prefect answered 502"), "PrefectUnreachable", "Prefect answered 502"),
        (PrefectNotConfigured("NoPrefectAPI", "no URL"), "NoPrefectAPI", "no URL"),
        (PrefectNotConfigured("SecretNotFound", "no Secret"), "SecretNotFound", "no Secret"),
        (Waiting("BackendNotReady", "pool not ready"), "BackendNotReady", "pool not ready"),
    ],
)
@pytest.mark.parametrize("retry_in", [None, 4.0])
def test_prefect_trouble(error, reason, message, retry_in):
    status = LumeFlowStatus(phase="Running")
    outcome = prefect_trouble(status, error, retry_in=retry_in)
    assert outcome.status is status and status.phase == "Running"
    assert kstatus(status) == {
        "Ready": ("False", reason),
        "Reconciling": ("True", reason),
        "Stalled": ("False", reason),
    }
    assert status.conditions[0].message == status.conditions[1].message == message
    assert outcome.retry_in == retry_in and outcome.retry_message == message
    assert outcome.events == []


@pytest.mark.parametrize("retry_in", [None, 4.0])
def test_prefect_rejected_is_stalled_with_an_event_and_no_retry(retry_in):
    # issue 12: a refusal (4xx) is no longer retried with backoff like an outage: Stalled, a
    # Warning event, retried only when the spec changes.
    status = LumeFlowStatus(phase="Running", observed_generation=3)
    outcome = prefect_trouble(status, PrefectRejected("404: gone", 404), retry_in=retry_in)
    assert outcome.status is status and status.phase == "Running"
    assert kstatus(status) == {
        "Ready": ("False", "PrefectRejected"),
        "Reconciling": ("False", "PrefectRejected"),
        "Stalled": ("True", "PrefectRejected"),
    }
    assert status.conditions[0].message == status.conditions[2].message == "404: gone"
    assert outcome.retry_in is None and outcome.retry_message == ""
    assert outcome.events == [Event("Warning", "PrefectRejected", "404: gone")]
    assert {c.observed_generation for c in status.conditions} == {3}


def test_work_pool_owned_elsewhere_is_a_rejection_with_its_own_reason():
    error = WorkPoolOwnedElsewhere("work pool 'p' exists and was not created by this backend")
    outcome = prefect_trouble(SchedulingBackendStatus(), error, retry_in=8.0)
    assert kstatus(outcome.status)["Stalled"] == ("True", "WorkPoolOwnedElsewhere")
    assert outcome.retry_in is None
    assert events(outcome) == [("Warning", "WorkPoolOwnedElsewhere")]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://user:pw@host:4200/api", "http://***@host:4200/api"),
        ("GET https://key@prefect/api/x failed", "GET https://***@prefect/api/x failed"),
        ("a http://u:p@a/x and https://v:q@b/y", "a http://***@a/x and https://***@b/y"),
        ("http://host/api?x=a@b", "http://host/api?x=a@b"),  # no userinfo: untouched
        ("no url here, mail@example.org", "no url here, mail@example.org"),
    ],
)
def test_masked_hides_userinfo_of_every_url(text, expected):
    assert masked(text) == expected


@pytest.mark.parametrize(
    "error",
    [
        PrefectUnreachable("connect to http://admin:s3cret@prefect:4200/api failed"),
        PrefectRejected("401 from https://admin:s3cret@prefect/api/flows", 401),
    ],
    ids=["unreachable", "rejected"],
)
def test_prefect_trouble_masks_credentials_in_status_and_events(error):
    outcome = prefect_trouble(LumeFlowStatus(), error, retry_in=1.0)
    written = [c.message for c in outcome.status.conditions]
    written += [e.message for e in outcome.events] + [outcome.retry_message]
    assert not any("s3cret" in text for text in written)
    assert any("***@prefect" in text for text in written)


@pytest.mark.parametrize(
    "make", [conditions.ready, conditions.progressing, conditions.stalled, conditions.failed]
)
def test_set_conditions_stamps_the_observed_generation(make):
    status = LumeFlowStatus(observed_generation=7)
    set_conditions(status, make("Why", "what"))
    assert [c.observed_generation for c in status.conditions] == [7, 7, 7]
    status.observed_generation = 8
    set_conditions(status, conditions.ready("Again"))
    assert [c.observed_generation for c in status.conditions] == [8, 8, 8]
    assert status.conditions[0].to_wire()["observedGeneration"] == 8


def test_invalid_is_stalled_with_an_event():
    outcome = invalid(LumeFlowStatus(), "spec.entrypoint: bad", 7, phase="Failed")
    assert outcome.status.observed_generation == 7 and outcome.status.phase == "Failed"
    assert kstatus(outcome.status)["Stalled"] == ("True", "InvalidSpec")
    assert outcome.status.conditions[0].message == "spec.entrypoint: bad"
    assert outcome.events == [Event("Warning", "InvalidSpec", "spec.entrypoint: bad")]
    assert outcome.retry_in is None
    assert status_generations(outcome.status) == {7}


def status_generations(status) -> set:
    return {c.observed_generation for c in status.conditions}


def test_outcome_defaults():
    outcome = Outcome(LumeFlowStatus())
    assert outcome.events == [] and outcome.retry_in is None and outcome.retry_message == ""


def test_parse_object_ignores_status_and_names_every_bad_field():
    body = {**lumeflow_manifest(), "status": {"phase": "nonsense"}}
    flow, problem = parse_object(body)
    assert problem is None and flow.metadata.uid == "uid-flow-beam-stats"
    assert flow.status is None
    assert body["status"] == {"phase": "nonsense"}  # the body is not changed

    bad = lumeflow_manifest(entrypoint="nope", backendRef={"name": "Not_A_Name"})
    flow, problem = parse_object(bad)
    assert flow is None
    assert problem.count("; ") == 1
    assert "spec.entrypoint" in problem and "spec.backendRef.name" in problem

    flow, problem = parse_object(backend_manifest(runConfig={"memoryLimit": "1Gi"}))
    assert flow is None and problem.startswith("spec.runConfig.memoryLimit: does not apply")


# ---- run phases and results ---------------------------------------------------------------


@pytest.mark.parametrize(("state_type", "phase"), sorted(PHASES.items()))
def test_phase_of(state_type, phase):
    assert phase_of(state_type) == phase


@pytest.mark.parametrize("state_type", [None, "", "UNKNOWN"])
def test_phase_of_unknown_is_pending(state_type):
    assert phase_of(state_type) == "Pending"


def test_run_status_keeps_the_message_except_when_completed():
    failed = FlowRunView("r", "run-1", RunState("Failed", "FAILED", "boom"), "t0", "t1")
    assert run_status(failed, 2, "url", 5) == FlowRunStatus(
        id="r",
        name="run-1",
        index=2,
        generation=5,
        state="Failed",
        state_type="FAILED",
        start_time="t0",
        end_time="t1",
        url="url",
        message="boom",
    )
    done = FlowRunView("r", "run-1", RunState("Completed", "COMPLETED", "All states completed."))
    assert run_status(done, 0, None).message is None
    assert run_status(FlowRunView("r", "run-1"), 0, None).state is None


def test_result_statuses_db_locations_and_values(tmp_path: Path):
    location = {"store": "sqlite:///r.db", "id": "abc", "type": DB_RESULT_TYPE}
    assert result_statuses({"table": location, "n": 1}, None, "key") == [
        ResultStatus(name="table", type="DBResult", location="sqlite:///r.db#abc")
    ]
    declared = [ResultSpec(name="table", type="DBResult"), ResultSpec(name="n")]
    assert result_statuses({"table": location, "n": 1}, declared, None) == [
        ResultStatus(name="table", type="DBResult", location="sqlite:///r.db#abc"),
        ResultStatus(name="n", type="value", location="n"),
    ]
    with pytest.raises(ResultError, match="is a DBResult, not the declared TextFile"):
        result_statuses({"table": location}, [ResultSpec(name="table", type="TextFile")], None)


def test_result_statuses_invalid_description():
    bad = {"filename": "x", "filesystem_identifier": "nowhere", "file_type_string": "TextFile"}
    with pytest.raises(ResultError, match="result 'f': "):
        result_statuses({"f": bad}, [ResultSpec(name="f")], None)


def test_result_statuses_list_index_path(tmp_path: Path):
    path = tmp_path / "a.txt"
    path.write_text("a")
    desc = {"filename": str(path), "filesystem_identifier": "local", "file_type_string": "TextFile"}
    assert result_statuses({"outputs": [desc]}, [ResultSpec(name="outputs.0")], None) == [
        ResultStatus(name="outputs.0", type="TextFile", filesystem="local", location=str(path))
    ]
    with pytest.raises(ResultError, match=r"^result 'outputs.1' is not in the flow's return value"):
        result_statuses({"outputs": [desc]}, [ResultSpec(name="outputs.1")], None)


def test_idempotency_key_is_stable_and_distinct():
    key = idempotency_key("uid", 1, 0)
    assert key == idempotency_key("uid", 1, 0) and key.startswith("lume-")
    others = {
        idempotency_key("uid", 2, 0),
        idempotency_key("uid", 1, 1),
        idempotency_key("other", 1, 0),
        idempotency_key("uid", 1, 0, "step"),
    }
    assert key not in others and len(others) == 4
    assert idempotency_key("uid", None, 0) == idempotency_key("uid", 0, 0)


def test_idempotency_key_of_a_retry_is_its_own():
    first = idempotency_key("uid", 1, 0)
    assert idempotency_key("uid", 1, 0, attempt=0) == first  # attempt 0 is the first run's
    retries = {idempotency_key("uid", 1, 0, attempt=n) for n in (1, 2, 3)}
    assert first not in retries and len(retries) == 3
    assert idempotency_key("uid", 1, 0, "step", attempt=1) not in retries


def test_pool_owner_mark_names_the_uid():
    assert owned_by(owner_mark(pool_owner("u-1")), "u-1")
    assert not owned_by(owner_mark(pool_owner("u-1")), "u-2")
    assert not owned_by(owner_mark(pool_owner("u-12")), "u-1")  # exactly, not a prefix
    # No uid (a local run's backend): nothing is marked, and nothing is claimed.
    assert pool_owner("") is None and not owned_by(owner_mark(None), "")


# ---- settings -----------------------------------------------------------------------------


@pytest.mark.parametrize(("retry", "delay"), [(0, 1.0), (1, 2.0), (5, 32.0), (6, 60.0), (99, 60.0)])
def test_backoff_doubles_up_to_max(retry, delay):
    assert make_settings().backoff(retry) == delay


def test_backoff_respects_a_smaller_max():
    assert make_settings(max_backoff=5).backoff(10) == 5.0


def test_default_api_url_by_its_variable():
    assert make_settings("http://p/api").default_api_url == "http://p/api"
    assert OperatorSettings(PREFECT_API_URL="http://q/api").default_api_url == "http://q/api"


def test_default_api_url_by_field_name():
    assert OperatorSettings(default_api_url="http://p/api").default_api_url == "http://p/api"
