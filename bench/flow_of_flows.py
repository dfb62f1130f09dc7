"""FlowOfFlows overhead and parallelism on the real (embedded) Prefect server.

(a) A chain of 5 trivial steps run by lume-operator (a FlowOfFlows: parent flow, child runs
    of the step's deployment, raw mappings, flow runs started warm from a fork server) against
    the same chain written by hand as a Prefect parent flow calling `run_deployment`, on
    Prefect's own ProcessWorker (a new interpreter per run). Same server, same poll interval.
    Printed as a ratio of wall times; target at most 0.5.
(b) 8 independent steps that each sleep 2 s: the composition's wall time with warm starts
    (the median of `--fan-outs` in a row, each printed) beside the same composition with cold
    starts (each run a new interpreter); target under 6 s on 2 cores (the floor is 2 s).

Both sides run in this process against one embedded server, with in-process workers that start
each flow run as a process, as `lume-operator run` does.

    python bench/flow_of_flows.py [--repeat 2] [--length 5] [--only-fan-out] [--fan-outs 3]
        [--trace]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime
from os import cpu_count
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="lume-bench-prefect-"))
os.environ.pop("PREFECT_API_URL", None)

import anyio  # noqa: E402
from rich.console import Console  # noqa: E402

from lume_operator.api.manifests import Manifests, parse_resource  # noqa: E402
from lume_operator.local.checks import plan  # noqa: E402
from lume_operator.local.preload import preload_for  # noqa: E402
from lume_operator.local.runner import LocalRunner  # noqa: E402
from lume_operator.prefect.forkserver import ForkServer  # noqa: E402

FLOWS = Path(__file__).resolve().parent / "flows"
POLL = 0.5


def resource(body: dict) -> object:
    parsed, problems = parse_resource(body, "bench")
    assert parsed is not None, problems
    return parsed


def manifests(steps: list[dict], flows: list[tuple[str, str]]) -> Manifests:
    meta = {"namespace": "bench"}
    backend = resource(
        {
            "apiVersion": "lume.dev/v1alpha1",
            "kind": "SchedulingBackend",
            "metadata": {"name": "local", **meta},
            "spec": {"type": "process"},
        }
    )
    lume_flows = [
        resource(
            {
                "apiVersion": "lume.dev/v1alpha1",
                "kind": "LumeFlow",
                "metadata": {"name": name, **meta},
                "spec": {
                    "backendRef": {"name": "local"},
                    "entrypoint": f"chain.py:{function}",
                    "source": {"path": str(FLOWS)},
                },
            }
        )
        for name, function in flows
    ]
    fof = resource(
        {
            "apiVersion": "lume.dev/v1alpha1",
            "kind": "FlowOfFlows",
            "metadata": {"name": f"bench-{uuid.uuid4().hex[:6]}", **meta},
            "spec": {"steps": steps},
        }
    )
    return Manifests(backends=[backend], flows=lume_flows, compositions=[fof])


def chain(length: int) -> Manifests:
    steps = [{"name": "s1", "flowRef": {"name": "increment"}}]
    for index in range(2, length + 1):
        steps.append(
            {
                "name": f"s{index}",
                "flowRef": {"name": "increment"},
                "mappedParameters": {
                    "x": {"parentFlow": f"s{index - 1}", "mapType": "raw", "attributeIndex": ["x"]}
                },
            }
        )
    return manifests(steps, [("increment", "increment")])


def fan_out(width: int, seconds: float) -> Manifests:
    steps = [
        {"name": f"p{i}", "flowRef": {"name": "sleeper"}, "parameters": {"seconds": seconds}}
        for i in range(width)
    ]
    return manifests(steps, [("sleeper", "sleeper")])


# As `lume-operator run` does: one fork server, started before Prefect's server.
FORK_SERVER: ForkServer | None = None
# --trace: the runner's progress on stderr, timed, beside Prefect's log (where time goes).
TRACE = False


class _Stamped(io.TextIOBase):
    """stderr with the time before each line, as Prefect's log has it."""

    def write(self, text: str) -> int:
        for line in text.splitlines(keepends=True):
            stamp = datetime.now().strftime("%H:%M:%S.%f")[:-3]
            sys.stderr.write(f"{stamp} | lume | {line}" if line.strip() else line)
        return len(text)


def run_composition(given: Manifests, results: Path, warm: bool = True) -> tuple[float, object]:
    _, compositions, problems = plan(given)
    assert not problems, problems
    runner = LocalRunner(
        Console(file=_Stamped(), width=200) if TRACE else Console(file=io.StringIO()),
        results,
        timeout=600,
        poll_interval=POLL,
        warm_starts=warm,
        fork_server=FORK_SERVER if warm else None,
    )
    started = time.perf_counter()
    if TRACE:
        print(f"{datetime.now().time()} composition starts", file=sys.stderr)
    anyio.run(runner.run, [], compositions)
    elapsed = time.perf_counter() - started
    if TRACE:
        print(f"{datetime.now().time()} composition ended", file=sys.stderr)
    composition = compositions[0]
    assert composition.status.phase == "Completed", composition.error
    return elapsed, composition


