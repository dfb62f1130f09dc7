"""LumeFlow run lifecycle (issue 12): concurrency policy, deadlines, retries, history, OnRequest
requests and parameters, Prefect refusals told from outages, cancel-then-delete, Orphan, masked
URLs and conditions' observedGeneration."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from lume_operator.api.flow import LumeFlow, LumeFlowStatus, RunPolicy
from lume_operator.prefect.port import (
    PrefectRejected,
    PrefectUnreachable,
    idempotency_key,
)
from lume_operator.reconcile.lumeflow import (
    RUN_PARAMETERS,
    RUN_REQUEST,
    delete_flow,
    follow_flow,
    follow_run,
    reconcile_flow,
)
from tests.unit.conftest import (
    cond,
    events,
    kstatus,
    lumeflow_manifest,
    make_settings,
    ready_backend,
)

pytestmark = pytest.mark.unit

UID = "uid-flow-beam-stats"
DEPLOYMENT = ("beam-stats", "default")
T0 = datetime(2026, 1, 1, tzinfo=UTC)  # when FakePrefect creates and starts runs


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def flow(run: dict[str, Any] | None = None, *, generation: int = 1, **kwargs: Any):
    return lumeflow_manifest(run=run or {"policy": "OnChange"}, generation=generation, **kwargs)


def requested(
    value: str | None, run: dict[str, Any] | None = None, parameters: str | None = None, **kw: Any
):
    annotations = {RUN_REQUEST: value} if value is not None else {}
    if parameters is not None:
        annotations[RUN_PARAMETERS] = parameters
    return lumeflow_manifest(
        run={"policy": "OnRequest", **(run or {})}, annotations=annotations or None, **kw
    )


async def reconcile(body, status, connect, settings=None, *, retry=0):
    return await reconcile_flow(
        body,
        status,
        backend=ready_backend(),
        connect=connect,
        settings=settings or make_settings(),
        retry=retry,
    )


async def follow(body, status, connect, *, now: datetime | float = 30):
    when = at(now) if isinstance(now, (int, float)) else now
    return await follow_flow(body, status, backend=ready_backend(), connect=connect, now=when)


async def delete(body, status, connect, settings=None, *, waited=0.0, retry=0):
    return await delete_flow(
        body,
        status,
        backend=ready_backend(),
        connect=connect,
        settings=settings or make_settings(),
        retry=retry,
        waited=waited,
    )


async def running(fake, connect, body) -> LumeFlowStatus:
    """`body` reconciled, its run started (RUNNING) and followed into status."""
    outcome = await reconcile(body, LumeFlowStatus(), connect)
    fake.set_state(outcome.status.last_run.id, "RUNNING")
    followed = await follow(body, outcome.status, connect)
    fake.calls.clear()
    return followed.status


def operations(fake) -> list[str]:
    """Record the order of the fake's operations from now on."""
    order: list[str] = []
    enter = fake._enter

    def recording(operation: str) -> None:
        order.append(operation)
        enter(operation)

    fake._enter = recording
    return order


def generations(status: LumeFlowStatus) -> set[int | None]:
    return {c.observed_generation for c in status.conditions or []}


# ---- concurrencyPolicy --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("run", "expected"),
    [
        ({"policy": "OnChange"}, "Replace"),
        ({"policy": "OnRequest"}, "Allow"),
        ({"policy": "Schedule", "cron": "* * * * *"}, "Allow"),
        ({"policy": "OnChange", "concurrencyPolicy": "Forbid"}, "Forbid"),
        ({"policy": "OnRequest", "concurrencyPolicy": "Replace"}, "Replace"),
        ({"policy": "Schedule", "cron": "* * * * *", "concurrencyPolicy": "Forbid"}, "Forbid"),
    ],
)
def test_concurrency_policy_defaults_by_run_policy(run, expected):
    assert RunPolicy.model_validate(run).concurrency == expected


def test_run_policy_defaults():
    policy = RunPolicy()
    assert policy.policy == "OnChange" and policy.concurrency == "Replace"
    assert policy.timeout_seconds is None and policy.retries == 0
    assert policy.retry_delay_seconds == 0 and policy.history_limit == 10


