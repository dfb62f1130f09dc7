"""Reads of runs in flight, batched: one request per Prefect API per interval, however many
objects follow runs there.

Each LumeFlow's timer asks for its own runs; asked one by one, 1000 runs in flight are 1000
requests per interval to one server. `RunReader` keeps every id asked for in the last round
and answers from one snapshot read for all of them (in chunks of `chunk` ids), taken at most
once per `max_age` seconds; an id it has not seen yet is read alone at once.
`Batched` is the port with its run reads going through a reader; everything else passes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from lume_operator.prefect.port import FlowRunView, PrefectPort


class RunReader:
    """One snapshot of the runs asked for, shared by every caller of one Prefect API."""

    def __init__(
        self, max_age: float, chunk: int = 200, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_age, self.chunk, self.clock = max_age, chunk, clock
        self.wanted: set[str] = set()
        self.snapshot: dict[str, FlowRunView] = {}
        self.taken_at = float("-inf")
        self.requests = 0
        self._lock = asyncio.Lock()

    async def read(self, prefect: PrefectPort, ids: list[str]) -> list[FlowRunView]:
        self.wanted.update(ids)
        async with self._lock:
            if self.clock() - self.taken_at >= self.max_age:
                await self._refresh(prefect)
            missing = [run_id for run_id in ids if run_id not in self.snapshot]
            if missing:  # a run just created: read it alone, the snapshot keeps its age
                self.requests += 1
                self.snapshot.update({v.id: v for v in await prefect.read_flow_runs(missing)})
        return [self.snapshot[run_id] for run_id in ids if run_id in self.snapshot]

    async def _refresh(self, prefect: PrefectPort) -> None:
        wanted = sorted(self.wanted)
        views: list[FlowRunView] = []
        for start in range(0, len(wanted), self.chunk):
            views += await prefect.read_flow_runs(wanted[start : start + self.chunk])
            self.requests += 1
        self.snapshot = {view.id: view for view in views}
        self.taken_at = self.clock()
        # Runs that ended are answered from this snapshot; from now on, only open ones are
        # read again (an ended run asked for again is read once more, then dropped). Ids
        # asked for while this read was under way are kept for the next one: dropped, each
        # would be read alone at every interval (at 400 runs, 8 requests per second).
        added = self.wanted.difference(wanted)
        self.wanted = {view.id for view in views if not view.final} | added


class Batched:
    """A port whose `read_flow_runs` is answered by a shared `RunReader`."""

    def __init__(self, prefect: PrefectPort, reader: RunReader) -> None:
        self._prefect, self._reader = prefect, reader

    async def read_flow_runs(self, flow_run_ids: list[str]) -> list[FlowRunView]:
        if not flow_run_ids:
            return []
        return await self._reader.read(self._prefect, flow_run_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._prefect, name)
