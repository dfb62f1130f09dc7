"""How `lume-operator run` follows its runs: it reads them every 0.3 s while any is going, or
sooner when one is announced ended."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import anyio
import pytest
from rich.console import Console

from lume_operator.local import runner as runner_module
from lume_operator.local.runner import LocalRunner

pytestmark = pytest.mark.unit


class _EndsAfter:
    """A watch whose run is final at its `polls`-th read."""

    def __init__(self, polls: int) -> None:
        self.left = polls

    async def poll(self, gateway: Any) -> bool:
        self.left -= 1
        return self.left == 0


def test_following_ends_as_the_last_run_ends_without_another_pause(tmp_path: Path):
    """The pause between reads is for runs still going: after the last one ended, the run
    ended too (it had waited 0.3 s more, on every `lume-operator run`)."""
    runner = LocalRunner(Console(file=io.StringIO()), tmp_path, timeout=60)
    pauses: list[str] = []

    async def pause() -> None:
        pauses.append("pause")

    runner._pause = pause  # type: ignore[method-assign]
    anyio.run(runner._follow, None, [_EndsAfter(1), _EndsAfter(3)])
    assert pauses == ["pause", "pause"]


def test_a_pause_lasts_the_interval_or_until_a_run_is_announced_ended(tmp_path: Path, monkeypatch):
    runner = LocalRunner(Console(file=io.StringIO()), tmp_path, timeout=60)

    async def pause(interval: float, woken: bool) -> float:
        monkeypatch.setattr(runner_module, "FOLLOW_INTERVAL", interval)
        started = anyio.current_time()
        async with anyio.create_task_group() as group:
            group.start_soon(runner._pause)
            await anyio.sleep(0)
            if woken:
                runner._wake.set()
        return anyio.current_time() - started

    assert anyio.run(pause, 0.05, False) >= 0.05
    assert anyio.run(pause, 600.0, True) < 60