@pytest.mark.asyncio
async def test_on_change_replaces_the_run_of_the_old_generation(fake, connect):
    status = await running(fake, connect, flow())
    old = status.last_run.id
    order = operations(fake)
    outcome = await reconcile(flow(generation=2), status, connect)
    new = outcome.status.last_run
    assert new.id != old and new.generation == 2 and len(fake.runs) == 2
    # cancelled first (its worker stops it: Cancelling), then the new run
    assert order.index("cancel_flow_run") < order.index("create_flow_run")
    assert fake.runs[old].view.state.type == "CANCELLING"
    assert events(outcome) == [("Normal", "RunReplaced"), ("Normal", "FlowRunCreated")]
    assert "run-1" in outcome.events[0].message
    assert [(r.id, r.reason) for r in outcome.status.runs] == [(new.id, None), (old, "Replaced")]
    assert outcome.status.phase == "Running"
    assert kstatus(outcome.status)["Reconciling"] == ("True", "FlowRunning")

    # followed: the replaced run's end is recorded in history, still Replaced
    fake.set_state(old, "CANCELLED")
    followed = await follow(flow(generation=2), outcome.status, connect)
    assert followed.status.runs[1].state == "Cancelled"
    assert followed.status.runs[1].reason == "Replaced"
    assert followed.status.last_run.id == new.id and followed.status.phase == "Running"


@pytest.mark.asyncio
async def test_replace_with_nothing_in_flight_cancels_nothing(fake, connect):
    status = await running(fake, connect, flow())
    fake.set_state(status.last_run.id, "FAILED")
    outcome = await reconcile(flow(generation=2), status, connect)
    assert "cancel_flow_run" not in fake.calls and fake.calls["active_runs"] == 1
    assert events(outcome) == [("Normal", "FlowRunCreated")]


@pytest.mark.asyncio
async def test_forbid_skips_a_new_run_while_one_is_in_flight(fake, connect):
    forbid = {"concurrencyPolicy": "Forbid"}
    status = await running(fake, connect, requested("1", forbid))
    first = status.last_run.id
    outcome = await reconcile(requested("2", forbid), status, connect)
    status = outcome.status
    assert len(fake.runs) == 1 and "create_flow_run" not in fake.calls
    assert "cancel_flow_run" not in fake.calls
    assert events(outcome) == [("Normal", "RunSkipped")]
    assert "run-1" in outcome.events[0].message
    skipped = status.runs[0]
    assert (skipped.id, skipped.index, skipped.state, skipped.reason) == (
        None,
        2,
        "Skipped",
        "ConcurrencyForbid",
    )
    assert status.runs[1].id == first
    assert status.last_run.id == first  # lastRun is the newest real run
    assert status.last_request == 2  # the request counts as handled
    assert status.phase == "Running"

    # the request is not taken up again once the run in flight ends; a new one runs
    fake.set_state(first, "FAILED")
    again = await reconcile(requested("2", forbid), status, connect)
    assert len(fake.runs) == 1 and again.events == []
    third = await reconcile(requested("3", forbid), again.status, connect)
    assert len(fake.runs) == 2 and third.status.last_run.index == 3


@pytest.mark.asyncio
async def test_forbid_under_on_change_skips_the_new_generation_once(fake, connect):
    forbid = {"policy": "OnChange", "concurrencyPolicy": "Forbid"}
    status = await running(fake, connect, flow(forbid))
    outcome = await reconcile(flow(forbid, generation=2), status, connect)
    assert len(fake.runs) == 1 and events(outcome) == [("Normal", "RunSkipped")]
    assert outcome.status.runs[0].generation == 2
    assert outcome.status.runs[0].reason == "ConcurrencyForbid"
    again = await reconcile(flow(forbid, generation=2), outcome.status, connect)
    assert len(fake.runs) == 1 and again.events == []


@pytest.mark.asyncio
async def test_allow_runs_beside_the_one_in_flight(fake, connect):
    status = await running(fake, connect, requested("1"))
    first = status.last_run.id
    outcome = await reconcile(requested("2"), status, connect)
    assert len(fake.runs) == 2
    assert fake.runs[first].view.state.type == "RUNNING"
    assert "active_runs" not in fake.calls and "cancel_flow_run" not in fake.calls
    assert events(outcome) == [("Normal", "FlowRunCreated")]
    assert [r.index for r in outcome.status.runs] == [2, 1]


