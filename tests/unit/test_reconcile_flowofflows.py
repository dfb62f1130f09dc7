"""FlowOfFlows decisions: reconcile_composition and follow_composition."""

from __future__ import annotations

import copy
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from lume_operator.api.backend import SchedulingBackend
from lume_operator.api.flow import LumeFlow, ResultStatus
from lume_operator.api.flowofflows import FlowOfFlows, FlowOfFlowsStatus, StepStatus
from lume_operator.flows.composition import ENTRYPOINT, FLOW_NAME, OUTCOME_DESCRIPTION, STEP_TAG
from lume_operator.flows.plan import plan_steps, step_flows
from lume_operator.prefect.fake import FakePrefect
from lume_operator.prefect.port import (
    PrefectNotConfigured,
    PrefectRejected,
    PrefectUnreachable,
    idempotency_key,
)
from lume_operator.reconcile import conditions
from lume_operator.reconcile.deploy import RESULT_ENV, composition_deployment
from lume_operator.reconcile.flowofflows import (
    delete_composition,
    follow_composition,
    reconcile_composition,
)
from lume_operator.reconcile.flowrun import run_status
from lume_operator.reconcile.outcome import Found, set_conditions
from tests.unit.conftest import (
    backend_manifest,
    composition_manifest,
    cond,
    events,
    kstatus,
    make_settings,
    pipeline_flows,
    ready_backend,
)

pytestmark = pytest.mark.unit

UID = "uid-fof-beam-study"
STEPS = ["beam", "envelope", "emittance", "report"]
FLOW_OF_STEP = {
    "beam": "make-beam",
    "envelope": "beam-envelope",
    "emittance": "emittance-bootstrap",
    "report": "beam-report",
}
PARENT_TAGS = ["cpu", "lume.dev/flowofflows=beam-study", "lume.dev/backend=local"]


def deployed_flows(**status: dict[str, Any]) -> dict[str, Found]:
    """The pipeline's LumeFlows, each deployed unless `status` says otherwise."""
    return {
        name: Found(body, status.get(name, {"deploymentId": f"dep-{name}", "phase": "Ready"}))
        for name, body in pipeline_flows().items()
    }


def backends() -> dict[str, Found]:
    return {"local": ready_backend()}


async def reconcile(body, status, connect, settings, *, flows=None, backends_=None, retry=0):
    return await reconcile_composition(
        body,
        status,
        flows=deployed_flows() if flows is None else flows,
        backends=backends() if backends_ is None else backends_,
        connect=connect,
        settings=settings,
        retry=retry,
    )


async def follow(body, status, connect, memory, *, flows=None, backends_=None):
    return await follow_composition(
        body,
        status,
        flows=deployed_flows() if flows is None else flows,
        backends=backends() if backends_ is None else backends_,
        connect=connect,
        memory=memory,
    )


def steps_of(status: FlowOfFlowsStatus) -> dict[str, str | None]:
    return {step.name: step.phase for step in status.steps or []}


def mapped(step: dict[str, Any], **parents: str) -> dict[str, Any]:
    step = copy.deepcopy(step)
    step["mappedParameters"] = {
        param: {"parentFlow": parent, "mapType": "raw"} for param, parent in parents.items()
    }
    return step


# ---- reconcile_composition ----------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("steps", "message"),
    [
        (
            [{"name": "beam", "flowRef": {"name": "make-beam"}}]
            + [mapped({"name": "report", "flowRef": {"name": "beam-report"}}, x="nope")],
            "spec.steps[1].mappedParameters.x.parentFlow: unknown parent flow 'nope' "
            "(steps: beam, report)",
        ),
        (
            [
                mapped({"name": "a", "flowRef": {"name": "make-beam"}}, x="b"),
                mapped({"name": "b", "flowRef": {"name": "beam-report"}}, y="a"),
            ],
            "spec.steps: the steps form a cycle: ",
        ),
        (
            [mapped({"name": "a", "flowRef": {"name": "make-beam"}}, x="a")],
            "spec.steps[0].mappedParameters.x.parentFlow: a step cannot map its own output",
        ),
    ],
    ids=["unknown-parent", "cycle", "own-output"],
)
async def test_invalid_composition_stalls(fake, connect, settings, steps, message):
    body = composition_manifest(generation=5, steps=steps)
    outcome = await reconcile(body, FlowOfFlowsStatus(), connect, settings)
    status = outcome.status
    assert status.phase == "Failed" and status.observed_generation == 5
    assert kstatus(status) == {
        "Ready": ("False", "InvalidSpec"),
        "Reconciling": ("False", "InvalidSpec"),
        "Stalled": ("True", "InvalidSpec"),
    }
    assert status.conditions[0].message.startswith(message)
    assert events(outcome) == [("Warning", "InvalidSpec")]
    assert outcome.retry_in is None
    assert not fake.calls and connect.backends == []


