"""Backends render job variables that the real Prefect workers accept and turn into infrastructure."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest

from lume_operator.api.runconfig import RunConfig
from lume_operator.backends import BACKENDS, get_backend
from lume_operator.backends.templates import render, vendored_template, worker_default_template

FULL = RunConfig(
    image="ghcr.io/lume/impact:1.2",
    image_pull_policy="IfNotPresent",
    image_pull_secrets=["registry"],
    env={"OMP_NUM_THREADS": "4"},
    cpu_request="500m",
    cpu_limit="2",
    memory_request="1Gi",
    memory_limit="4Gi",
    service_account_name="flows",
    namespace="science",
    working_dir="/opt/project",
    volumes=[
        {"name": "data", "mountPath": "/data", "persistentVolumeClaim": {"claimName": "lume-data"}},
        {
            "name": "scratch",
            "mountPath": "/scratch",
            "hostPath": {"path": "/mnt/scratch"},
            "readOnly": True,
        },
    ],
    labels={"team": "beam"},
    stream_output=False,
    finished_job_ttl=600,
)


def rendered(backend_type: str) -> tuple[dict, dict]:
    backend = get_backend(backend_type)
    config, _ = backend.run_config(FULL)
    return backend.job_variables(config), backend.base_job_template()


@pytest.mark.unit
@pytest.mark.parametrize("worker_type", ["process", "docker", "kubernetes"])
def test_vendored_templates_are_the_installed_workers(worker_type):
    """Regenerate with `python -m lume_operator.backends.templates` when a worker upgrade changes them."""
    assert vendored_template(worker_type) == json.loads(render(worker_type))


@pytest.mark.unit
@pytest.mark.parametrize("backend_type", sorted(BACKENDS))
def test_job_variables_validate_against_the_real_worker_schema(backend_type):
    variables, template = rendered(backend_type)
    upstream = worker_default_template(backend_type)["variables"]
    ours = {k: v for k, v in variables.items() if k in upstream["properties"]}
    jsonschema.validate(ours, upstream)
    # Whatever lume-operator adds is declared in the pool's own template, which keeps every
    # variable of the worker's unchanged.
    jsonschema.validate(variables, {**template["variables"], "additionalProperties": False})
    for name, schema in upstream["properties"].items():
        assert template["variables"]["properties"][name] == schema


def test_process_variables_through_the_real_worker():
    from prefect.workers.process import ProcessJobConfiguration

    variables, template = rendered("process")
    assert set(variables) == {"env", "labels", "working_dir", "stream_output"}
    config = asyncio.run(ProcessJobConfiguration.from_template_and_values(template, variables))
    assert config.env["OMP_NUM_THREADS"] == "4"
    assert str(config.working_dir) == "/opt/project"
    assert config.stream_output is False


def test_docker_variables_through_the_real_worker():
    from prefect_docker.worker import DockerWorkerJobConfiguration

    variables, template = rendered("docker")
    config = asyncio.run(DockerWorkerJobConfiguration.from_template_and_values(template, variables))
    assert config.image == "ghcr.io/lume/impact:1.2"
    assert config.mem_limit == str(4 * 1024**3)
    assert config.volumes == ["lume-data:/data:rw", "/mnt/scratch:/scratch:ro"]
    assert config.container_create_kwargs == {
        "nano_cpus": 2_000_000_000,
        "working_dir": "/opt/project",
    }
    assert config.labels["team"] == "beam"


def test_kubernetes_variables_through_the_real_worker():
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    variables, template = rendered("kubernetes")
    config = asyncio.run(
        KubernetesWorkerJobConfiguration.from_template_and_values(template, variables)
    )
    job = config.job_manifest
    assert job["metadata"]["namespace"] == "science"
    assert job["spec"]["ttlSecondsAfterFinished"] == 600
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "ghcr.io/lume/impact:1.2"
    assert container["resources"] == {
        "requests": {"cpu": "500m", "memory": "1Gi"},
        "limits": {"cpu": "2", "memory": "4Gi"},
    }
    assert container["workingDir"] == "/opt/project"
    assert container["volumeMounts"] == [
        {"name": "data", "mountPath": "/data", "readOnly": False},
        {"name": "scratch", "mountPath": "/scratch", "readOnly": True},
    ]
    assert pod["volumes"] == [
        {"name": "data", "persistentVolumeClaim": {"claimName": "lume-data"}},
        {"name": "scratch", "hostPath": {"path": "/mnt/scratch"}},
    ]
    assert pod["imagePullSecrets"] == [{"name": "registry"}]
    assert pod["serviceAccountName"] == "flows"
    # Pod Security Standard "restricted"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}


@pytest.mark.unit
def test_empty_docker_volume_is_refused():
    backend = get_backend("docker")
    config, _ = backend.run_config(
        RunConfig(volumes=[{"name": "t", "mountPath": "/t", "emptyDir": True}])
    )
    with pytest.raises(ValueError, match="volume 't': emptyDir has no Docker equivalent"):
        backend.job_variables(config)


@pytest.mark.unit
def test_unknown_backend_type():
    with pytest.raises(
        ValueError,
        match=r"unknown backend type 'slurm' \(expected one of process, docker, kubernetes\)",
    ):
        get_backend("slurm")


def test_result_store_url_reaches_jobs_and_workers_only_by_secret():
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    from lume_operator.api.backend import SchedulingBackend
    from lume_operator.api.flow import LumeFlow
    from lume_operator.backends.agent import agent_objects
    from lume_operator.reconcile.deploy import flow_deployment

    backend = SchedulingBackend.model_validate(
        {
            "metadata": {"name": "k8s", "namespace": "science"},
            "spec": {"type": "kubernetes", "resultStore": {"secretName": "results-db"}},
        }
    )
    flow = LumeFlow.model_validate(
        {
            "metadata": {"name": "f", "namespace": "science"},
            "spec": {"backendRef": {"name": "k8s"}, "entrypoint": "flows/f.py:f"},
        }
    )
    variables = flow_deployment(flow, backend).spec.job_variables
    assert variables["env_from"] == [{"secretRef": {"name": "results-db"}}]
    assert "LUME_RESULT_STORE_URL" not in json.dumps(variables)
    template = get_backend("kubernetes").base_job_template()
    config = asyncio.run(
        KubernetesWorkerJobConfiguration.from_template_and_values(template, variables)
    )
    container = config.job_manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "results-db"}}]
    deployment = next(o for o in agent_objects(backend, None) if o["kind"] == "Deployment")
    worker = deployment["spec"]["template"]["spec"]["containers"][0]
    assert worker["envFrom"] == [{"secretRef": {"name": "results-db"}}]
    # Without a result store, a Job takes nothing from Secrets.
    plain = SchedulingBackend.model_validate(
        {"metadata": {"name": "k8s", "namespace": "science"}, "spec": {"type": "kubernetes"}}
    )
    empty = asyncio.run(
        KubernetesWorkerJobConfiguration.from_template_and_values(
            template, flow_deployment(flow, plain).spec.job_variables
        )
    )
    assert empty.job_manifest["spec"]["template"]["spec"]["containers"][0]["envFrom"] == []