@pytest.mark.asyncio
async def test_replace_under_on_request_cancels_the_run_in_flight(fake, connect):
    replace = {"concurrencyPolicy": "Replace"}
    status = await running(fake, connect, requested("1", replace))
    first = status.last_run.id
    outcome = await reconcile(requested("2", replace), status, connect)
    assert fake.runs[first].view.state.type == "CANCELLING"
    assert outcome.status.runs[1].reason == "Replaced"
    assert outcome.status.last_run.index == 2


# ---- timeoutSeconds -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_run_past_its_deadline_is_cancelled_and_failed(fake, connect):
    body = flow({"policy": "OnChange", "timeoutSeconds": 60, "retries": 2})
    status = await running(fake, connect, body)
    run_id = status.last_run.id
    assert await follow(body, status, connect, now=60) is None  # not past it yet

    late = await follow(body, status, connect, now=61)
    assert fake.runs[run_id].view.state.type == "CANCELLING"
    assert fake.calls["cancel_flow_run"] == 1
    status = late.status
    assert status.phase == "Failed"
    assert kstatus(status) == {
        "Ready": ("False", "DeadlineExceeded"),
        "Reconciling": ("False", "DeadlineExceeded"),
        "Stalled": ("True", "DeadlineExceeded"),
    }
    assert events(late) == [("Warning", "DeadlineExceeded")]
    assert "deadline of 60 s" in late.events[0].message
    assert status.last_run.reason == status.runs[0].reason == "DeadlineExceeded"

    # while its worker stops it: recorded, not cancelled again, still DeadlineExceeded
    cancelling = await follow(body, status, connect, now=90)
    assert cancelling is not None and cancelling.events == []
    assert cancelling.status.last_run.state == "Cancelling"
    assert cond(cancelling.status) == ("False", "DeadlineExceeded")
    assert fake.calls["cancel_flow_run"] == 1
    assert await follow(body, cancelling.status, connect, now=95) is None

    # Prefect says Cancelled: still DeadlineExceeded (not FlowRunCancelled), and not retried
    fake.set_state(run_id, "CANCELLED")
    ended = await follow(body, cancelling.status, connect, now=120)
    assert ended.status.phase == "Failed"
    assert kstatus(ended.status)["Stalled"] == ("True", "DeadlineExceeded")
    assert ended.status.last_run.state == "Cancelled"
    assert len(fake.runs) == 1 and "create_flow_run" not in fake.calls
    assert await follow(body, ended.status, connect, now=200) is None


@pytest.mark.asyncio
async def test_the_deadline_of_a_run_not_started_counts_from_its_creation(fake, connect):
    body = flow({"policy": "OnChange", "timeoutSeconds": 10})
    status = (await reconcile(body, LumeFlowStatus(), connect)).status
    run_id = status.last_run.id
    late = await follow(body, status, connect, now=11)
    assert fake.runs[run_id].view.state.type == "CANCELLED"  # no worker took it: at once
    assert late.status.phase == "Failed"
    assert cond(late.status, "Stalled") == ("True", "DeadlineExceeded")


@pytest.mark.asyncio
async def test_no_deadline_without_timeout_seconds(fake, connect):
    status = await running(fake, connect, flow())
    assert await follow(flow(), status, connect, now=10**7) is None
    assert "cancel_flow_run" not in fake.calls


@pytest.mark.asyncio
async def test_a_delayed_retry_is_not_past_its_deadline_before_it_starts(fake, connect):
    body = flow(
        {"policy": "OnChange", "timeoutSeconds": 60, "retries": 1, "retryDelaySeconds": 300}
    )
    status = await running(fake, connect, body)
    fake.set_state(status.last_run.id, "FAILED")
    retried = await follow(body, status, connect, now=30)
    retry_id = retried.status.last_run.id
    # 120 s later the retry is still waiting for its delay (300 s): no deadline yet
    waiting = await follow(body, retried.status, connect, now=150)
    assert waiting is None or waiting.status.last_run.reason != "DeadlineExceeded"
    assert fake.runs[retry_id].view.state.type == "SCHEDULED"