@pytest.mark.asyncio
async def test_invalid_model_stalls(fake, connect, settings):
    body = composition_manifest(steps=[{"name": "a"}])  # neither flowRef nor flow
    outcome = await reconcile(body, FlowOfFlowsStatus(), connect, settings)
    assert cond(outcome.status, "Stalled") == ("True", "InvalidSpec")
    assert "exactly one of flowRef or flow" in outcome.status.conditions[0].message
    assert not fake.calls


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("flows", "reason", "message"),
    [
        (
            {k: v for k, v in deployed_flows().items() if k != "beam-report"},
            "FlowNotFound",
            "LumeFlow 'beam-report' not found; waiting for it",
        ),
        (
            {
                **deployed_flows(),
                "beam-report": Found({**pipeline_flows()["beam-report"], "spec": {"bad": 1}}, {}),
            },
            "FlowNotFound",  # an invalid LumeFlow is as good as none
            "LumeFlow 'beam-report' not found; waiting for it",
        ),
        (
            deployed_flows(**{"beam-envelope": {"phase": "Deploying"}}),
            "FlowNotDeployed",
            "LumeFlow 'beam-envelope' is not deployed yet",
        ),
    ],
    ids=["not-applied", "invalid", "not-deployed"],
)
async def test_waits_for_its_lumeflows(fake, connect, settings, flows, reason, message):
    outcome = await reconcile(
        composition_manifest(), FlowOfFlowsStatus(), connect, settings, flows=flows, retry=3
    )
    assert kstatus(outcome.status) == {
        "Ready": ("False", reason),
        "Reconciling": ("True", reason),
        "Stalled": ("False", reason),
    }
    assert outcome.status.conditions[0].message == message
    assert outcome.retry_in == 8.0 and outcome.retry_message == message
    assert outcome.status.phase is None and outcome.status.run is None
    assert not fake.calls and connect.backends == []


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("backends_", "reason"),
    [({}, "BackendNotFound"), ({"local": Found(backend_manifest(), {})}, "BackendNotReady")],
)
async def test_waits_for_its_backend(fake, connect, settings, backends_, reason):
    outcome = await reconcile(
        composition_manifest(), FlowOfFlowsStatus(), connect, settings, backends_=backends_
    )
    assert cond(outcome.status) == ("False", reason)
    assert outcome.retry_in == 1.0
    assert not fake.calls


@pytest.mark.asyncio
async def test_parent_deployment_and_one_run_in_prefect(fake, connect):
    """What reaches Prefect; the status written after it is test_..._starts_one_run's."""
    settings = make_settings(step_poll_interval=0.5)
    body = composition_manifest(generation=2)
    await reconcile(body, FlowOfFlowsStatus(), connect, settings)

    spec = fake.deployment(FLOW_NAME, "default.beam-study")
    assert spec is not None
    assert spec.entrypoint == ENTRYPOINT
    assert spec.work_pool_name == "default-local" and spec.work_queue_name == "cpu"
    assert spec.tags == PARENT_TAGS
    assert spec.job_variables["env"] == {**RESULT_ENV, "OMP_NUM_THREADS": "1"}
    assert spec.description == "FlowOfFlows default/beam-study, managed by lume-operator."
    assert spec.parameters == {}
    # a new generation asks for parent runs in flight (to cancel), then starts its own
    assert fake.calls == {"ensure_deployment": 1, "active_runs": 1, "create_flow_run": 1}
    assert len(fake.deployments) == 1  # referenced LumeFlows deploy themselves

    (run,) = fake.runs.values()
    fof = FlowOfFlows.model_validate(body)
    flows = {n: LumeFlow.model_validate(f.body) for n, f in deployed_flows().items()}
    # make-beam's save_particles task is mapped by a later step: its run persists task results,
    # with its deployment's whole env (a run's env replaces its deployment's).
    persist = {**RESULT_ENV, "OMP_NUM_THREADS": "1", "PREFECT_TASKS_DEFAULT_PERSIST_RESULT": "true"}
    assert run.parameters == {
        "steps": plan_steps(
            fof, step_flows(fof, flows), UID, job_variables={"beam": {"env": persist}}
        ),
        "poll_interval": 0.5,
    }
    assert [bool(s.get("jobVariables")) for s in run.parameters["steps"]] == [
        s == "beam" for s in STEPS
    ]
    assert [s["deployment"] for s in run.parameters["steps"]] == [
        f"{FLOW_OF_STEP[s]}/default" for s in STEPS
    ]
    assert [s["key"] for s in run.parameters["steps"]] == [
        idempotency_key(UID, 2, 0, s) for s in STEPS
    ]
    assert run.view.tags == PARENT_TAGS
    key = idempotency_key(UID, 2, 0)
    assert (await fake.create_flow_run(run.deployment_id, idempotency_key=key)).id == run.view.id

    # reconciled again with its status lost: the same run back, not a second one
    with suppress(ValueError):
        await reconcile(body, FlowOfFlowsStatus(), connect, settings)
    assert len(fake.runs) == 1


