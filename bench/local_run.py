"""Time `lume-operator run` on the example against the same flow run with plain Prefect.

Both sides do the same work from a cold process: start Prefect's embedded server, create a
process work pool and a deployment of examples/beam, create one flow run, execute it with an
in-process worker, and read its result. lume-operator adds its checks (spec, parameters),
status and result discovery, and starts the flow run warm (forked from a fork server that
imported Prefect and the flow's installed dependencies while Prefect's server started); the
baseline is Prefect's own ProcessWorker, a new interpreter per run. Both start with a new
Prefect home; lume-operator's embedded server begins from the copy of a migrated database that
its first run on the machine keeps (that first run is printed, not counted). Target: at most
0.7.

    python bench/local_run.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "beam"
PARAMETERS = {"n_particles": 200000, "sigma_x": 0.001, "sigma_px": 0.0001, "correlation": 0.5}


def plain_prefect(results_dir: str) -> None:
    """The baseline: the same run written by hand with Prefect's own API."""
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessWorker

    server = SubprocessASGIServer()
    server.start(timeout=120)  # as lume-operator waits for its own
    os.environ["PREFECT_API_URL"] = server.api_url

    async def main() -> None:
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(name="plain", type="process"))
            flow_id = await client.create_flow_from_name("beam-stats")
            env = {
                "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
                "PREFECT_TASKS_DEFAULT_PERSIST_RESULT": "false",
                "PREFECT_RESULTS_DEFAULT_SERIALIZER": "json",
                "LUME_RESULTS_DIR": results_dir,
            }
            deployment_id = await client.create_deployment(
                flow_id=flow_id,
                name="plain",
                entrypoint="flows/beam.py:beam_stats",
                work_pool_name="plain",
                pull_steps=[
                    {"prefect.deployments.steps.set_working_directory": {"directory": str(EXAMPLE)}}
                ],
                job_variables={"env": env},
            )
            run = await client.create_flow_run_from_deployment(deployment_id, parameters=PARAMETERS)
            async with ProcessWorker(work_pool_name="plain") as worker:
                while True:
                    await worker.get_and_submit_flow_runs()
                    run = await client.read_flow_run(run.id)
                    if run.state and run.state.is_final():
                        break
                    await anyio.sleep(0.3)
            assert run.state.is_completed(), run.state
            print(await run.state.aresult())

    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        anyio.run(main)
    server.stop()


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline", metavar="RESULTS_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        plain_prefect(args.baseline)
        return
    cache = tempfile.mkdtemp(prefix="lume-bench-cache-")

    def ours_once(tmp: str, index: int, env: dict[str, str]) -> float:
        env = {**env, "PREFECT_HOME": f"{tmp}/home-ours-{index}", "LUME_OPERATOR_CACHE_DIR": cache}
        command = [sys.executable, "-m", "lume_operator.cli", "run", "-f", str(EXAMPLE)]
        return timed([*command, "--results-dir", f"{tmp}/ours-{index}"], env)

    base = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    base.pop("PREFECT_API_URL", None)
    with tempfile.TemporaryDirectory() as tmp:
        # The first run on a machine migrates a new Prefect database, as the baseline always
        # does, and keeps a copy for later runs (LUME_OPERATOR_CACHE_DIR): timed, not counted.
        print(f"first run (fills the cache): lume-operator {ours_once(tmp, -1, base):.2f} s")
    ours, plain = [], []
    for index in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            env = {**base, "PREFECT_HOME": f"{tmp}/home-{index}"}
            plain.append(timed([sys.executable, __file__, "--baseline", f"{tmp}/plain"], env))
            ours.append(ours_once(tmp, index, base))
        print(f"run {index + 1}: lume-operator {ours[-1]:.2f} s, plain Prefect {plain[-1]:.2f} s")
    ratio = statistics.median(ours) / statistics.median(plain)
    print(
        f"median: lume-operator {statistics.median(ours):.2f} s, plain Prefect {statistics.median(plain):.2f} s"
    )
    print(f"ratio lume-operator / plain Prefect: {ratio:.2f} (target <= 0.7)")


if __name__ == "__main__":
    main()