# ---- retries ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_failed_and_crashed_runs_are_retried_then_fail(fake, connect):
    body = flow({"policy": "OnChange", "retries": 2, "retryDelaySeconds": 30})
    status = await running(fake, connect, body)
    first = status.last_run.id

    fake.set_state(first, "FAILED", "boom")
    one = await follow(body, status, connect)
    retry = fake.runs[one.status.last_run.id]
    # Keyed by the run it retries: deciding again after a restart finds the same retry.
    assert retry.view.idempotency_key == idempotency_key(UID, 0, 0, f"retry-of-{first}")
    assert retry.start_in == 30.0 and retry.view.tags == fake.runs[first].view.tags
    assert events(one) == [("Warning", "Retrying")]
    assert "retry 1 of 2 in 30 s" in one.events[0].message and "boom" in one.events[0].message
    assert kstatus(one.status) == {
        "Ready": ("False", "Retrying"),
        "Reconciling": ("True", "Retrying"),
        "Stalled": ("False", "Retrying"),
    }
    assert one.status.phase == "Running" and one.status.results is None
    assert [(r.attempt, r.state_type) for r in one.status.runs] == [
        (1, "SCHEDULED"),
        (0, "FAILED"),
    ]
    assert one.status.last_run.index == 0 and one.status.last_run.generation == 1

    fake.set_state(retry.view.id, "CRASHED", "pod evicted")
    two = await follow(body, one.status, connect)
    last_retry = fake.runs[two.status.last_run.id]
    assert last_retry.view.idempotency_key == idempotency_key(
        UID, 0, 0, f"retry-of-{retry.view.id}"
    )
    assert [r.attempt for r in two.status.runs] == [2, 1, 0]

    fake.set_state(last_retry.view.id, "FAILED", "boom again")
    done = await follow(body, two.status, connect)
    assert len(fake.runs) == 3
    assert done.status.phase == "Failed"
    assert kstatus(done.status)["Stalled"] == ("True", "FlowRunFailed")
    assert [(e.type, e.reason, e.message) for e in done.events] == [
        ("Warning", "FlowRunFailed", "boom again")
    ]
    assert await follow(body, done.status, connect) is None


@pytest.mark.asyncio
async def test_a_crashed_last_attempt_ends_flow_run_crashed(fake, connect):
    body = flow({"policy": "OnChange", "retries": 1})
    status = await running(fake, connect, body)
    fake.set_state(status.last_run.id, "CRASHED", "lost")
    one = await follow(body, status, connect)
    assert fake.runs[one.status.last_run.id].start_in is None  # no delay: start at once
    fake.set_state(one.status.last_run.id, "CRASHED", "lost again")
    done = await follow(body, one.status, connect)
    assert kstatus(done.status)["Stalled"] == ("True", "FlowRunCrashed")
    assert len(fake.runs) == 2


@pytest.mark.asyncio
async def test_a_cancelled_run_is_not_retried(fake, connect):
    body = flow({"policy": "OnChange", "retries": 3})
    status = await running(fake, connect, body)
    fake.set_state(status.last_run.id, "CANCELLED")
    done = await follow(body, status, connect)
    assert len(fake.runs) == 1 and "create_flow_run" not in fake.calls
    assert kstatus(done.status)["Stalled"] == ("True", "FlowRunCancelled")
    assert events(done) == [("Warning", "FlowRunCancelled")]