@pytest.mark.asyncio
async def test_deploys_the_parent_and_starts_one_run(fake, connect):
    settings = make_settings(step_poll_interval=0.5)
    body = composition_manifest(generation=2)
    outcome = await reconcile(body, FlowOfFlowsStatus(), connect, settings)
    (run,) = fake.runs.values()
    status = outcome.status
    assert status.phase == "Running" and status.observed_generation == 2
    assert status.run.id == run.view.id and status.run.generation == 2
    assert status.run.index == 0 and status.run.state == "Scheduled"
    assert status.run.url == f"http://prefect.test/runs/flow-run/{run.view.id}"
    assert status.steps == [StepStatus(name=name, phase="Pending") for name in STEPS]
    assert kstatus(status) == {
        "Ready": ("False", "FlowRunning"),
        "Reconciling": ("True", "FlowRunning"),
        "Stalled": ("False", "FlowRunning"),
    }
    assert status.conditions[0].message == "flow run run-1"
    assert [(e.type, e.reason, e.message) for e in outcome.events] == [
        ("Normal", "FlowRunCreated", "flow run run-1")
    ]
    assert outcome.retry_in is None


@pytest.mark.asyncio
async def test_one_parent_run_per_generation(fake, connect, settings):
    first = await reconcile(composition_manifest(), FlowOfFlowsStatus(), connect, settings)
    run_id = first.status.run.id
    again = await reconcile(composition_manifest(), first.status, connect, settings)
    assert again.status.run.id == run_id and again.events == []
    assert fake.calls["create_flow_run"] == 1 and len(fake.runs) == 1

    # a lost status gets the same run back (idempotency key)
    lost = await reconcile(composition_manifest(), FlowOfFlowsStatus(), connect, settings)
    assert lost.status.run.id == run_id and len(fake.runs) == 1

    new = await reconcile(composition_manifest(generation=2), again.status, connect, settings)
    assert new.status.run.id != run_id and new.status.run.generation == 2
    assert len(fake.runs) == 2
    assert events(new) == [("Normal", "FlowRunCreated")]


@pytest.mark.asyncio
async def test_inline_steps_are_deployed_on_their_backend(fake, connect, settings):
    inline = {
        "backendRef": {"name": "gpu"},
        "entrypoint": "flows/extra.py:extra",
        "labels": ["cpu"],
    }
    steps = [
        {"name": "beam", "flowRef": {"name": "make-beam"}},
        mapped({"name": "extra", "flow": inline}, particles="beam"),
    ]
    gpu = backend_manifest(uid="uid-gpu")
    gpu["metadata"]["name"] = "gpu"
    body = composition_manifest(steps=steps)
    await reconcile(
        body,
        FlowOfFlowsStatus(),
        connect,
        settings,
        backends_={"local": ready_backend(), "gpu": ready_backend(gpu)},
    )
    spec = fake.deployment("beam-study-extra", "default")
    assert spec is not None
    assert spec.work_pool_name == "default-gpu"
    assert spec.tags == ["cpu", "lume.dev/flow=beam-study-extra", "lume.dev/backend=gpu"]
    assert fake.deployment(FLOW_NAME, "default.beam-study").work_pool_name == "default-local"
    (run,) = fake.runs.values()
    assert [s["deployment"] for s in run.parameters["steps"]] == [
        "make-beam/default",
        "beam-study-extra/default",
    ]

    # the inline step's backend missing: waited for, nothing run
    fake.calls.clear()
    waiting = await reconcile(body, FlowOfFlowsStatus(), connect, settings)
    assert cond(waiting.status) == ("False", "BackendNotFound")
    assert "default/gpu" in waiting.status.conditions[0].message
    assert "create_flow_run" not in fake.calls


@pytest.mark.asyncio
async def test_backend_ref_of_the_composition_wins(fake, connect, settings):
    other = backend_manifest(uid="uid-other")
    other["metadata"]["name"] = "other"
    body = composition_manifest(backendRef={"name": "other"})
    await reconcile(
        body,
        FlowOfFlowsStatus(),
        connect,
        settings,
        backends_={"local": ready_backend(), "other": ready_backend(other)},
    )
    assert len(fake.runs) == 1
    assert [b.metadata.name for b in connect.backends] == ["other"]
    spec = fake.deployment(FLOW_NAME, "default.beam-study")
    assert spec.work_pool_name == "default-other"
    assert "lume.dev/backend=other" in spec.tags


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (PrefectUnreachable("down"), "PrefectUnreachable"),
        (PrefectNotConfigured("NoPrefectAPI", "no API"), "NoPrefectAPI"),
    ],
)
async def test_prefect_trouble_is_retried(fake, connect, settings, error, reason):
    if isinstance(error, PrefectNotConfigured):
        connect.error = error
    else:
        fake.failure = error
    outcome = await reconcile(
        composition_manifest(), FlowOfFlowsStatus(), connect, settings, retry=1
    )
    assert kstatus(outcome.status) == {
        "Ready": ("False", reason),
        "Reconciling": ("True", reason),
        "Stalled": ("False", reason),
    }
    assert outcome.retry_in == 2.0
    assert outcome.status.run is None and not fake.runs


# ---- follow_composition -------------------------------------------------------------------


