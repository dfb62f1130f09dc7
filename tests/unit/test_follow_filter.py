"""kopf runs a LumeFlow's follow timer only while it has something to follow: the filter on
the raw object agrees with the decision the timer itself makes on the parsed one."""

from __future__ import annotations

from typing import Any

import pytest

from lume_operator.api.flow import LumeFlowStatus
from lume_operator.reconcile.lumeflow import needs_following, parse_object, wants_following
from lume_operator.reconcile.outcome import status_of

pytestmark = pytest.mark.unit


def _body(policy: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"backendRef": {"name": "local"}, "entrypoint": "flows/f.py:f"}
    if policy:
        spec["run"] = {"policy": policy}
        if policy == "Schedule":
            spec["run"]["cron"] = "*/5 * * * *"
    return {
        "apiVersion": "lume.dev/v1alpha1",
        "kind": "LumeFlow",
        "metadata": {"name": "f", "namespace": "default", "uid": "u1"},
        "spec": spec,
    }


RUN = {"id": "r1", "stateType": "RUNNING"}
DONE = {"id": "r1", "stateType": "COMPLETED"}
CASES = [
    ("OnChange", {}, False),  # not deployed yet: the reconcile handler's business
    ("OnChange", {"deploymentId": "d"}, False),  # deployed, nothing ever ran
    ("OnRequest", {"deploymentId": "d", "lastRun": RUN}, True),
    (None, {"deploymentId": "d", "lastRun": RUN}, True),  # the default policy
    ("OnChange", {"deploymentId": "d", "lastRun": DONE, "phase": "Running"}, True),  # end due
    ("OnChange", {"deploymentId": "d", "lastRun": DONE, "phase": "Completed"}, False),
    ("OnChange", {"deploymentId": "d", "runs": [RUN, DONE], "phase": "Completed"}, True),
    ("Schedule", {"deploymentId": "d"}, True),  # Prefect starts its runs: always read
    ("OnChange", {"deploymentId": 5, "lastRun": "bad"}, False),  # unreadable: as the timer
]


@pytest.mark.parametrize(("policy", "status", "expected"), CASES)
def test_the_timer_runs_exactly_while_there_is_something_to_follow(policy, status, expected):
    body = _body(policy)
    assert wants_following(body, status) is expected
    flow, problem = parse_object(body)
    assert problem is None
    assert needs_following(flow, status_of(LumeFlowStatus, status)) is expected
