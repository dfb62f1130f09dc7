"""LumeFlow decisions: wanted_run, first_status, reconcile_flow, follow_flow, delete_flow."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from lume_operator.api.flow import FlowRunStatus, LumeFlow, LumeFlowStatus, ResultStatus
from lume_operator.prefect.fake import FakePrefect
from lume_operator.prefect.port import (
    FlowRunView,
    PrefectNotConfigured,
    PrefectRejected,
    PrefectUnreachable,
    idempotency_key,
)
from lume_operator.reconcile.deploy import RESULT_ENV
from lume_operator.reconcile.lumeflow import (
    RUN_REQUEST,
    delete_flow,
    first_status,
    follow_flow,
    reconcile_flow,
    wanted_run,
)
from lume_operator.reconcile.outcome import Found
from tests.unit.conftest import (
    Connector,
    backend_manifest,
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


def text_file(path: Path, text: str = "report") -> dict[str, str]:
    """A real file and its File description, as a flow returns it."""
    path.write_text(text)
    return {"filename": str(path), "filesystem_identifier": "local", "file_type_string": "TextFile"}


def on_request(request: str | None = None, **kwargs: Any) -> dict[str, Any]:
    annotations = {RUN_REQUEST: request} if request is not None else None
    return lumeflow_manifest(run={"policy": "OnRequest"}, annotations=annotations, **kwargs)


# FakePrefect creates (and starts) runs at 2026-01-01T00:00:00Z: 30 s later by default.
NOW = datetime(2026, 1, 1, 0, 0, 30, tzinfo=UTC)

SCHEDULE = {"policy": "Schedule", "cron": "*/5 * * * *", "timezone": "Europe/Paris"}


async def reconcile(body, status, connect, settings, *, backend="ready", retry=0, publish=None):
    return await reconcile_flow(
        body,
        status,
        backend=ready_backend() if backend == "ready" else backend,
        connect=connect,
        settings=settings,
        retry=retry,
        publish=publish,
    )


async def follow(body, status, connect, *, backend="ready", now=NOW):
    return await follow_flow(
        body,
        status,
        backend=ready_backend() if backend == "ready" else backend,
        connect=connect,
        now=now,
    )


# ---- wanted_run ---------------------------------------------------------------------------


def flow_model(body: dict[str, Any]) -> LumeFlow:
    return LumeFlow.model_validate(body)


def last(generation: int | None, index: int) -> LumeFlowStatus:
    return LumeFlowStatus(last_run=FlowRunStatus(id="r", generation=generation, index=index))


@pytest.mark.parametrize(
    ("generation", "status", "expected"),
    [
        (1, LumeFlowStatus(), 0),  # first generation
        (1, last(1, 0), None),  # this generation's run exists
        (2, last(1, 0), 0),  # new generation
        (1, last(1, 3), 0),  # a run of another index (policy changed from OnRequest)
    ],
)
def test_wanted_run_on_change(generation, status, expected):
    body = lumeflow_manifest(generation=generation)
    assert wanted_run(flow_model(body), status) == expected


def test_wanted_run_is_on_change_without_a_run_policy():
    body = lumeflow_manifest()
    del body["spec"]["run"]
    assert wanted_run(flow_model(body), LumeFlowStatus()) == 0


@pytest.mark.parametrize(
    ("request_", "generation", "status", "expected"),
    [
        (None, 1, LumeFlowStatus(), None),  # no annotation
        ("3", 1, LumeFlowStatus(), 3),
        ("3", 1, last(1, 3), None),  # same value, same generation
        ("4", 1, last(1, 3), 4),  # a new request
        ("0", 1, LumeFlowStatus(), 0),
        # issue 12: a spec change alone starts no run; it used to run the same value again
        ("3", 2, last(1, 3), None),
        ("3", 2, LumeFlowStatus(last_request=2), 3),  # higher than the last handled
        ("2", 1, LumeFlowStatus(last_request=3), None),  # a lower value: none
        ("3", 1, LumeFlowStatus(last_request=3), None),  # the same value: none
        ("0", 1, LumeFlowStatus(last_request=0), None),
        ("x", 1, LumeFlowStatus(), None),
        ("²", 1, LumeFlowStatus(), None),
        ("-1", 1, LumeFlowStatus(), None),
    ],
)
def test_wanted_run_on_request(request_, generation, status, expected):
    body = on_request(request_, generation=generation)
    assert wanted_run(flow_model(body), status) == expected


def test_wanted_run_schedule_is_never():
    body = lumeflow_manifest(run=SCHEDULE)
    assert wanted_run(flow_model(body), LumeFlowStatus()) is None


# ---- reconcile_flow -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_first_status_is_published_before_any_prefect_call(fake, connect, settings):
    published: list[tuple[LumeFlowStatus, dict[str, int], int]] = []

    async def publish(status: LumeFlowStatus) -> None:
        published.append((status, dict(fake.calls), len(connect.backends)))

    outcome = await reconcile(
        lumeflow_manifest(), LumeFlowStatus(), connect, settings, publish=publish
    )
    assert len(published) == 1
    first, calls_then, connections_then = published[0]
    assert calls_then == {} and connections_then == 0
    assert first.phase == "Deploying"
    assert kstatus(first) == {
        "Ready": ("False", "Deploying"),
        "Reconciling": ("True", "Deploying"),
        "Stalled": ("False", "Deploying"),
    }
    assert first.conditions[0].message == "creating the Prefect deployment"
    assert first.observed_generation == 1
    assert first is not outcome.status and outcome.status.phase == "Running"

    # only the first time: a status with a phase is not published again
    await reconcile(lumeflow_manifest(), outcome.status, connect, settings, publish=publish)
    assert len(published) == 1


def test_first_status_is_deploying_for_a_new_valid_object_only():
    """What the watch-event handler writes beside kopf's finalizer: the same `Deploying` the
    create handler would publish, and nothing for an object it must leave to the handler."""
    body = lumeflow_manifest()
    body["metadata"]["generation"] = 3
    first = first_status(body, LumeFlowStatus())
    assert first is not None and first.phase == "Deploying"
    assert first.observed_generation == 3
    assert kstatus(first) == {
        "Ready": ("False", "Deploying"),
        "Reconciling": ("True", "Deploying"),
        "Stalled": ("False", "Deploying"),
    }
    assert first_status(body, LumeFlowStatus(phase="Ready")) is None
    assert first_status(body, LumeFlowStatus(phase="Failed")) is None
    deleting = lumeflow_manifest()
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert first_status(deleting, LumeFlowStatus()) is None
    # an invalid spec gets its Failed status and its event from the handler, not a Deploying
    assert first_status(lumeflow_manifest(entrypoint="no-function-here"), LumeFlowStatus()) is None
    bad_request = on_request("three")
    assert first_status(bad_request, LumeFlowStatus()) is None


SET_CWD = "prefect.deployments.steps.set_working_directory"


@pytest.mark.parametrize(
    ("backend_type", "run_config", "variable", "pull_steps"),
    [
        # a process starts in the code's directory: no pull step, which would cost each run
        # an API client, an event and a server version check in its engine
        ("process", {}, "/srv/beam", []),
        # the run config names another directory for the process: the code is reached by a
        # pull step, as before
        (
            "process",
            {"workingDir": "/scratch"},
            "/scratch",
            [{SET_CWD: {"directory": "/srv/beam"}}],
        ),
        # a container's directory is the pull step's to set
        ("docker", {}, None, [{SET_CWD: {"directory": "/srv/beam"}}]),
    ],
)
def test_an_absolute_source_path_is_where_the_run_starts(
    backend_type, run_config, variable, pull_steps
):
    from lume_operator.api.backend import SchedulingBackend
    from lume_operator.reconcile.deploy import flow_deployment

    flow = flow_model(lumeflow_manifest(runConfig=run_config))
    backend = SchedulingBackend.model_validate(backend_manifest(type=backend_type))
    spec = flow_deployment(flow, backend, working_dir="/srv/beam").spec
    assert spec.job_variables.get("working_dir") == variable
    assert spec.pull_steps == pull_steps


@pytest.mark.asyncio
async def test_deploys_and_starts_a_run(fake, connect, settings):
    outcome = await reconcile(lumeflow_manifest(), LumeFlowStatus(), connect, settings)

    spec = fake.deployment(*DEPLOYMENT)
    assert spec is not None
    assert spec.entrypoint == "flows/beam.py:beam_stats"
    assert spec.work_pool_name == "default-local"
    assert spec.work_queue_name == "cpu"  # the first label
    assert spec.tags == ["cpu", "lume.dev/flow=beam-stats", "lume.dev/backend=local"]
    assert spec.parameters == {
        "n_particles": 200000,
        "sigma_x": 0.001,
        "sigma_px": 0.0001,
        "correlation": 0.5,
    }
    assert spec.job_variables["env"] == {**RESULT_ENV, "OMP_NUM_THREADS": "1"}
    assert spec.job_variables["working_dir"] == "."  # relative source.path, process backend
    assert spec.pull_steps == [] and spec.schedules is None
    assert spec.description == "LumeFlow default/beam-stats, managed by lume-operator."

    # issue 12: OnChange defaults to concurrencyPolicy Replace, which asks for runs in flight
    assert fake.calls == {"ensure_deployment": 1, "active_runs": 1, "create_flow_run": 1}
    (run,) = fake.runs.values()
    deployment_id = outcome.status.deployment_id
    assert run.deployment_id == deployment_id
    assert run.view.tags == spec.tags
    key = idempotency_key(UID, 1, 0)
    again = await fake.create_flow_run(deployment_id, idempotency_key=key)
    assert again.id == run.view.id and len(fake.runs) == 1  # created with exactly that key

    status = outcome.status
    assert status.phase == "Running"
    assert status.observed_generation == 1
    assert status.work_pool_name == "default-local"
    assert status.results is None
    assert status.last_run == FlowRunStatus(
        id=run.view.id,
        name="run-1",
        index=0,
        generation=1,
        state="Scheduled",
        state_type="SCHEDULED",
        url=f"http://prefect.test/runs/flow-run/{run.view.id}",
        created_time=fake.now,
        attempt=0,
    )
    assert status.runs == [status.last_run]  # the history, newest first
    assert kstatus(status) == {
        "Ready": ("False", "FlowRunning"),
        "Reconciling": ("True", "FlowRunning"),
        "Stalled": ("False", "FlowRunning"),
    }
    assert status.conditions[0].message == "flow run run-1"
    # The first reconcile also says the deployment was made, and what did not apply here.
    assert events(outcome) == [
        ("Normal", "Deployed"),
        ("Normal", "Note"),
        ("Normal", "FlowRunCreated"),
    ]
    assert outcome.events[1].message == "run-config fields that do not apply here: memoryLimit"
    assert outcome.events[-1].message == f"flow run run-1 ({run.view.id})"
    assert outcome.retry_in is None


@pytest.mark.asyncio
async def test_same_generation_makes_no_second_run(fake, connect, settings):
    first = await reconcile(lumeflow_manifest(), LumeFlowStatus(), connect, settings)
    run_id = first.status.last_run.id
    writes = fake.writes
    second = await reconcile(lumeflow_manifest(), first.status, connect, settings)
    assert second.status.last_run.id == run_id
    assert second.status.phase == "Running"
    assert len(fake.runs) == 1 and fake.calls["create_flow_run"] == 1
    assert fake.writes == writes  # the deployment did not change either
    assert second.events == []
    assert cond(second.status) == ("False", "FlowRunning")
    assert second.status.conditions[0].message == "a flow run is in progress"


@pytest.mark.asyncio
async def test_a_lost_status_gets_the_same_run_back(fake, connect, settings):
    first = await reconcile(lumeflow_manifest(), LumeFlowStatus(), connect, settings)
    again = await reconcile(lumeflow_manifest(), LumeFlowStatus(), connect, settings)
    assert again.status.last_run.id == first.status.last_run.id
    assert len(fake.runs) == 1


@pytest.mark.asyncio
async def test_new_generation_starts_a_new_run(fake, connect, settings):
    first = await reconcile(lumeflow_manifest(), LumeFlowStatus(), connect, settings)
    first_run = first.status.last_run.id
    fake.set_state(first_run, "COMPLETED")
    first.status.phase = "Completed"
    body = lumeflow_manifest(generation=2, parameters={"n_particles": 10})
    second = await reconcile(body, first.status, connect, settings)
    assert len(fake.runs) == 2
    assert second.status.last_run.id != first_run
    assert second.status.last_run.generation == 2 and second.status.last_run.index == 0
    assert second.status.observed_generation == 2
    assert second.status.phase == "Running"
    assert fake.deployment(*DEPLOYMENT).parameters == {"n_particles": 10}
    run = fake.runs[second.status.last_run.id]
    key = idempotency_key(UID, 2, 0)
    assert (await fake.create_flow_run(run.deployment_id, idempotency_key=key)).id == run.view.id
    assert events(second) == [("Normal", "FlowRunCreated")]


@pytest.mark.asyncio
async def test_on_change_first_reconcile_posts_deployed_once(fake, connect, settings):
    """`Deployed` (and the deployment's notes) once, when the deployment is first made, also
    when the same reconcile starts a run; later ones see the deployment id already set."""
    first = await reconcile(lumeflow_manifest(), LumeFlowStatus(), connect, settings)
    second = await reconcile(lumeflow_manifest(), first.status, connect, settings)
    assert [reason for _, reason in events(first)] == ["Deployed", "Note", "FlowRunCreated"]
    assert second.events == []


@pytest.mark.asyncio
async def test_on_request_without_a_request_is_ready(fake, connect, settings):
    outcome = await reconcile(on_request(), LumeFlowStatus(), connect, settings)
    status = outcome.status
    assert status.phase == "Ready"
    assert kstatus(status) == {
        "Ready": ("True", "Deployed"),
        "Reconciling": ("False", "Deployed"),
        "Stalled": ("False", "Deployed"),
    }
    assert status.conditions[0].message == f"deployment {status.deployment_id}"
    assert events(outcome) == [("Normal", "Deployed"), ("Normal", "Note")]
    assert outcome.events[0].message == f"Prefect deployment {status.deployment_id}"
    assert status.last_run is None and not fake.runs
    assert fake.calls == {"ensure_deployment": 1}

    again = await reconcile(on_request(), status, connect, settings)
    assert again.events == [] and again.status.phase == "Ready"


@pytest.mark.asyncio
async def test_a_published_deploying_status_moves_on_without_publishing_again(
    fake, connect, settings
):
    published = []

    async def publish(status):
        published.append(status)

    outcome = await reconcile(
        on_request(), LumeFlowStatus(phase="Deploying"), connect, settings, publish=publish
    )
    assert published == []
    assert outcome.status.phase == "Ready"
    assert cond(outcome.status) == ("True", "Deployed")
    assert events(outcome) == [("Normal", "Deployed"), ("Normal", "Note")]


@pytest.mark.asyncio
async def test_on_request_runs_each_new_value(fake, connect, settings):
    ready = await reconcile(on_request(), LumeFlowStatus(), connect, settings)
    third = await reconcile(on_request("3"), ready.status, connect, settings)
    assert third.status.last_run.index == 3 and third.status.phase == "Running"
    run = fake.runs[third.status.last_run.id]
    key = idempotency_key(UID, 1, 3)
    assert (await fake.create_flow_run(run.deployment_id, idempotency_key=key)).id == run.view.id
    assert events(third) == [("Normal", "FlowRunCreated")]

    same = await reconcile(on_request("3"), third.status, connect, settings)
    assert same.events == [] and len(fake.runs) == 1

    fourth = await reconcile(on_request("4"), same.status, connect, settings)
    assert fourth.status.last_run.index == 4 and len(fake.runs) == 2


@pytest.mark.asyncio
@pytest.mark.parametrize("request_", ["soon", "²", "1.5", ""])
async def test_on_request_annotation_not_a_whole_number_is_invalid(
    fake, connect, settings, request_
):
    body = on_request(request_, generation=3)
    outcome = await reconcile(body, LumeFlowStatus(), connect, settings)
    status = outcome.status
    assert status.phase == "Failed"
    assert status.observed_generation == 3
    assert kstatus(status) == {
        "Ready": ("False", "InvalidSpec"),
        "Reconciling": ("False", "InvalidSpec"),
        "Stalled": ("True", "InvalidSpec"),
    }
    assert status.conditions[0].message == (
        f"metadata.annotations.{RUN_REQUEST}: {request_!r} is not a whole number"
    )
    assert events(outcome) == [("Warning", "InvalidSpec")]
    assert outcome.retry_in is None
    assert not fake.calls and connect.backends == []


@pytest.mark.asyncio
async def test_invalid_spec_is_failed_and_stalled(fake, connect, settings):
    published = []

    async def publish(status):
        published.append(status)

    body = lumeflow_manifest(entrypoint="no-function-here")
    outcome = await reconcile(body, LumeFlowStatus(), connect, settings, publish=publish)
    assert outcome.status.phase == "Failed"
    assert cond(outcome.status, "Stalled") == ("True", "InvalidSpec")
    assert "spec.entrypoint" in outcome.status.conditions[0].message
    assert not fake.calls and published == []


@pytest.mark.asyncio
async def test_fixed_on_request_annotation_without_a_run_is_ready(fake, connect, settings):
    bad = await reconcile(on_request("soon"), LumeFlowStatus(), connect, settings)
    assert bad.status.phase == "Failed"
    fixed = await reconcile(on_request(), bad.status, connect, settings)
    assert fixed.status.phase == "Ready"
    assert cond(fixed.status) == ("True", "Deployed")


@pytest.mark.asyncio
async def test_schedule_policy_deploys_a_schedule_and_no_run(fake, connect, settings):
    outcome = await reconcile(lumeflow_manifest(run=SCHEDULE), LumeFlowStatus(), connect, settings)
    assert fake.deployment(*DEPLOYMENT).schedules == [
        {"cron": "*/5 * * * *", "timezone": "Europe/Paris"}
    ]
    assert not fake.runs
    assert outcome.status.phase == "Ready"
    assert cond(outcome.status) == ("True", "Deployed")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("phase", "message", "expected", "stalled"),
    [
        ("Completed", None, ("True", "Deployed"), "False"),
        # issue 12: a failed run is Stalled until the next run starts (it was all False)
        ("Failed", "boom", ("False", "FlowRunFailed"), "True"),
    ],
)
async def test_same_generation_after_the_run_ended(
    fake, connect, settings, phase, message, expected, stalled
):
    first = await reconcile(lumeflow_manifest(), LumeFlowStatus(), connect, settings)
    first.status.phase = phase
    first.status.last_run.message = message
    outcome = await reconcile(lumeflow_manifest(), first.status, connect, settings)
    assert outcome.status.phase == phase
    assert kstatus(outcome.status)["Ready"] == expected
    assert kstatus(outcome.status)["Reconciling"][0] == "False"
    assert kstatus(outcome.status)["Stalled"][0] == stalled
    if message:
        assert outcome.status.conditions[0].message == message
    assert len(fake.runs) == 1 and outcome.events == []


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("backend", "reason", "message"),
    [
        (None, "BackendNotFound", "SchedulingBackend default/local not found; waiting for it"),
        (
            Found(backend_manifest(type="mainframe"), {}),
            "BackendInvalid",
            "SchedulingBackend default/local is invalid",
        ),
        (
            Found(backend_manifest(), {}),
            "BackendNotReady",
            "SchedulingBackend default/local: work pool not ready yet",
        ),
        (
            Found(
                backend_manifest(),
                {"conditions": [{"type": "WorkPoolReady", "status": "False", "reason": "X"}]},
            ),
            "BackendNotReady",
            "SchedulingBackend default/local: work pool not ready yet",
        ),
    ],
    ids=["missing", "invalid", "no-conditions", "pool-not-ready"],
)
async def test_waits_for_its_backend(fake, connect, settings, backend, reason, message):
    outcome = await reconcile(
        lumeflow_manifest(), LumeFlowStatus(), connect, settings, backend=backend, retry=2
    )
    assert kstatus(outcome.status) == {
        "Ready": ("False", reason),
        "Reconciling": ("True", reason),
        "Stalled": ("False", reason),
    }
    assert outcome.status.conditions[0].message == message
    assert outcome.retry_in == 4.0 and outcome.retry_message == message
    assert outcome.status.phase == "Pending"
    assert outcome.events == []
    assert not fake.calls and connect.backends == []


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("error", "reason", "message"),
    [
        (
            PrefectUnreachable("timed out"),
            "PrefectUnreachable",
            "Prefect API unreachable: timed out",
        ),
        (
            PrefectUnreachable("Prefect answered 503"),
            "PrefectUnreachable",
            "Prefect answered 503",
        ),
    ],
)
async def test_prefect_failures(fake, connect, settings, error, reason, message):
    fake.failure = error
    outcome = await reconcile(lumeflow_manifest(), LumeFlowStatus(), connect, settings, retry=1)
    assert kstatus(outcome.status) == {
        "Ready": ("False", reason),
        "Reconciling": ("True", reason),
        "Stalled": ("False", reason),
    }
    assert outcome.retry_in == 2.0 and outcome.retry_message == message
    assert outcome.status.deployment_id is None and outcome.status.phase == "Pending"

    fake.failure = None
    back = await reconcile(lumeflow_manifest(), outcome.status, connect, settings)
    assert back.status.phase == "Running"
    assert cond(back.status) == ("False", "FlowRunning")


@pytest.mark.asyncio
@pytest.mark.parametrize("reason", ["NoPrefectAPI", "SecretNotFound"])
async def test_prefect_not_configured(fake, connect, settings, reason):
    connect.error = PrefectNotConfigured(reason, "nope")
    outcome = await reconcile(lumeflow_manifest(), LumeFlowStatus(), connect, settings, retry=0)
    assert cond(outcome.status) == ("False", reason)
    assert outcome.retry_in == 1.0
    assert not fake.calls


# ---- follow_flow --------------------------------------------------------------------------


async def started(fake, connect, settings, body=None) -> LumeFlowStatus:
    outcome = await reconcile(body or lumeflow_manifest(), LumeFlowStatus(), connect, settings)
    fake.calls.clear()
    return outcome.status


@pytest.mark.asyncio
async def test_follow_unchanged_state_is_none(fake, connect, settings):
    status = await started(fake, connect, settings)
    assert await follow(lumeflow_manifest(), status, connect) is None
    assert fake.calls == {"read_flow_runs": 1}  # issue 12: one request for every run read


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("state", "name"), [("PENDING", "Pending"), ("RUNNING", "Running"), ("PAUSED", "Paused")]
)
async def test_follow_run_in_progress(fake, connect, settings, state, name):
    status = await started(fake, connect, settings)
    fake.set_state(status.last_run.id, state)
    outcome = await follow(lumeflow_manifest(), status, connect)
    assert outcome is not None
    assert outcome.status.phase == "Running"
    assert outcome.status.last_run.state == name
    assert outcome.status.last_run.state_type == state
    assert outcome.status.last_run.index == 0 and outcome.status.last_run.generation == 1
    assert kstatus(outcome.status)["Ready"] == ("False", "FlowRunning")
    assert outcome.status.conditions[0].message == f"flow run run-1 is {name}"
    assert outcome.events == [] and outcome.retry_in is None
    if state == "RUNNING":
        assert outcome.status.last_run.start_time == "2026-01-01T00:00:00+00:00"
    assert await follow(lumeflow_manifest(), outcome.status, connect) is None


@pytest.mark.asyncio
async def test_follow_completed_with_declared_results(fake, connect, settings, tmp_path):
    body = lumeflow_manifest(
        results=[{"name": "report", "type": "TextFile"}, {"name": "emittance"}]
    )
    status = await started(fake, connect, settings, body)
    run_id = status.last_run.id
    report = text_file(tmp_path / "report.txt")
    fake.set_result(run_id, {"report": report, "emittance": 1.5e-6}, key="/results/abc")
    fake.set_state(run_id, "COMPLETED")
    outcome = await follow(body, status, connect)
    assert outcome is not None
    status = outcome.status
    assert status.phase == "Completed"
    assert status.results == [
        ResultStatus(
            name="report", type="TextFile", filesystem="local", location=report["filename"]
        ),
        ResultStatus(name="emittance", type="value", location="/results/abc#emittance"),
    ]
    assert status.last_run.state == "Completed" and status.last_run.message is None
    assert status.last_run.end_time == "2026-01-01T00:01:00+00:00"
    assert kstatus(status) == {
        "Ready": ("True", "FlowRunCompleted"),
        "Reconciling": ("False", "FlowRunCompleted"),
        "Stalled": ("False", "FlowRunCompleted"),
    }
    assert events(outcome) == [("Normal", "FlowRunCompleted")]
    assert outcome.events[0].message == "flow run run-1 completed"
    assert fake.calls == {"read_flow_runs": 1, "result_of": 1}
    # the history keeps the run's result locations (issue 12)
    assert status.runs[0].id == run_id and status.runs[0].results == status.results

    # done: not read again
    assert await follow(body, status, connect) is None
    assert fake.calls == {"read_flow_runs": 1, "result_of": 1}


@pytest.mark.asyncio
async def test_follow_completed_records_every_file_when_none_declared(
    fake, connect, settings, tmp_path
):
    body = lumeflow_manifest(results=None)
    status = await started(fake, connect, settings, body)
    run_id = status.last_run.id
    a, b = text_file(tmp_path / "a.txt"), text_file(tmp_path / "b.txt")
    fake.set_result(run_id, {"a": a, "more": [b], "n": 3})
    fake.set_state(run_id, "COMPLETED")
    outcome = await follow(body, status, connect)
    assert outcome.status.phase == "Completed"
    assert [(r.name, r.type, r.location) for r in outcome.status.results] == [
        ("a", "TextFile", a["filename"]),
        ("more.0", "TextFile", b["filename"]),
    ]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "missing-file",
            "result 'report': file '{missing}' (filesystem 'local') does not exist",
        ),
        ({"other": 1}, "result 'report' is not in the flow's return value: "),
        ({"report": 42}, "result 'report' is a plain value, not the declared TextFile"),
        (None, "cannot read the result of flow run {run}: none stored"),
    ],
    ids=["file-missing", "key-missing", "plain-value", "no-result"],
)
async def test_follow_completed_with_invalid_results(
    fake, connect, settings, tmp_path, value, message
):
    body = lumeflow_manifest(results=[{"name": "report", "type": "TextFile"}])
    status = await started(fake, connect, settings, body)
    run_id = status.last_run.id
    missing = str(tmp_path / "never-written.txt")
    if value == "missing-file":
        value = {
            "report": {
                "filename": missing,
                "filesystem_identifier": "local",
                "file_type_string": "TextFile",
            }
        }
    if value is not None:
        fake.set_result(run_id, value)
    fake.set_state(run_id, "COMPLETED")
    outcome = await follow(body, status, connect)
    expected = message.format(missing=missing, run=run_id)
    assert outcome.status.phase == "Failed"
    assert outcome.status.results is None
    # issue 12: Stalled (kstatus Failed) rather than all False
    assert kstatus(outcome.status) == {
        "Ready": ("False", "ResultsInvalid"),
        "Reconciling": ("False", "ResultsInvalid"),
        "Stalled": ("True", "ResultsInvalid"),
    }
    # (a message ending in ": " is a prefix: the key-path walker words the rest)
    assert outcome.status.conditions[0].message.startswith(expected)
    assert expected.endswith(": ") or outcome.status.conditions[0].message == expected
    assert [(e.type, e.reason) for e in outcome.events] == [("Warning", "ResultsInvalid")]
    assert outcome.events[0].message == outcome.status.conditions[0].message
    assert await follow(body, outcome.status, connect) is None


@pytest.mark.asyncio
async def test_follow_completed_with_a_file_of_another_type(fake, connect, settings, tmp_path):
    body = lumeflow_manifest(results=[{"name": "beam", "type": "HDF5File"}])
    status = await started(fake, connect, settings, body)
    fake.set_result(status.last_run.id, {"beam": text_file(tmp_path / "b.txt")})
    fake.set_state(status.last_run.id, "COMPLETED")
    outcome = await follow(body, status, connect)
    assert cond(outcome.status) == ("False", "ResultsInvalid")
    assert outcome.status.conditions[0].message == (
        "result 'beam' is a TextFile, not the declared HDF5File"
    )


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("state", "message", "expected", "reason"),
    [
        (
            "FAILED",
            "ValueError: sigma must be positive",
            "ValueError: sigma must be positive",
            "FlowRunFailed",
        ),
        ("CRASHED", "worker lost", "worker lost", "FlowRunCrashed"),
        ("CANCELLED", None, "flow run ended Cancelled", "FlowRunCancelled"),
    ],
)
async def test_follow_run_that_failed(fake, connect, settings, state, message, expected, reason):
    status = await started(fake, connect, settings)
    fake.set_state(status.last_run.id, state, message)
    outcome = await follow(lumeflow_manifest(), status, connect)
    assert outcome.status.phase == "Failed"
    assert outcome.status.last_run.state_type == state
    # lastRun says how it ended: Prefect's message, or the outcome's when Prefect gave none.
    assert outcome.status.last_run.message == expected
    # issue 12: Stalled with the precise reason (was FlowRunFailed, all False, for each)
    assert kstatus(outcome.status) == {
        "Ready": ("False", reason),
        "Reconciling": ("False", reason),
        "Stalled": ("True", reason),
    }
    assert outcome.status.conditions[0].message == expected
    assert [(e.type, e.reason, e.message) for e in outcome.events] == [
        ("Warning", reason, expected)
    ]
    assert "result_of" not in fake.calls
    assert await follow(lumeflow_manifest(), outcome.status, connect) is None


@pytest.mark.asyncio
async def test_follow_outage_recorded_once_and_cleared(fake, connect, settings):
    status = await started(fake, connect, settings)
    fake.failure = PrefectUnreachable("down")
    lost = await follow(lumeflow_manifest(), status, connect)
    assert lost is not None
    assert kstatus(lost.status) == {
        "Ready": ("False", "PrefectUnreachable"),
        "Reconciling": ("True", "PrefectUnreachable"),
        "Stalled": ("False", "PrefectUnreachable"),
    }
    assert lost.retry_in is None and lost.events == []
    assert lost.status.phase == "Running"
    assert await follow(lumeflow_manifest(), lost.status, connect) is None

    fake.failure = None  # back, and the run is as it was: the trouble is cleared anyway
    back = await follow(lumeflow_manifest(), lost.status, connect)
    assert back is not None
    assert kstatus(back.status)["Ready"] == ("False", "FlowRunning")
    assert back.status.conditions[0].message == "flow run run-1 is Scheduled"


@pytest.mark.asyncio
async def test_follow_not_configured_recorded_once(fake, connect, settings):
    status = await started(fake, connect, settings)
    connect.error = PrefectNotConfigured("SecretNotFound", "Secret gone")
    lost = await follow(lumeflow_manifest(), status, connect)
    assert cond(lost.status) == ("False", "SecretNotFound")
    assert await follow(lumeflow_manifest(), lost.status, connect) is None


@pytest.mark.asyncio
async def test_follow_outage_while_reading_results_is_transient(settings, tmp_path):
    class ResultOutage(FakePrefect):
        async def result_of(self, flow_run: FlowRunView) -> Any:
            self.calls["result_of"] += 1
            raise PrefectUnreachable("timed out reading the result")

    fake = ResultOutage()
    connect = Connector(fake)
    status = await started(fake, connect, settings)
    fake.set_result(status.last_run.id, {})
    fake.set_state(status.last_run.id, "COMPLETED")
    outcome = await follow(lumeflow_manifest(), status, connect)
    assert outcome is not None
    assert outcome.status.phase != "Failed"
    assert cond(outcome.status) == ("False", "PrefectUnreachable")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "backend",
    [None, Found(backend_manifest(), {})],
    ids=["backend-gone", "backend-not-ready"],
)
async def test_follow_without_a_usable_backend_is_none(fake, connect, settings, backend):
    status = await started(fake, connect, settings)
    fake.set_state(status.last_run.id, "RUNNING")
    assert await follow(lumeflow_manifest(), status, connect, backend=backend) is None
    assert not fake.calls


@pytest.mark.asyncio
async def test_follow_nothing_to_follow(fake, connect, settings):
    assert await follow(lumeflow_manifest(), LumeFlowStatus(), connect) is None  # not deployed
    ready = await reconcile(on_request(), LumeFlowStatus(), connect, settings)
    fake.calls.clear()
    assert await follow(on_request(), ready.status, connect) is None  # no run
    assert await follow(lumeflow_manifest(type="x"), ready.status, connect) is None  # invalid
    assert not fake.calls


@pytest.mark.asyncio
async def test_follow_a_final_run_whose_end_is_not_written(fake, connect, settings, tmp_path):
    """A run that ended while the operator was down: final state in lastRun, phase Running."""
    status = await started(fake, connect, settings, lumeflow_manifest(results=None))
    fake.set_result(status.last_run.id, {"r": text_file(tmp_path / "r.txt")})
    fake.set_state(status.last_run.id, "COMPLETED")
    status.last_run.state, status.last_run.state_type = "Completed", "COMPLETED"
    outcome = await follow(lumeflow_manifest(results=None), status, connect)
    assert outcome is not None and outcome.status.phase == "Completed"
    assert [r.name for r in outcome.status.results] == ["r"]


@pytest.mark.asyncio
async def test_follow_schedule_reads_the_latest_run(fake, connect, settings, tmp_path):
    body = lumeflow_manifest(run=SCHEDULE, results=None)
    status = await started(fake, connect, settings, body)
    assert status.phase == "Ready" and status.last_run is None

    assert await follow(body, status, connect) is None  # nothing started yet
    assert fake.calls == {"latest_run": 1}  # no request for no runs

    scheduled = await fake.create_flow_run(status.deployment_id, idempotency_key="cron-1")
    assert await follow(body, status, connect) is None  # merely scheduled runs do not count
    fake.set_state(scheduled.id, "RUNNING")
    running = await follow(body, status, connect)
    assert running is not None
    assert running.status.phase == "Running"
    assert running.status.last_run.id == scheduled.id
    assert running.status.last_run.index == 0 and running.status.last_run.generation is None

    fake.set_result(scheduled.id, {"r": text_file(tmp_path / "r.txt")})
    fake.set_state(scheduled.id, "COMPLETED")
    done = await follow(body, running.status, connect)
    assert done.status.phase == "Completed"
    assert events(done) == [("Normal", "FlowRunCompleted")]
    assert await follow(body, done.status, connect) is None  # the same final run

    nxt = await fake.create_flow_run(status.deployment_id, idempotency_key="cron-2")
    fake.set_state(nxt.id, "RUNNING")
    again = await follow(body, done.status, connect)
    assert again.status.last_run.id == nxt.id and again.status.phase == "Running"
    assert again.status.results is None or again.status.results == done.status.results


@pytest.mark.asyncio
async def test_follow_schedule_notices_a_newer_run_in_the_same_state(fake, connect, settings):
    body = lumeflow_manifest(run=SCHEDULE)
    status = await started(fake, connect, settings, body)
    first = await fake.create_flow_run(status.deployment_id, idempotency_key="cron-1")
    fake.set_state(first.id, "RUNNING")
    running = await follow(body, status, connect)
    second = await fake.create_flow_run(status.deployment_id, idempotency_key="cron-2")
    fake.set_state(second.id, "RUNNING")
    newer = await follow(body, running.status.model_copy(deep=True), connect)
    assert newer is not None and newer.status.last_run.id == second.id


# ---- delete_flow --------------------------------------------------------------------------


async def delete(body, status, connect, settings, *, backend="ready", retry=0):
    return await delete_flow(
        body,
        status,
        backend=ready_backend() if backend == "ready" else backend,
        connect=connect,
        settings=settings,
        retry=retry,
    )


@pytest.mark.asyncio
async def test_delete_removes_the_deployment(fake, connect, settings):
    status = await started(fake, connect, settings)
    outcome = await delete(lumeflow_manifest(), status, connect, settings)
    assert fake.deployment(*DEPLOYMENT) is None
    # issue 12: runs in flight are looked for (and cancelled) before the deployment goes
    # the run that had not started yet is Cancelled at once
    assert fake.calls == {
        "active_runs": 1,
        "cancel_flow_run": 1,
        "read_flow_runs": 1,
        "delete_deployment": 1,
    }
    assert fake.runs[status.last_run.id].view.state.type == "CANCELLED"
    assert outcome.retry_in is None and outcome.events == []


@pytest.mark.asyncio
async def test_delete_never_deployed_is_done(fake, connect, settings):
    outcome = await delete(lumeflow_manifest(), LumeFlowStatus(), connect, settings)
    assert outcome.retry_in is None and not fake.calls and connect.backends == []


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "backend", [None, Found(backend_manifest(type="mainframe"), {})], ids=["gone", "invalid"]
)
async def test_delete_with_its_backend_gone(fake, connect, settings, backend):
    status = await started(fake, connect, settings)
    connect.backends.clear()

    # no default API: nothing to reach, done (the deployment stays where it is)
    outcome = await delete(lumeflow_manifest(), status, connect, settings, backend=backend)
    assert outcome.retry_in is None and not fake.calls and connect.backends == []
    assert fake.deployment(*DEPLOYMENT) is not None

    # with the operator's default API: a stand-in backend of the same name
    with_default = make_settings("http://prefect:4200/api")
    outcome = await delete(lumeflow_manifest(), status, connect, with_default, backend=backend)
    assert outcome.retry_in is None
    (stand_in,) = connect.backends
    assert stand_in.metadata.name == "local" and stand_in.metadata.namespace == "default"
    assert stand_in.spec.type == "process" and stand_in.spec.prefect is None
    assert fake.deployment(*DEPLOYMENT) is None


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "error",
    [
        PrefectUnreachable("down"),
        PrefectNotConfigured("SecretNotFound", "Secret k not found"),
    ],
    ids=["unreachable", "not-configured"],
)
async def test_delete_holds_the_finalizer_while_prefect_fails(fake, connect, settings, error):
    status = await started(fake, connect, settings)
    if isinstance(error, PrefectNotConfigured):
        connect.error = error
    else:
        fake.failure = error
    outcome = await delete(lumeflow_manifest(), status, connect, settings, retry=4)
    assert outcome.retry_in == 16.0
    message = f"waiting to delete the Prefect deployment of default/beam-stats: {error}"
    assert outcome.retry_message == message
    # Status says why the finalizer holds.
    assert cond(outcome.status) == ("False", error.reason)
    assert outcome.status.conditions[0].message == message
    fake.failure = connect.error = None
    assert fake.deployment(*DEPLOYMENT) is not None


@pytest.mark.asyncio
async def test_delete_rejected_is_stalled_not_retried(fake, connect, settings):
    status = await started(fake, connect, settings)
    fake.failure = PrefectRejected("403: forbidden", 403)
    outcome = await delete(lumeflow_manifest(), status, connect, settings, retry=4)
    assert kstatus(outcome.status)["Stalled"] == ("True", "PrefectRejected")
    assert events(outcome) == [("Warning", "PrefectRejected")]
    # Decided: a refusal holds the finalizer Stalled, asked again only at the longest
    # backoff (a restored Secret or deletionPolicy: Orphan then takes effect), never a storm.
    assert outcome.retry_in == settings.max_backoff