class Pipeline:
    """A composition whose parent run exists; children are added as its parent flow would."""

    def __init__(self, fake, status: FlowOfFlowsStatus) -> None:
        self.fake = fake
        self.status = status
        self.parent = status.run.id
        self.memory: dict[str, Any] = {}
        self.children: dict[str, str] = {}

    def start(self, step: str, state: str = "RUNNING", message: str | None = None) -> str:
        child = self.fake.add_child(
            self.parent,
            f"dep-{FLOW_OF_STEP[step]}",
            ["lume.dev/flowofflows=beam-study", f"{STEP_TAG}{step}"],
        )
        self.fake.set_state(child, state, message)
        self.children[step] = child
        return child

    def complete(self, step: str, value: Any) -> str:
        child = self.children.get(step) or self.start(step)
        self.fake.set_result(child, value)
        self.fake.set_state(child, "COMPLETED")
        return child

    @property
    def key(self) -> str:
        return f"{UID}/{self.parent}"


def h5(path: Path) -> dict[str, str]:
    path.write_bytes(b"\x89HDF\r\n\x1a\n")
    return {"filename": str(path), "filesystem_identifier": "local", "file_type_string": "HDF5File"}


def txt(path: Path) -> dict[str, str]:
    path.write_text("report")
    return {"filename": str(path), "filesystem_identifier": "local", "file_type_string": "TextFile"}


@pytest_asyncio.fixture
async def pipeline(fake) -> Pipeline:
    """The parent deployment and run in Prefect and the status reconcile_composition means to
    write."""
    fof = FlowOfFlows.model_validate(composition_manifest())
    backend = SchedulingBackend.model_validate(backend_manifest())
    deployment_id = await fake.ensure_deployment(composition_deployment(fof, backend))
    run = await fake.create_flow_run(deployment_id, idempotency_key=idempotency_key(UID, 1, 0))
    status = FlowOfFlowsStatus(
        phase="Running",
        observed_generation=1,
        run=run_status(run, 0, fake.ui_url(run.id), 1),
        steps=[StepStatus(name=name, phase="Pending") for name in STEPS],
    )
    set_conditions(status, conditions.progressing("FlowRunning", f"flow run {run.name}"))
    fake.calls.clear()
    return Pipeline(fake, status)


async def step(pipeline: Pipeline, connect, body=None, **kwargs):
    outcome = await follow(
        body or composition_manifest(), pipeline.status, connect, pipeline.memory, **kwargs
    )
    if outcome is not None:
        pipeline.status = outcome.status
    return outcome


@pytest.mark.asyncio
async def test_follow_nothing_changed_is_none(fake, connect, pipeline):
    assert await step(pipeline, connect) is None
    assert fake.calls == {"read_flow_run": 1, "child_runs": 1}
    assert pipeline.memory == {pipeline.key: pipeline.memory[pipeline.key]}


@pytest.mark.asyncio
async def test_follow_steps_running_then_completed(fake, connect, pipeline, tmp_path):
    fake.set_state(pipeline.parent, "RUNNING")
    pipeline.start("beam")
    running = await step(pipeline, connect)
    assert running is not None
    status = running.status
    assert status.phase == "Running"
    assert status.run.state == "Running" and status.run.generation == 1
    assert steps_of(status) == {
        "beam": "Running",
        "envelope": "Pending",
        "emittance": "Pending",
        "report": "Pending",
    }
    beam_run = status.steps[0].run
    assert beam_run.id == pipeline.children["beam"] and beam_run.state == "Running"
    assert beam_run.url == f"http://prefect.test/runs/flow-run/{beam_run.id}"
    assert kstatus(status) == {
        "Ready": ("False", "FlowRunning"),
        "Reconciling": ("True", "FlowRunning"),
        "Stalled": ("False", "FlowRunning"),
    }
    assert status.conditions[0].message == "steps running"
    assert running.events == [] and running.retry_in is None
    assert await step(pipeline, connect) is None

    particles = h5(tmp_path / "particles.h5")
    pipeline.complete("beam", {"particles": particles})
    done = await step(pipeline, connect)
    assert steps_of(done.status)["beam"] == "Completed"
    assert done.status.steps[0].results == [
        ResultStatus(
            name="particles", type="HDF5File", filesystem="local", location=particles["filename"]
        )
    ]
    assert fake.calls["result_of"] == 1
    assert pipeline.memory[pipeline.key]["beam"].phase == "Completed"

    # a step seen final is not read again
    pipeline.start("envelope")
    pipeline.start("emittance", "PENDING")
    both = await step(pipeline, connect)
    assert steps_of(both.status) == {
        "beam": "Completed",
        "envelope": "Running",
        "emittance": "Running",
        "report": "Pending",
    }
    assert fake.calls["result_of"] == 1
    assert both.status.steps[0].results == done.status.steps[0].results


@pytest.mark.asyncio
async def test_follow_ignores_children_of_no_known_step(fake, connect, pipeline):
    fake.add_child(pipeline.parent, "dep-x", ["lume.dev/flowofflows=beam-study"])
    fake.add_child(pipeline.parent, "dep-x", [f"{STEP_TAG}not-a-step"])
    fake.add_child("another-parent", "dep-x", [f"{STEP_TAG}beam"])
    assert await step(pipeline, connect) is None