@pytest.mark.asyncio
async def test_follow_run_calls_retry_run_with_the_attempt_and_the_delay(fake, connect):
    body = flow({"policy": "OnChange", "retries": 1, "retryDelaySeconds": 45})
    status = await running(fake, connect, body)
    fake.set_state(status.last_run.id, "FAILED")
    calls: list[tuple[int, float]] = []

    async def retry_run(failed, attempt: int, delay: float):
        calls.append((attempt, delay))
        return await fake.create_flow_run(
            status.deployment_id, idempotency_key=f"retry-{attempt}", start_in=delay
        )

    model = LumeFlow.model_validate(body)
    outcome = await follow_run(model, status, fake, now=at(30), retry_run=retry_run)
    assert calls == [(1, 45.0)]
    assert outcome.status.last_run.attempt == 1

    # without retry_run (the local runner), no retries
    fake.set_state(outcome.status.last_run.id, "FAILED")
    status2 = await running(fake, connect, flow({"policy": "OnChange", "retries": 1}, uid="u2"))
    fake.set_state(status2.last_run.id, "FAILED")
    model2 = LumeFlow.model_validate(flow({"policy": "OnChange", "retries": 1}, uid="u2"))
    ended = await follow_run(model2, status2, fake, now=at(30))
    assert ended.status.phase == "Failed"


@pytest.mark.asyncio
async def test_each_scheduled_run_gets_its_own_retry(fake, connect):
    body = flow({"policy": "Schedule", "cron": "*/5 * * * *", "retries": 1})
    status = (await reconcile(body, LumeFlowStatus(), connect)).status
    first = await fake.create_flow_run(status.deployment_id, idempotency_key="cron-1")
    fake.set_state(first.id, "FAILED")
    status = (await follow(body, status, connect)).status  # retried: run-2
    fake.set_state(status.last_run.id, "FAILED")
    status = (await follow(body, status, connect)).status  # no retry left
    assert len(fake.runs) == 2

    # the next scheduled run fails before it is seen running: it gets its own retry
    second = await fake.create_flow_run(status.deployment_id, idempotency_key="cron-2")
    fake.set_state(second.id, "FAILED")
    retried = await follow(body, status, connect)
    assert len(fake.runs) == 4, "the retry of run-3 is run-2 again"
    assert retried.status.last_run.attempt == 1


@pytest.mark.asyncio
async def test_a_retry_survives_run_parameters_changed_since_the_run_started(fake, connect):
    retries = {"retries": 1}
    status = await running(fake, connect, requested("1", retries, parameters='{"sigma_x": 2}'))
    fake.set_state(status.last_run.id, "FAILED")
    outcome = await follow(requested("1", retries, parameters="not json"), status, connect)
    assert outcome is not None and len(fake.runs) == 2
    assert fake.runs[outcome.status.last_run.id].parameters["sigma_x"] == 2


# ---- history ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_history_is_trimmed_at_its_limit_newest_first(fake, connect):
    limit = {"historyLimit": 2}
    status = LumeFlowStatus()
    for request in ("1", "2", "3"):
        status = (await reconcile(requested(request, limit), status, connect)).status
    assert len(fake.runs) == 3
    assert [r.index for r in status.runs] == [3, 2]
    assert status.last_run.index == 3 and status.last_run.id == status.runs[0].id

    # followed: the limit holds, and each entry has what Prefect says now
    for entry in status.runs:
        fake.set_state(entry.id, "RUNNING")
    followed = await follow(requested("3", limit), status, connect)
    assert [(r.index, r.state) for r in followed.status.runs] == [(3, "Running"), (2, "Running")]


@pytest.mark.asyncio
async def test_last_run_is_the_newest_real_run_not_a_skipped_one(fake, connect):
    run = {"concurrencyPolicy": "Forbid", "historyLimit": 2}
    status = await running(fake, connect, requested("1", run))
    first = status.last_run.id
    status = (await reconcile(requested("2", run), status, connect)).status
    status = (await reconcile(requested("3", run), status, connect)).status
    assert [(r.index, r.state) for r in status.runs] == [(3, "Skipped"), (2, "Skipped")]
    assert status.last_run.id == first  # trimmed out of runs, still lastRun


@pytest.mark.asyncio
async def test_a_skipped_bad_request_keeps_the_history_limit(fake, connect):
    limit = {"historyLimit": 1}
    status = (await reconcile(requested("1", limit), LumeFlowStatus(), connect)).status
    bad = await reconcile(requested("2", limit, parameters="[1]"), status, connect)
    assert len(bad.status.runs) <= 1


@pytest.mark.asyncio
async def test_history_records_when_a_run_was_created(fake, connect):
    outcome = await reconcile(flow(), LumeFlowStatus(), connect)
    assert outcome.status.last_run.created_time == fake.now