async def hand_written(length: int) -> float:
    """The same chain as a hand-written parent flow, deployed and run on the same worker."""
    from prefect.workers.process import ProcessWorker

    from lume_operator.prefect.gateway import DeploymentSpec, PrefectGateway
    from lume_operator.reconcile.deploy import RESULT_ENV

    started = time.perf_counter()
    pull = [{"prefect.deployments.steps.set_working_directory": {"directory": str(FLOWS)}}]
    async with PrefectGateway.connect() as gateway:
        for flow_name, entrypoint in (("increment", "increment"), ("hand-chain", "hand_chain")):
            await gateway.ensure_deployment(
                DeploymentSpec(
                    flow_name=flow_name,
                    name="bench",
                    entrypoint=f"chain.py:{entrypoint}",
                    work_pool_name="bench-local",
                    work_queue_name="default",
                    job_variables={"env": dict(RESULT_ENV)},
                    parameters={},
                    tags=[],
                    pull_steps=pull,
                )
            )
        deployment = await gateway.client.read_deployment_by_name("hand-chain/bench")
        flow_run = await gateway.client.create_flow_run_from_deployment(
            deployment.id, parameters={"length": length, "poll_interval": POLL}
        )
        runner = LocalRunner(
            Console(file=io.StringIO()), Path("."), timeout=600, poll_interval=POLL
        )
        async with ProcessWorker(work_pool_name="bench-local") as worker:
            async with anyio.create_task_group() as group:
                group.start_soon(runner._poll_workers, [worker])
                while True:
                    flow_run = await gateway.client.read_flow_run(flow_run.id)
                    if flow_run.state and flow_run.state.is_final():
                        break
                    await anyio.sleep(0.3)
                group.cancel_scope.cancel()
        assert flow_run.state.is_completed(), flow_run.state
        assert await flow_run.state.aresult() == length
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--length", type=int, default=5)
    parser.add_argument("--only-fan-out", action="store_true")
    parser.add_argument("--fan-outs", type=int, default=3, help="warm fan-outs for (b)")
    parser.add_argument("--trace", action="store_true", help="the runner's progress, timed")
    args = parser.parse_args()
    if args.fan_outs < 1 or args.repeat < 1:
        parser.error("--fan-outs and --repeat must be at least 1")
    global TRACE
    TRACE = args.trace

    from lume_operator.prefect.server import prefect_api

    results = Path(tempfile.mkdtemp(prefix="lume-bench-results-"))
    global FORK_SERVER
    preload = preload_for([(FLOWS / "chain.py", FLOWS)])
    with ForkServer(preload).start() as FORK_SERVER, prefect_api() as (api_url, _):
        print(f"Prefect API: {api_url}")
        if not args.only_fan_out:
            chain_ratio(args, results)
        fan_out_report(results, args.fan_outs)


def chain_ratio(args: argparse.Namespace, results: Path) -> None:
    if True:
        ours, theirs = [], []
        # Warm-up, not counted: first deployments, imports, server caches.
        run_composition(chain(2), results)
        for round_ in range(args.repeat):
            ours.append(run_composition(chain(args.length), results)[0])
            theirs.append(anyio.run(hand_written, args.length))
            print(
                f"round {round_ + 1}: lume-operator {ours[-1]:.1f} s, hand-written {theirs[-1]:.1f} s"
            )
        ratio = statistics.median(ours) / statistics.median(theirs)
        print(
            f"(a) chain of {args.length}: lume-operator {statistics.median(ours):.1f} s, "
            f"run_deployment by hand {statistics.median(theirs):.1f} s, ratio {ratio:.2f} "
            "(target <= 0.5)"
        )


def fan_out_report(results: Path, fan_outs: int) -> None:
    """(b): `fan_outs` warm fan-outs in a row (their median is the figure), then one cold."""
    warm_walls, cold_wall = [], 0.0
    for warm in [True] * fan_outs + [False]:
        wall, composition = run_composition(fan_out(8, 2.0), results, warm=warm)
        if warm:
            warm_walls.append(wall)
        else:
            cold_wall = wall
        children = anyio.run(child_runs, composition.status.run.id)
        created = [datetime.fromisoformat(run.created_time) for run in children]
        started = [datetime.fromisoformat(run.start_time) for run in children]
        ended = [datetime.fromisoformat(run.end_time) for run in children]
        running = sum((e - s).total_seconds() for s, e in zip(started, ended, strict=True))
        print(
            f"(b) {'warm' if warm else 'cold'} starts: 8 independent steps of 2 s: {wall:.1f} s "
            f"wall.\n    the DAG created all 8 child runs within {spread(created):.2f} s; their "
            f"flows began over {spread(started):.1f} s ({cpu_count()} cores here); first start "
            f"to last end {(max(ended) - min(started)).total_seconds():.1f} s; sum of running "
            f"times {running:.1f} s"
        )
    warm = statistics.median(warm_walls)
    print(
        f"(b) 8 parallel 2 s steps: warm {warm:.1f} s (median of {len(warm_walls)}: "
        f"{', '.join(f'{w:.1f}' for w in warm_walls)}), cold {cold_wall:.1f} s, ratio "
        f"{warm / cold_wall:.2f} (target: warm under 6 s; a sequential run of the sleeps "
        "alone: 16 s)"
    )


async def child_runs(parent_id: str) -> list:
    from lume_operator.prefect.gateway import PrefectGateway

    async with PrefectGateway.connect() as gateway:
        return await gateway.child_runs(parent_id)


def spread(times: list[datetime]) -> float:
    return (max(times) - min(times)).total_seconds()


if __name__ == "__main__":
    main()