@pytest.mark.asyncio
async def test_follow_to_completion(fake, connect, pipeline, tmp_path):
    pipeline.complete("beam", {"particles": h5(tmp_path / "p.h5")})
    pipeline.complete("envelope", {"envelope": h5(tmp_path / "e.h5"), "waist_position": 1.2})
    pipeline.complete("emittance", {"emittance": 1e-6, "emittance_error": 1e-8})
    pipeline.complete("report", {"report": txt(tmp_path / "r.txt")})
    fake.set_result(pipeline.parent, {})
    fake.set_state(pipeline.parent, "COMPLETED")
    outcome = await step(pipeline, connect)
    assert outcome is not None
    status = outcome.status
    assert status.phase == "Completed"
    assert set(steps_of(status).values()) == {"Completed"}
    assert [r.name for r in status.steps[1].results] == ["envelope", "waist_position"]
    assert status.steps[2].results[0].type == "value"
    assert status.run.state == "Completed"
    assert kstatus(status) == {
        "Ready": ("True", "FlowRunCompleted"),
        "Reconciling": ("False", "FlowRunCompleted"),
        "Stalled": ("False", "FlowRunCompleted"),
    }
    assert [(e.type, e.reason, e.message) for e in outcome.events] == [
        ("Normal", "FlowRunCompleted", "every step completed")
    ]
    assert pipeline.memory == {}  # dropped when the run ended
    assert fake.calls["table_artifact"] == 1

    fake.calls.clear()
    assert await step(pipeline, connect) is None  # ended: not read again
    assert not fake.calls


@pytest.mark.asyncio
async def test_follow_a_failed_step_and_the_skipped_ones(fake, connect, pipeline, tmp_path):
    pipeline.complete("beam", {"particles": h5(tmp_path / "p.h5")})
    pipeline.start("envelope", "FAILED", "ValueError: negative length")
    pipeline.complete("emittance", {"emittance": 1e-6, "emittance_error": 1e-8})
    middle = await step(pipeline, connect)
    # the parent has not ended: still Running, the failure shows on the step
    assert middle.status.phase == "Running"
    assert steps_of(middle.status) == {
        "beam": "Completed",
        "envelope": "Failed",
        "emittance": "Completed",
        "report": "Pending",
    }
    assert middle.events == []

    fake.set_artifact(
        pipeline.parent,
        OUTCOME_DESCRIPTION,
        [
            {"step": "beam", "state": "COMPLETED", "flowRunId": "x", "message": ""},
            {"step": "envelope", "state": "FAILED", "flowRunId": "y", "message": "x"},
            {"step": "report", "state": "SKIPPED", "flowRunId": None, "message": "parent failed"},
        ],
    )
    fake.set_state(pipeline.parent, "FAILED", "step 'envelope' failed: ...; skipped: report")
    outcome = await step(pipeline, connect)
    status = outcome.status
    assert status.phase == "Failed"
    assert steps_of(status) == {
        "beam": "Completed",
        "envelope": "Failed",
        "emittance": "Completed",
        "report": "Skipped",
    }
    assert status.steps[1].run.message == "ValueError: negative length"
    assert status.steps[3].run is None
    message = "step 'envelope': ValueError: negative length"
    # issue 12: a failed composition is Stalled (kstatus Failed), no longer all False
    assert kstatus(status) == {
        "Ready": ("False", "StepFailed"),
        "Reconciling": ("False", "StepFailed"),
        "Stalled": ("True", "StepFailed"),
    }
    assert status.conditions[0].message == message
    assert [(e.type, e.reason, e.message) for e in outcome.events] == [
        ("Warning", "StepFailed", message)
    ]
    assert pipeline.memory == {}


@pytest.mark.asyncio
async def test_follow_steps_that_never_ran_without_an_outcome_table(fake, connect, pipeline):
    fake.set_state(pipeline.parent, "CRASHED", "pod evicted")
    outcome = await step(pipeline, connect)
    assert outcome.status.phase == "Failed"
    assert set(steps_of(outcome.status).values()) == {"Failed"}
    reason = "the composition ended before this step ran"
    assert outcome.status.conditions[0].message == "; ".join(
        f"step {name!r}: {reason}" for name in STEPS
    )
    assert cond(outcome.status) == ("False", "StepFailed")


@pytest.mark.asyncio
async def test_follow_mapping_failure_from_the_outcome_table(fake, connect, pipeline, tmp_path):
    pipeline.complete("beam", {"particles": h5(tmp_path / "p.h5")})
    pipeline.complete("envelope", {"envelope": h5(tmp_path / "e.h5"), "waist_position": 1.2})
    pipeline.complete("emittance", {"emittance": 1e-6, "emittance_error": 1e-8})
    fake.set_artifact(
        pipeline.parent,
        OUTCOME_DESCRIPTION,
        [{"step": "report", "state": "FAILED", "message": "mapping 'envelope': no key"}],
    )
    fake.set_state(pipeline.parent, "FAILED")
    outcome = await step(pipeline, connect)
    assert steps_of(outcome.status)["report"] == "Failed"
    assert outcome.status.conditions[0].message == "step 'report': mapping 'envelope': no key"


