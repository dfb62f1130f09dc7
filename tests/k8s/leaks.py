"""The canary search: secret values that must never appear in plain text outside their Secret.

Why one helper: every end-to-end test that hands a secret to lume-operator (a Prefect API key,
an object store's keys) ends by looking for it everywhere a user or an attacker with read
access could look: every version of every object in the cluster, the logs, and Prefect's
deployments, blocks, pools, runs and run logs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from tests.k8s.emulator import EmulatorServer
from tests.k8s.prefect_server import PrefectServer

PREFECT_COLLECTIONS = ("deployments", "block_documents", "work_pools", "flow_runs", "logs")


def assert_no_plain_text(
    secrets: Iterable[str],
    server: EmulatorServer,
    prefect: PrefectServer,
    logs: Mapping[str, str],
    *,
    secret_objects: Iterable[str] = (),
) -> None:
    """Fail naming where any of `secrets` shows; Secrets named in `secret_objects` (which hold
    them, base64-encoded) are the only objects skipped."""
    values = [s for s in secrets if s]
    assert values, "no secret to look for"
    skipped = set(secret_objects)

    def leaks(text: str) -> bool:
        return any(value in text for value in values)

    checked = 0
    for (resource, _namespace, name), stored in list(server.emulator._objects.items()):
        if resource.plural == "secrets" and name in skipped:
            continue
        for version in stored.history.raw:
            if version is not None:
                text = json.dumps(version.raw, default=str)
                assert not leaks(text), f"{resource.plural}/{name} holds a secret in plain text"
                checked += 1
    assert checked > 10, "too few objects to prove anything"
    for where, text in logs.items():
        shown = [line for line in text.splitlines() if leaks(line)][:3]
        assert not shown, f"the {where} log shows a secret: {shown}"
    for collection in PREFECT_COLLECTIONS:
        listed = prefect._list(collection)
        assert not leaks(json.dumps(listed)), f"Prefect's {collection} hold a secret"