# ---- OnRequest ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_on_request_runs_only_for_a_higher_value(fake, connect):
    status = (await reconcile(requested("5"), LumeFlowStatus(), connect)).status
    assert status.last_request == 5 and len(fake.runs) == 1
    for value in ("5", "4", "0"):
        outcome = await reconcile(requested(value), status, connect)
        assert len(fake.runs) == 1 and outcome.events == [], value
        assert outcome.status.last_request == 5
    higher = await reconcile(requested("6"), status, connect)
    assert len(fake.runs) == 2 and higher.status.last_request == 6


@pytest.mark.asyncio
async def test_on_request_spec_change_alone_starts_no_run(fake, connect):
    status = (await reconcile(requested("1"), LumeFlowStatus(), connect)).status
    changed = requested("1", generation=2, parameters=None)
    changed["spec"]["parameters"] = {"n_particles": 5}
    outcome = await reconcile(changed, status, connect)
    assert len(fake.runs) == 1 and outcome.events == []
    assert fake.deployment(*DEPLOYMENT).parameters == {"n_particles": 5}  # redeployed


@pytest.mark.asyncio
async def test_run_parameters_are_merged_over_the_spec_parameters(fake, connect):
    body = requested("1", parameters=json.dumps({"sigma_x": 0.5, "extra": [1, 2]}))
    outcome = await reconcile(body, LumeFlowStatus(), connect)
    run = fake.runs[outcome.status.last_run.id]
    assert run.parameters == {
        "n_particles": 200000,
        "sigma_x": 0.5,
        "sigma_px": 0.0001,
        "correlation": 0.5,
        "extra": [1, 2],
    }
    # the deployment keeps spec.parameters: the annotation is for that run only
    assert fake.deployment(*DEPLOYMENT).parameters["sigma_x"] == 0.001


@pytest.mark.asyncio
async def test_run_parameters_are_ignored_outside_on_request(fake, connect):
    body = flow(annotations={RUN_PARAMETERS: '{"sigma_x": 9}'})
    outcome = await reconcile(body, LumeFlowStatus(), connect)
    assert fake.runs[outcome.status.last_run.id].parameters == {}


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "must be a JSON object of parameters, not list"),
        ('"text"', "not str"),
        ("3", "not int"),
    ],
    ids=["not-json", "list", "string", "number"],
)
async def test_bad_run_parameters_stall_with_no_run(fake, connect, raw, words):
    body = requested("2", parameters=raw, generation=4)
    outcome = await reconcile(body, LumeFlowStatus(), connect)
    status = outcome.status
    assert not fake.runs and "create_flow_run" not in fake.calls
    assert kstatus(status) == {
        "Ready": ("False", "InvalidRunParameters"),
        "Reconciling": ("False", "InvalidRunParameters"),
        "Stalled": ("True", "InvalidRunParameters"),
    }
    message = status.conditions[0].message
    assert message.startswith(f"metadata.annotations.{RUN_PARAMETERS}: ") and words in message
    assert [(e.type, e.reason, e.message) for e in outcome.events][-1] == (
        "Warning",
        "InvalidRunParameters",
        message,
    )
    assert outcome.retry_in is None
    assert status.last_request == 2  # handled: not tried again
    assert (status.runs[0].index, status.runs[0].reason) == (2, "InvalidRunParameters")
    assert generations(status) == {4}

    await reconcile(body, status, connect)
    assert not fake.runs
    fixed = await reconcile(requested("3", parameters="{}", generation=4), status, connect)
    assert len(fake.runs) == 1 and fixed.status.last_run.index == 3


# ---- Prefect refusals and outages ---------------------------------------------------------