@pytest.mark.asyncio
async def test_follow_parent_ended_badly_with_every_step_done(fake, connect, pipeline, tmp_path):
    pipeline.complete("beam", {"particles": h5(tmp_path / "p.h5")})
    pipeline.complete("envelope", {"envelope": h5(tmp_path / "e.h5"), "waist_position": 1.2})
    pipeline.complete("emittance", {"emittance": 1e-6, "emittance_error": 1e-8})
    pipeline.complete("report", {"report": txt(tmp_path / "r.txt")})
    fake.set_state(pipeline.parent, "CANCELLED")
    outcome = await step(pipeline, connect)
    assert outcome.status.phase == "Failed"
    assert outcome.status.conditions[0].message == "ended Cancelled"
    assert events(outcome) == [("Warning", "StepFailed")]


@pytest.mark.asyncio
async def test_follow_a_step_with_invalid_results(fake, connect, pipeline):
    pipeline.complete("beam", {"nothing": 1})
    outcome = await step(pipeline, connect)
    assert steps_of(outcome.status)["beam"] == "Failed"
    assert outcome.status.phase == "Running"
    fake.set_state(pipeline.parent, "FAILED")
    ended = await step(pipeline, connect)
    assert ended.status.conditions[0].message.startswith(
        "step 'beam': result 'particles' is not in the flow's return value"
    )


@pytest.mark.asyncio
async def test_follow_outage_recorded_once(fake, connect, pipeline):
    fake.failure = PrefectUnreachable("down")
    lost = await step(pipeline, connect)
    assert lost is not None
    assert kstatus(lost.status) == {
        "Ready": ("False", "PrefectUnreachable"),
        "Reconciling": ("True", "PrefectUnreachable"),
        "Stalled": ("False", "PrefectUnreachable"),
    }
    assert lost.retry_in is None and lost.events == []
    assert lost.status.phase == "Running"
    assert await step(pipeline, connect) is None
    assert pipeline.memory == {}

    fake.failure = None  # back, and something changed: the trouble goes
    fake.set_state(pipeline.parent, "RUNNING")
    back = await step(pipeline, connect)
    assert cond(back.status) == ("False", "FlowRunning")


@pytest.mark.asyncio
async def test_follow_clears_an_outage_when_nothing_else_changed(fake, connect, pipeline):
    fake.failure = PrefectUnreachable("down")
    await step(pipeline, connect)
    fake.failure = None
    back = await step(pipeline, connect)
    assert back is not None
    assert cond(back.status) == ("False", "FlowRunning")


@pytest.mark.asyncio
async def test_follow_with_nothing_to_read_is_none(fake, connect, pipeline, settings):
    memory: dict[str, Any] = {}
    body = composition_manifest()
    # no run yet
    assert await follow(body, FlowOfFlowsStatus(), connect, memory) is None
    # backend gone or not ready
    assert await follow(body, pipeline.status, connect, memory, backends_={}) is None
    assert (
        await follow(
            body,
            pipeline.status,
            connect,
            memory,
            backends_={"local": Found(backend_manifest(), {})},
        )
        is None
    )
    # the first step's LumeFlow is gone: no backend to read with
    flows = {k: v for k, v in deployed_flows().items() if k != "make-beam"}
    assert await follow(body, pipeline.status, connect, memory, flows=flows) is None
    # invalid
    assert await follow(composition_manifest(steps=[]), pipeline.status, connect, memory) is None
    assert not fake.calls and memory == {}


# ---- issue 12: step limits in the plan -----------------------------------------------------


def plan_of(body: dict[str, Any], flows: dict[str, Found] | None = None) -> dict[str, dict]:
    fof = FlowOfFlows.model_validate(body)
    known = {n: LumeFlow.model_validate(f.body) for n, f in (flows or deployed_flows()).items()}
    return {s["name"]: s for s in plan_steps(fof, step_flows(fof, known), UID)}


def limits(step: dict[str, Any]) -> tuple[int, int, int]:
    return step["timeout"], step["retries"], step["retryDelay"]


def test_plan_steps_default_limits():
    # no timeout anywhere: the composition's stepTimeoutSeconds, by default a day
    assert {n: limits(s) for n, s in plan_of(composition_manifest()).items()} == {
        name: (86400, 0, 0) for name in STEPS
    }


def test_plan_steps_limits_step_over_flow_over_composition():
    flows = deployed_flows()
    beam = copy.deepcopy(flows["make-beam"].body)
    beam["spec"]["run"] = {
        "policy": "OnChange",
        "timeoutSeconds": 600,
        "retries": 2,
        "retryDelaySeconds": 30,
    }
    flows["make-beam"] = Found(beam, flows["make-beam"].status)
    body = composition_manifest(stepTimeoutSeconds=120)
    steps = copy.deepcopy(body["spec"]["steps"])
    steps[0].update(timeoutSeconds=60, retries=0)  # beam: its own, over its flow's
    steps[1].update(retryDelaySeconds=5, retries=1)  # envelope: its own retries, default time
    body["spec"]["steps"] = steps
    planned = plan_of(body, flows)
    assert limits(planned["beam"]) == (60, 0, 30)  # step timeout and retries, flow's delay
    assert limits(planned["envelope"]) == (120, 1, 5)
    assert limits(planned["report"]) == (120, 0, 0)

    steps[0].pop("timeoutSeconds")
    steps[0].pop("retries")
    assert limits(plan_of(body, flows)["beam"]) == (600, 2, 30)  # all its flow's


