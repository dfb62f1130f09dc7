"""Trivial flows for bench/flow_of_flows.py, and the hand-written baseline parent flow."""

from __future__ import annotations

import time

from prefect import flow
from prefect.deployments import run_deployment


@flow(name="increment")
def increment(x: int = 0) -> dict:
    return {"x": x + 1}


@flow(name="sleeper")
def sleeper(seconds: float = 2.0) -> dict:
    time.sleep(seconds)
    return {"slept": seconds}


@flow(name="hand-chain")
async def hand_chain(length: int = 5, poll_interval: float = 0.5) -> int:
    """The baseline: a parent flow calling run_deployment step after step, passing results on."""
    x = 0
    for _ in range(length):
        flow_run = await run_deployment(
            name="increment/bench", parameters={"x": x}, poll_interval=poll_interval
        )
        x = (await flow_run.state.aresult())["x"]
    return x