@pytest.mark.asyncio
async def test_reconcile_rejected_is_stalled_with_an_event_and_not_retried(fake, connect):
    fake.failure = PrefectRejected("422: bad entrypoint", 422)
    outcome = await reconcile(flow(), LumeFlowStatus(), connect, retry=3)
    assert kstatus(outcome.status) == {
        "Ready": ("False", "PrefectRejected"),
        "Reconciling": ("False", "PrefectRejected"),
        "Stalled": ("True", "PrefectRejected"),
    }
    assert [(e.type, e.reason, e.message) for e in outcome.events] == [
        ("Warning", "PrefectRejected", "422: bad entrypoint")
    ]
    assert outcome.retry_in is None and outcome.retry_message == ""
    assert fake.calls == {"ensure_deployment": 1}  # one call, no storm

    fake.failure = None  # the spec (or Secret) changed: reconciled again, and it works
    back = await reconcile(flow(generation=2), outcome.status, connect)
    assert back.status.phase == "Running"
    assert kstatus(back.status)["Stalled"] == ("False", "FlowRunning")


@pytest.mark.asyncio
async def test_reconcile_unreachable_is_retried_with_backoff(fake, connect):
    fake.failure = PrefectUnreachable("Prefect answered 503", 503)
    outcome = await reconcile(flow(), LumeFlowStatus(), connect, retry=3)
    assert kstatus(outcome.status)["Reconciling"] == ("True", "PrefectUnreachable")
    assert kstatus(outcome.status)["Stalled"] == ("False", "PrefectUnreachable")
    assert outcome.retry_in == 8.0 and outcome.events == []


@pytest.mark.asyncio
async def test_follow_rejected_is_stalled_once(fake, connect):
    status = await running(fake, connect, flow())
    fake.failure = PrefectRejected("401: invalid API key", 401)
    lost = await follow(flow(), status, connect)
    assert kstatus(lost.status)["Stalled"] == ("True", "PrefectRejected")
    assert events(lost) == [("Warning", "PrefectRejected")]
    assert lost.retry_in is None
    assert await follow(flow(), lost.status, connect) is None  # said once
    fake.failure = None
    back = await follow(flow(), lost.status, connect)
    assert kstatus(back.status)["Reconciling"] == ("True", "FlowRunning")


@pytest.mark.asyncio
async def test_credentials_in_an_error_never_reach_status_or_events(fake, connect):
    fake.failure = PrefectRejected("401 from http://admin:hunter2@prefect:4200/api", 401)
    outcome = await reconcile(flow(), LumeFlowStatus(), connect)
    written = json.dumps(outcome.status.model_dump(mode="json")) + repr(outcome.events)
    assert "hunter2" not in written and "***@prefect" in written


@pytest.mark.asyncio
async def test_credentials_in_a_deletion_error_are_masked(fake, connect):
    status = await running(fake, connect, flow())
    fake.failure = PrefectUnreachable("connect to http://admin:hunter2@prefect:4200/api failed")
    outcome = await delete(flow(), status, connect)
    assert "hunter2" not in outcome.status.conditions[0].message
    assert "hunter2" not in outcome.retry_message


# ---- observedGeneration -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_conditions_carry_the_observed_generation(fake, connect):
    first = await reconcile(flow(generation=3), LumeFlowStatus(), connect)
    assert first.status.observed_generation == 3 and generations(first.status) == {3}
    fake.set_state(first.status.last_run.id, "FAILED")
    failed = await follow(flow(generation=3), first.status, connect)
    assert generations(failed.status) == {3}
    second = await reconcile(flow(generation=4), failed.status, connect)
    assert second.status.observed_generation == 4 and generations(second.status) == {4}


# ---- delete_flow --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_delete_cancels_runs_in_flight_before_the_deployment(fake, connect):
    status = await running(fake, connect, requested("1"))
    run_id = status.last_run.id
    body = requested("1")
    first = await delete(body, status, connect)
    assert fake.runs[run_id].view.state.type == "CANCELLING"
    assert fake.deployment(*DEPLOYMENT) is not None  # not until the run has stopped
    assert first.retry_in == 2.0
    assert kstatus(first.status)["Reconciling"] == ("True", "CancellingRuns")
    assert "run-1" in first.status.conditions[0].message
    assert first.retry_message == first.status.conditions[0].message

    # within the grace: asked again (no force), still waiting
    waiting = await delete(body, first.status, connect, waited=30)
    assert waiting.retry_in == 2.0 and fake.deployment(*DEPLOYMENT) is not None
    assert fake.runs[run_id].view.state.type == "CANCELLING"

    fake.set_state(run_id, "CANCELLED")  # its worker stopped it
    done = await delete(body, waiting.status, connect, waited=32)
    assert done.retry_in is None and fake.deployment(*DEPLOYMENT) is None