def test_plan_steps_limits_of_an_inline_flow():
    inline = {
        "backendRef": {"name": "local"},
        "entrypoint": "flows/extra.py:extra",
        "run": {"policy": "OnChange", "timeoutSeconds": 900, "retries": 3},
    }
    body = composition_manifest(steps=[{"name": "extra", "flow": inline}])
    assert limits(plan_of(body)["extra"]) == (900, 3, 0)


# ---- issue 12: a step's newest attempt -----------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("older", "newer", "phase"),
    [
        ("FAILED", "RUNNING", "Running"),
        ("RUNNING", "FAILED", "Failed"),
        ("FAILED", "COMPLETED", "Completed"),
    ],
)
async def test_follow_a_step_by_its_newest_attempt(
    fake, connect, pipeline, tmp_path, older, newer, phase
):
    fake.now = "2026-01-01T00:00:00+00:00"
    first = pipeline.start("beam", older, "attempt 0")
    fake.now = "2026-01-01T00:05:00+00:00"
    second = fake.add_child(
        pipeline.parent,
        f"dep-{FLOW_OF_STEP['beam']}",
        ["lume.dev/flowofflows=beam-study", f"{STEP_TAG}beam"],
    )
    if newer == "COMPLETED":
        fake.set_result(second, {"particles": h5(tmp_path / "p.h5")})
    fake.set_state(second, newer)
    # the children are listed newest first as well as oldest first: created_time decides
    fake.runs = dict(reversed(list(fake.runs.items())))
    outcome = await step(pipeline, connect)
    beam = outcome.status.steps[0]
    assert beam.phase == phase and beam.run.id == second != first


# ---- issue 12: refusals and outages --------------------------------------------------------


@pytest.mark.asyncio
async def test_reconcile_rejected_is_stalled_not_retried(fake, connect, settings):
    fake.failure = PrefectRejected("403: forbidden", 403)
    outcome = await reconcile(
        composition_manifest(generation=2), FlowOfFlowsStatus(), connect, settings, retry=3
    )
    assert kstatus(outcome.status) == {
        "Ready": ("False", "PrefectRejected"),
        "Reconciling": ("False", "PrefectRejected"),
        "Stalled": ("True", "PrefectRejected"),
    }
    assert events(outcome) == [("Warning", "PrefectRejected")]
    assert outcome.retry_in is None and not fake.runs
    assert {c.observed_generation for c in outcome.status.conditions} == {2}


@pytest.mark.asyncio
async def test_follow_rejected_is_stalled_once(fake, connect, pipeline):
    fake.failure = PrefectRejected("401: invalid API key", 401)
    lost = await step(pipeline, connect)
    assert kstatus(lost.status)["Stalled"] == ("True", "PrefectRejected")
    assert events(lost) == [("Warning", "PrefectRejected")] and lost.retry_in is None
    assert await step(pipeline, connect) is None


@pytest.mark.asyncio
async def test_follow_failed_composition_carries_the_observed_generation(fake, connect, pipeline):
    fake.set_state(pipeline.parent, "CRASHED", "pod evicted")
    outcome = await step(pipeline, connect)
    assert kstatus(outcome.status)["Stalled"] == ("True", "StepFailed")
    assert {c.observed_generation for c in outcome.status.conditions} == {1}


# ---- issue 12: delete_composition ----------------------------------------------------------


async def delete(body, status, connect, settings=None, *, waited=0.0, retry=0, backends_=None):
    return await delete_composition(
        body,
        status,
        flows=deployed_flows(),
        backends=backends() if backends_ is None else backends_,
        connect=connect,
        settings=settings or make_settings(),
        retry=retry,
        waited=waited,
    )


def with_deployment(fake, pipeline) -> FlowOfFlowsStatus:
    ((_spec, view),) = fake.deployments.values()
    pipeline.status.deployment_id = view.id
    return pipeline.status


@pytest.mark.asyncio
async def test_delete_cancels_the_parent_and_its_steps_then_the_deployment(fake, connect, pipeline):
    status = with_deployment(fake, pipeline)
    fake.set_state(pipeline.parent, "RUNNING")
    beam = pipeline.start("beam")
    envelope = pipeline.start("envelope", "SCHEDULED")
    done = pipeline.start("emittance", "COMPLETED")
    first = await delete(composition_manifest(), status, connect)
    state = {run_id: fake.runs[run_id].view.state.type for run_id in fake.runs}
    assert state[pipeline.parent] == state[beam] == "CANCELLING"
    assert state[envelope] == "CANCELLED" and state[done] == "COMPLETED"
    assert first.retry_in == 2.0
    assert kstatus(first.status)["Reconciling"] == ("True", "CancellingRuns")
    assert fake.deployment(FLOW_NAME, "default.beam-study") is not None

    for run_id in (pipeline.parent, beam):  # their workers stop them
        fake.set_state(run_id, "CANCELLED")
    second = await delete(composition_manifest(), first.status, connect, waited=10)
    assert second.retry_in is None
    assert fake.deployment(FLOW_NAME, "default.beam-study") is None


