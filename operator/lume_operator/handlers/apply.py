"""What the kopf handlers share: the operator's state (memo), the Prefect connector, and how an
`Outcome` is written back (status patch, events, retry)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import kopf

from lume_operator.api.backend import SchedulingBackend
from lume_operator.api.common import Model, SecretKeyRef
from lume_operator.handlers.kube import Kube, SecretMissing
from lume_operator.prefect.batching import Batched, RunReader
from lume_operator.prefect.gateway import PrefectGateway
from lume_operator.prefect.limiter import AdaptiveLimit
from lume_operator.prefect.port import PrefectNotConfigured, PrefectPort
from lume_operator.reconcile.backend import api_url_of
from lume_operator.reconcile.flowofflows import StepObservation
from lume_operator.reconcile.outcome import Found, Outcome
from lume_operator.results.storage import RunStorage, reader_storage
from lume_operator.settings import OperatorSettings

logger = logging.getLogger(__name__)


ARRIVAL_QUIET = 0.1  # seconds without a new LumeFlow before Prefect calls go on
ARRIVAL_LONGEST = 5.0  # seconds after a burst's first arrival that calls wait, at most


@dataclass
class Arrivals:
    """New LumeFlows arriving in a burst hold the operator's Prefect calls back a little.

    While hundreds of objects arrive at once (a GitOps sync), each first status is a patch of
    kopf's event loop, and each deployment's Prefect calls take the same loop: on a fast
    Prefect server the deployments of the first objects delayed the first statuses of the
    others (1.8x a do-nothing operator's at N = 1000 on PostgreSQL). A burst is two or more
    new objects, each within `quiet` seconds of the last; while one goes on, each Prefect call
    waits, once it holds its slot of the API's limit (`AdaptiveLimit.gate`), until no new
    object came for `quiet` seconds, and at most until `longest` seconds after the burst
    began. A single new object waits for nothing.

    The hold is per call, not per object: when the API server pauses in an apply (0.2 to
    0.8 s seen in one of a thousand), no more calls start in the pause than the limit has
    slots, and the next arrival holds the rest again. Held once per object, before its first
    call, a pause let every object taken up so far deploy in the middle of the apply: first
    statuses took 1.4 to 1.7x the do-nothing operator's with a 0.1 s quiet time, and the
    quiet time had to be 0.5 s, which a burst's deployments then waited after its end.

    One caller times the quiet and the others wait on it: a thousand callers each sleeping
    until the next possible end woke every `quiet` seconds, 5% of the operator's time.
    """

    quiet: float = ARRIVAL_QUIET
    longest: float = ARRIVAL_LONGEST
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    last: float = float("-inf")
    began: float = float("-inf")
    count: int = 0
    _calm: asyncio.Event | None = None

    def seen(self) -> None:
        now = self.clock()
        if now - self.last >= self.quiet:
            self.began, self.count = now, 0
        self.last, self.count = now, self.count + 1

    def _left(self) -> float:
        if self.count < 2:
            return 0.0
        return min(self.last + self.quiet, self.began + self.longest) - self.clock()

    async def settled(self) -> None:
        while self._left() > 0:
            if self._calm is not None:
                await self._calm.wait()  # and look again: the timer may have been cancelled
                continue
            calm = self._calm = asyncio.Event()
            try:
                while (wait := self._left()) > 0:
                    await self.sleep(wait)
            finally:
                self._calm = None
                calm.set()


@dataclass
class State:
    """One operator run's settings and clients, kept in kopf's memo.

    One Prefect client (and connection pool) per API and credentials for the operator's
    lifetime, one `RunReader` per API (runs in flight read once per interval for every
    object), and Secret values kept `settings.secret_ttl` seconds: following a thousand runs
    costs requests per backend, not per object. Calls to one API share one `AdaptiveLimit`.
    """

    settings: OperatorSettings
    kube: Kube
    # Steps of composition runs already seen final (see follow_composition).
    observed: dict[str, dict[str, StepObservation]] = field(default_factory=dict)
    clients: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)
    gateways: dict[tuple[str, str | None, str | None], PrefectGateway] = field(default_factory=dict)
    readers: dict[str, RunReader] = field(default_factory=dict)
    limits: dict[str, AdaptiveLimit] = field(default_factory=dict)
    secrets: dict[tuple[str, str, str], tuple[str, float]] = field(default_factory=dict)
    arrivals: Arrivals = field(default_factory=Arrivals)
    _opening: asyncio.Lock = field(default_factory=asyncio.Lock)

    @contextlib.asynccontextmanager
    async def connect(self, backend: SchedulingBackend) -> AsyncIterator[PrefectPort]:
        """The Prefect API of a backend, its key read from the Secret it names (never logged).

        Each call takes a slot of the API's limit before its timeout starts: an apply of
        hundreds of objects queues here instead of flooding Prefect until calls time out.
        While new LumeFlows are still being taken up, a call holding its slot waits
        (`Arrivals`).
        """
        api_url = api_url_of(backend, self.settings)
        if not api_url:
            raise PrefectNotConfigured(
                "NoPrefectAPI",
                "no Prefect API: set spec.prefect.apiUrl or the operator's PREFECT_API_URL",
            )
        prefect = backend.spec.prefect
        namespace = backend.metadata.namespace
        try:
            api_key = await self._secret(namespace, prefect.api_key_secret_ref if prefect else None)
            auth = await self._secret(
                namespace, prefect.auth_string_secret_ref if prefect else None
            )
        except SecretMissing as error:
            raise PrefectNotConfigured(error.reason, str(error)) from None
        default_auth = self.settings.default_api_auth_string
        if auth is None and default_auth and not (prefect and prefect.api_url):
            auth = default_auth.get_secret_value()  # the operator's own default API
        gateway = await self._gateway(api_url, api_key, auth)
        reader = self.readers.get(api_url)
        if reader is None:
            reader = self.readers[api_url] = RunReader(max_age=self.settings.follow_interval * 0.9)
        yield Batched(gateway, reader)

    async def storage(self, backend: SchedulingBackend) -> RunStorage:
        """A backend's declared result storage as the operator reads it: an object store with
        the keys read from its Secret (passed to s3fs, never to env or a log), or the claim
        where this pod mounts it (`<volumes_root>/<namespace>/<claimName>`)."""
        declared = backend.spec.result_storage
        assert declared is not None
        namespace = backend.metadata.namespace
        if declared.object_store:
            ref = declared.object_store.credentials_secret_ref
            if ref is None:
                return reader_storage(declared)  # the operator's ambient credentials
            try:
                key_id = await self._secret(
                    namespace, SecretKeyRef(name=ref.name, key=ref.access_key_id_key)
                )
                secret = await self._secret(
                    namespace, SecretKeyRef(name=ref.name, key=ref.secret_access_key_key)
                )
            except SecretMissing as error:
                raise PrefectNotConfigured(
                    "SecretNotFound", f"result storage credentials: {error}"
                ) from None
            assert key_id is not None and secret is not None
            return reader_storage(declared, credentials=(key_id, secret))
        assert declared.volume is not None
        claim = declared.volume.claim_name
        path = self.settings.volumes_root / namespace / claim
        if not path.is_dir():
            raise PrefectNotConfigured(
                "ResultStorageNotMounted",
                f"result storage: claim {claim!r} of namespace {namespace!r} is not mounted in "
                f"the operator at {path}: add it to the chart's resultVolumes",
            )
        return reader_storage(declared, volume_path=path)

    async def _gateway(self, api_url: str, api_key: str | None, auth: str | None) -> PrefectGateway:
        key = (api_url, api_key, auth)
        if key not in self.gateways:
            async with self._opening:
                if key not in self.gateways:
                    limit = self.limits.get(api_url)
                    if limit is None:
                        limit = self.limits[api_url] = AdaptiveLimit(
                            gate=self.arrivals.settled,
                            initial=self.settings.prefect_concurrency,
                            maximum=max(
                                self.settings.prefect_concurrency,
                                self.settings.prefect_concurrency_max,
                            ),
                        )
                    self.gateways[key] = await self.clients.enter_async_context(
                        PrefectGateway.connect(
                            api_url=api_url,
                            api_key=api_key,
                            auth_string=auth,
                            timeout=self.settings.prefect_timeout,
                            limit=limit,
                            retries=False,
                        )
                    )
        return self.gateways[key]

    async def _secret(self, namespace: str, ref: Any) -> str | None:
        if ref is None:
            return None
        key = (namespace, ref.name, ref.key)
        cached = self.secrets.get(key)
        if cached and time.monotonic() - cached[1] < self.settings.secret_ttl:
            return cached[0]
        value = await self.kube.secret_value(namespace, ref.name, ref.key)
        self.secrets[key] = (value, time.monotonic())
        return value

    async def close(self) -> None:
        """Close the Prefect clients (at the operator's end)."""
        await self.clients.aclose()
        self.gateways.clear()


def state_of(memo: kopf.Memo) -> State:
    return memo["lume"]


def manifest(body: kopf.Body) -> dict[str, Any]:
    """The object as a plain dict, without its status (ours, not the user's)."""
    return {key: value for key, value in dict(body).items() if key != "status"}


def found(index: kopf.Index, key: tuple[str, str]) -> Found | None:
    """The first entry of an index key, as plain data."""
    entry = next(iter(index.get(key, [])), None)
    return Found(entry["body"], entry["status"]) if entry else None


def in_namespace(index: kopf.Index, namespace: str) -> dict[str, Found]:
    """Every object of a namespace in an index, by name."""
    return {
        name: Found(entry["body"], entry["status"])
        for (ns, name), entries in index.items()
        if ns == namespace
        for entry in entries
    }


def status_patch(old: dict[str, Any], new: Model) -> dict[str, Any]:
    """A merge patch from `old` to `new`: changed keys, and None for the model's keys removed."""
    wire = new.to_wire()
    patch = {key: value for key, value in wire.items() if old.get(key) != value}
    for name, info in type(new).model_fields.items():
        key = info.alias or name
        if key in old and key not in wire:
            patch[key] = None
    return patch


def apply_outcome(
    outcome: Outcome[Any] | None, body: kopf.Body, status: dict[str, Any], patch: kopf.Patch
) -> None:
    """Write the outcome: status changes into kopf's patch, events, then a retry if asked."""
    if outcome is None:
        return
    for key, value in status_patch(status, outcome.status).items():
        patch.status[key] = value
    for event in outcome.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)
    if outcome.retry_in is not None:
        raise kopf.TemporaryError(outcome.retry_message, delay=outcome.retry_in)


async def publish(state: State, plural: str, body: kopf.Body, status: Model) -> None:
    """Write a status now, not when the handler returns (a first `Deploying`)."""
    meta = body.metadata
    try:
        await state.kube.patch_own_status(plural, meta.namespace, meta.name, status.to_wire())
    except Exception as error:  # only a courtesy: the handler's own patch follows anyway
        logger.warning("could not write the first status: %s", error)
