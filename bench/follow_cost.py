"""Follow cost: Prefect requests per minute while the operator follows N runs in flight.

N LumeFlows (policy OnChange, so each gets a run at once) on 2 process SchedulingBackends
whose agents have no replicas: the runs stay Scheduled, in flight, for as long as the bench
measures. The operator (`kopf run -m lume_operator.handlers.operator`, follow interval
`--interval` s) talks to a real Prefect server through a counting reverse proxy (the one of
bench/operator_throughput.py); once every LumeFlow has its run, requests are counted over a
`--window` of seconds and printed per minute, beside what the per-object design costs (one
read per LumeFlow per interval: N x 60 / interval).

    python bench/follow_cost.py [--n 1000] [--interval 5] [--window 60]
"""

# ruff: noqa: E402  (the tests' imports follow the sys.path fix below)
from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "operator")]

from bench.operator_throughput import (
    LF,
    SB,
    CountingProxy,
    Operator,
    emulator_server,
    kubeconfig_for,
    post,
    proxy_main,
    status_of,
    wait_for,
)
from tests.k8s.prefect_server import PrefectServer

FLOW_RUN_READS = ("POST /api/flow_runs/filter", "GET /api/flow_runs/{id}")


def backend_body(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "lume.dev/v1alpha1",
        "kind": "SchedulingBackend",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"type": "process", "agent": {"replicas": 0}},
    }


def flow_body(index: int) -> dict[str, Any]:
    return {
        "apiVersion": "lume.dev/v1alpha1",
        "kind": "LumeFlow",
        "metadata": {"name": f"flow-{index:05d}", "namespace": "default"},
        "spec": {
            "backendRef": {"name": "a" if index % 2 else "b"},
            "entrypoint": "flows/beam.py:beam_stats",
            "parameters": {"seed": index},
            "run": {"policy": "OnChange"},
        },
    }


def measure(n: int, interval: float, window: float, work: Path, timeout: float) -> dict[str, Any]:
    prefect = PrefectServer(work / "prefect").start()
    proxy = CountingProxy(prefect.api_url.removesuffix("/api")).start()
    env = {"LUME_OPERATOR_FOLLOW_INTERVAL": str(interval), "PREFECT_API_URL": proxy.api_url}
    names = [f"flow-{i:05d}" for i in range(n)]
    try:
        with emulator_server() as server:
            operator = Operator(
                "lume_operator.handlers.operator",
                server,
                kubeconfig_for(server, work),
                work / "operator.log",
            ).start(env)
            try:
                for name in ("a", "b"):
                    post(server, "schedulingbackends", backend_body(name))
                    wait_for(
                        f"work pool of {name}",
                        lambda name=name: status_of(server, SB, name).get("workPoolId"),
                        timeout=120,
                    )
                with concurrent.futures.ThreadPoolExecutor(16) as pool:
                    list(pool.map(lambda i: post(server, "lumeflows", flow_body(i)), range(n)))
                wait_for(
                    "every LumeFlow with its run",
                    lambda: all(
                        (status_of(server, LF, m).get("lastRun") or {}).get("id") for m in names
                    ),
                    timeout,
                    interval=0.5,
                )
                time.sleep(2 * interval)  # the first reads of each new run are behind us
                before = proxy.counts()
                time.sleep(window)
                after = proxy.counts()
            finally:
                operator.stop()
    finally:
        proxy.stop()
        prefect.stop()
    delta = {key: after[key] - before.get(key, 0) for key in after}
    per_minute = 60.0 / window
    return {
        "all": sum(delta.values()) * per_minute,
        "run reads": sum(delta.get(key, 0) for key in FLOW_RUN_READS) * per_minute,
        "per-object design": n * 60.0 / interval,
        "detail": {k: round(v * per_minute) for k, v in sorted(delta.items()) if v},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="LumeFlows with a run in flight")
    parser.add_argument("--interval", type=float, default=5.0, help="follow interval (s)")
    parser.add_argument("--window", type=float, default=60.0, help="seconds counted")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to set up")
    parser.add_argument("--proxy", nargs=2, metavar=("TARGET", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.proxy:
        proxy_main(args.proxy[0], int(args.proxy[1]))
        return
    print(f"cores: {os.cpu_count()}; N={args.n} on 2 backends; interval {args.interval} s")
    with tempfile.TemporaryDirectory(prefix="lume-bench-follow-") as tmp:
        found = measure(args.n, args.interval, args.window, Path(tmp), args.timeout)
    print(f"requests to Prefect per minute, following: {found['all']:.0f}")
    print(f"  of them flow-run reads: {found['run reads']:.0f}")
    print(f"  the per-object design's flow-run reads: {found['per-object design']:.0f}")
    print(f"  ratio: {found['run reads'] / found['per-object design']:.3f}")
    print(f"  by request: {found['detail']}")


if __name__ == "__main__":
    main()