@pytest.mark.asyncio
async def test_delete_forces_after_the_cancel_grace(fake, connect, pipeline):
    status = with_deployment(fake, pipeline)
    fake.set_state(pipeline.parent, "RUNNING")
    beam = pipeline.start("beam")
    settings = make_settings(cancel_grace=30)
    outcome = await delete(composition_manifest(), status, connect, settings, waited=30)
    assert fake.runs[pipeline.parent].view.state.type == "CANCELLED"
    assert fake.runs[beam].view.state.type == "CANCELLED"
    assert outcome.retry_in is None and not fake.deployments


@pytest.mark.asyncio
async def test_delete_removes_the_inline_steps_deployments(fake, connect, settings):
    inline = {"backendRef": {"name": "local"}, "entrypoint": "flows/extra.py:extra"}
    steps = [
        {"name": "beam", "flowRef": {"name": "make-beam"}},
        mapped({"name": "extra", "flow": inline}, particles="beam"),
    ]
    body = composition_manifest(steps=steps)
    made = await reconcile(body, FlowOfFlowsStatus(), connect, settings)
    assert fake.deployment("beam-study-extra", "default") is not None
    outcome = await delete(body, made.status, connect)
    assert outcome.retry_in is None
    assert not fake.deployments
    (parent,) = fake.runs.values()
    assert parent.view.state.type == "CANCELLED"  # it had not started


@pytest.mark.asyncio
async def test_delete_orphan_leaves_everything(fake, connect, pipeline):
    status = with_deployment(fake, pipeline)
    fake.set_state(pipeline.parent, "RUNNING")
    outcome = await delete(composition_manifest(deletionPolicy="Orphan"), status, connect)
    assert not fake.calls and connect.backends == []
    assert events(outcome) == [("Normal", "Orphaned")] and outcome.retry_in is None
    assert fake.deployments and fake.runs[pipeline.parent].view.state.type == "RUNNING"


@pytest.mark.asyncio
async def test_delete_never_deployed_is_done(fake, connect):
    outcome = await delete(composition_manifest(), FlowOfFlowsStatus(), connect)
    assert outcome.retry_in is None and not fake.calls and connect.backends == []


@pytest.mark.asyncio
async def test_delete_holds_while_prefect_is_down(fake, connect, pipeline):
    status = with_deployment(fake, pipeline)
    fake.failure = PrefectUnreachable("down")
    outcome = await delete(composition_manifest(), status, connect, retry=2)
    assert outcome.retry_in == 4.0
    assert kstatus(outcome.status)["Reconciling"] == ("True", "PrefectUnreachable")
    assert fake.deployments


@pytest.mark.asyncio
async def test_delete_with_the_parent_run_gone_from_prefect(fake, connect, pipeline):
    status = with_deployment(fake, pipeline)
    fake.set_state(pipeline.parent, "COMPLETED")
    del fake.runs[pipeline.parent]
    outcome = await delete(composition_manifest(), status, connect)
    assert outcome.retry_in is None and not fake.deployments


@pytest.mark.asyncio
async def test_delete_rejected_is_stalled_not_retried(fake, connect, pipeline):
    status = with_deployment(fake, pipeline)
    fake.failure = PrefectRejected("403: forbidden", 403)
    outcome = await delete(composition_manifest(), status, connect, retry=2)
    assert kstatus(outcome.status)["Stalled"] == ("True", "PrefectRejected")
    # Decided: a refusal holds the finalizer Stalled, asked again only at the longest
    # backoff (a restored Secret or deletionPolicy: Orphan then takes effect), never a storm.
    assert outcome.retry_in == make_settings().max_backoff


@pytest.mark.asyncio
async def test_deployments_made_before_a_refused_run_are_deleted(connect, settings):
    class RefusesRuns(FakePrefect):
        async def create_flow_run(self, deployment_id, **kwargs):
            self._enter("create_flow_run")
            raise PrefectRejected("422: bad parameters", 422)

    fake = RefusesRuns()
    connect.prefect = fake
    body = composition_manifest()
    refused = await reconcile(body, FlowOfFlowsStatus(), connect, settings)
    assert kstatus(refused.status)["Stalled"] == ("True", "PrefectRejected")
    assert fake.deployments
    await delete(body, refused.status, connect)
    assert not fake.deployments


@pytest.mark.asyncio
async def test_a_new_generation_cancels_the_parent_run_in_flight(fake, connect):
    settings = make_settings()
    first = await reconcile(
        composition_manifest(generation=1), FlowOfFlowsStatus(), connect, settings
    )
    old = first.status.run.id
    fake.set_state(old, "RUNNING")
    child = fake.add_child(old, first.status.deployment_id, ["lume.dev/step=beam"])
    fake.set_state(child, "RUNNING")
    second = await reconcile(composition_manifest(generation=2), first.status, connect, settings)
    assert second.status.run.id != old and second.status.run.generation == 2
    assert fake.runs[old].view.state.type == "CANCELLING"
    assert fake.runs[child].view.state.type == "CANCELLING"
