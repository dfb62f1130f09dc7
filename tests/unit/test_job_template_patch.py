"""A kubernetes backend's jobTemplatePatch: merged into its pool's Job, or refused in status.

The Job a run gets is what the real prefect-kubernetes worker makes of the patched template
(`KubernetesWorkerJobConfiguration`), so a patch is tested where it takes effect.
"""

from __future__ import annotations

import uuid

import pytest
from prefect.client.schemas.objects import FlowRun
from pydantic import ValidationError

from lume_operator.api.backend import SchedulingBackend, SchedulingBackendStatus
from lume_operator.backends import get_backend
from lume_operator.backends.kubernetes import patch_job_template
from lume_operator.reconcile.backend import pool_template, reconcile_backend
from tests.test_backends import configure
from tests.unit.conftest import backend_manifest, cond, events

pytestmark = pytest.mark.unit

PATCH = {
    "metadata": {"annotations": {"lume.dev/team": "beams"}},
    "spec": {
        "template": {
            "metadata": {
                "annotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}
            },
            "spec": {
                "priorityClassName": "batch-low",
                "containers": [
                    {"name": "prefect-job", "env": [{"name": "MALLOC_ARENA_MAX", "value": "2"}]}
                ],
            },
        }
    },
}


def kubernetes_backend(patch: dict) -> SchedulingBackend:
    body = backend_manifest(
        type="kubernetes", jobTemplatePatch=patch, runConfig={"image": "flow:1"}
    )
    return SchedulingBackend.model_validate(body)


def test_a_patch_reaches_the_job_the_real_worker_makes() -> None:
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    backend = kubernetes_backend(PATCH)
    template = pool_template(backend, "kubernetes")
    runner = get_backend("kubernetes")
    config, _ = runner.run_config(backend.spec.run_config)
    job_config = configure(KubernetesWorkerJobConfiguration, template, runner.job_variables(config))
    job_config.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="run"))
    job = job_config.job_manifest
    assert job["metadata"]["annotations"]["lume.dev/team"] == "beams"
    pod = job["spec"]["template"]
    assert (
        pod["metadata"]["annotations"]["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
    )
    assert pod["spec"]["priorityClassName"] == "batch-low"
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "flow:1"  # what lume-operator renders is kept
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MALLOC_ARENA_MAX"] == "2" and env["HOME"] == "/tmp"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (
            {
                "spec": {
                    "template": {
                        "spec": {
                            "containers": [
                                {"name": "prefect-job", "securityContext": {"privileged": True}}
                            ]
                        }
                    }
                }
            },
            "would fail Pod Security restricted: Privileged Containers",
        ),
        (
            {
                "spec": {
                    "template": {
                        "spec": {"volumes": [{"name": "host", "hostPath": {"path": "/var/run"}}]}
                    }
                }
            },
            "would fail Pod Security restricted",
        ),
        (
            {
                "spec": {
                    "template": {
                        "spec": {
                            "containers": [
                                {"name": "prefect-job", "securityContext": {"$patch": "replace"}}
                            ]
                        }
                    }
                }
            },
            "would fail Pod Security restricted",
        ),
        (
            {"spec": {"template": {"spec": {"serviceAccountName": "{{ service_account_name }}x"}}}},
            "spec.jobTemplatePatch.spec.template.spec.serviceAccountName: Prefect placeholders",
        ),
        ({"kind": "Pod"}, "spec.jobTemplatePatch: the manifest must stay a batch/v1 Job"),
        (
            {"spec": {"template": {"spec": {"containers": [{"image": "x"}]}}}},
            "spec.jobTemplatePatch: containers: each item needs its merge key 'name'",
        ),
    ],
)
def test_a_patch_that_cannot_be_used_is_refused_naming_the_field(patch, message) -> None:
    template = get_backend("kubernetes").base_job_template()
    with pytest.raises(ValueError, match="jobTemplatePatch") as refused:
        patch_job_template(template, patch)
    assert message in str(refused.value)


def test_only_kubernetes_backends_take_a_patch() -> None:
    with pytest.raises(ValidationError, match="jobTemplatePatch: only kubernetes backends"):
        SchedulingBackend.model_validate(backend_manifest(type="docker", jobTemplatePatch={}))


@pytest.mark.asyncio
async def test_a_refused_patch_stalls_the_backend_without_a_prefect_call(
    fake, connect, cluster, settings
) -> None:
    privileged = {"spec": {"template": {"spec": {"hostNetwork": True}}}}
    body = backend_manifest(generation=3, type="kubernetes", jobTemplatePatch=privileged)
    outcome = await reconcile_backend(
        body, SchedulingBackendStatus(), connect=connect, cluster=cluster, settings=settings
    )
    assert cond(outcome.status, "Stalled") == ("True", "InvalidSpec")
    assert "spec.jobTemplatePatch" in outcome.status.conditions[0].message
    assert "Host Namespaces" in outcome.status.conditions[0].message
    assert events(outcome) == [("Warning", "InvalidSpec")]
    assert not fake.calls and cluster.applied == []


@pytest.mark.asyncio
async def test_the_pool_gets_the_patched_template(fake, connect, cluster, settings) -> None:
    body = backend_manifest(type="kubernetes", jobTemplatePatch=PATCH)
    await reconcile_backend(
        body, SchedulingBackendStatus(), connect=connect, cluster=cluster, settings=settings
    )
    (pool,) = fake.pools.values()
    job = pool.base_job_template["job_configuration"]["job_manifest"]
    assert job["spec"]["template"]["spec"]["priorityClassName"] == "batch-low"
