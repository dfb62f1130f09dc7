"""How `lume-operator run` follows its runs: it reads them every 0.3 s while any is going."""

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


def test_following_ends_as_the_last_run_ends_without_another_pause(tmp_path: Path, monkeypatch):
    """The pause between reads is for runs still going: after the last one ended, the run
    ended too (it had waited 0.3 s more, on every `lume-operator run`)."""
    pauses: list[float] = []

    async def pause(seconds: float) -> None:
        pauses.append(seconds)

    monkeypatch.setattr(runner_module.anyio, "sleep", pause)
    runner = LocalRunner(Console(file=io.StringIO()), tmp_path, timeout=60)
    anyio.run(runner._follow, None, [_EndsAfter(1), _EndsAfter(3)])
    assert pauses == [0.3, 0.3]