@pytest.mark.asyncio
async def test_delete_forces_runs_after_the_cancel_grace(fake, connect):
    settings = make_settings(cancel_grace=5)
    status = await running(fake, connect, requested("1"))
    second = (await reconcile(requested("2"), status, connect)).status  # Allow: two in flight
    fake.set_state(second.last_run.id, "RUNNING")
    outcome = await delete(requested("2"), second, connect, settings, waited=5)
    assert {r.view.state.type for r in fake.runs.values()} == {"CANCELLED"}
    assert fake.calls["cancel_flow_run"] == 2
    assert outcome.retry_in is None and fake.deployment(*DEPLOYMENT) is None


@pytest.mark.asyncio
async def test_delete_with_only_final_runs_deletes_at_once(fake, connect):
    status = await running(fake, connect, flow())
    fake.set_state(status.last_run.id, "COMPLETED")
    outcome = await delete(flow(), status, connect)
    assert "cancel_flow_run" not in fake.calls
    assert outcome.retry_in is None and fake.deployment(*DEPLOYMENT) is None


@pytest.mark.asyncio
async def test_delete_orphan_leaves_the_deployment_and_its_runs(fake, connect):
    body = flow(deletionPolicy="Orphan")
    status = await running(fake, connect, body)
    connect.backends.clear()
    outcome = await delete(body, status, connect)
    assert not fake.calls and connect.backends == []
    assert fake.deployment(*DEPLOYMENT) is not None
    assert fake.runs[status.last_run.id].view.state.type == "RUNNING"
    assert events(outcome) == [("Normal", "Orphaned")]
    assert outcome.retry_in is None


@pytest.mark.asyncio
async def test_a_scheduled_run_that_ended_unseen_is_decided(fake, connect):
    body = flow({"policy": "Schedule", "cron": "*/5 * * * *"})
    status = (await reconcile(body, LumeFlowStatus(), connect)).status
    first = await fake.create_flow_run(status.deployment_id, idempotency_key="cron-1")
    fake.set_state(first.id, "CRASHED")
    status = (await follow(body, status, connect)).status  # the first one works
    assert kstatus(status)["Stalled"] == ("True", "FlowRunCrashed")
    second = await fake.create_flow_run(status.deployment_id, idempotency_key="cron-2")
    fake.set_state(second.id, "FAILED")
    outcome = await follow(body, status, connect)
    assert outcome is not None and outcome.status.last_run.id == second.id
    assert kstatus(outcome.status)["Stalled"] == ("True", "FlowRunFailed")


@pytest.mark.asyncio
async def test_a_scheduled_run_is_recorded_at_its_end(fake, connect, tmp_path):
    """What works of a Schedule today: a run first seen ended is decided (the first one)."""
    body = flow({"policy": "Schedule", "cron": "*/5 * * * *"}, results=None)
    status = (await reconcile(body, LumeFlowStatus(), connect)).status
    run = await fake.create_flow_run(status.deployment_id, idempotency_key="cron-1")
    fake.set_result(run.id, {"n": 1})
    fake.set_state(run.id, "COMPLETED")
    done = await follow(body, status, connect)
    assert done.status.phase == "Completed" and done.status.last_run.id == run.id
    assert events(done) == [("Normal", "FlowRunCompleted")]


@pytest.mark.asyncio
async def test_a_decided_scheduled_run_is_not_decided_again(fake, connect):
    body = flow({"policy": "Schedule", "cron": "*/5 * * * *"}, results=None)
    status = (await reconcile(body, LumeFlowStatus(), connect)).status
    run = await fake.create_flow_run(status.deployment_id, idempotency_key="cron-1")
    fake.set_result(run.id, {"n": 1})
    fake.set_state(run.id, "COMPLETED")
    done = await follow(body, status, connect)
    fake.calls.clear()
    assert await follow(body, done.status, connect) is None
    assert "result_of" not in fake.calls
