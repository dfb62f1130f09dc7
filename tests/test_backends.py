"""Backends render job variables that the real Prefect workers accept and turn into infrastructure."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx
import jsonschema
import pytest

from lume_operator.api.runconfig import RunConfig
from lume_operator.backends import BACKENDS, get_backend
from lume_operator.backends.templates import render, vendored_template, worker_default_template
from tests.k8s.prefect_server import PrefectServer

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
    env_from=[{"secretRef": {"name": "s3"}}, {"configMapRef": {"name": "beam"}, "prefix": "B_"}],
    env_value_from={"DB_PASSWORD": {"secretKeyRef": {"name": "db", "key": "password"}}},
    node_selector={"lume.dev/pool": "gpu"},
    tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    affinity={
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
                ]
            }
        }
    },
    extended_resources={"nvidia.com/gpu": "1"},
    network_mode="host",
    read_only_root_filesystem=True,
)
# A kubernetes Job takes no hostPath (Pod Security `restricted`): the scratch space is an emptyDir.
FULL_K8S = FULL.model_copy(
    update={
        "volumes": [
            FULL.volumes[0],
            FULL.volumes[1].model_copy(update={"host_path": None, "empty_dir": True}),
        ]
    }
)


class NoPrefect:
    """The client `from_template_and_values` is given: rendering a template with plain values
    (no block or variable references) asks Prefect nothing, and would fail here if it did."""

    def __getattr__(self, name: str):
        raise AssertionError(f"rendering the job configuration called Prefect: {name}")


def configure(configuration_class, template: dict, variables: dict):
    """The worker's own job configuration, from the pool's template and the job variables."""
    return asyncio.run(
        configuration_class.from_template_and_values(template, variables, client=NoPrefect())
    )


def rendered(backend_type: str) -> tuple[dict, dict]:
    backend = get_backend(backend_type)
    config, _ = backend.run_config(FULL_K8S if backend_type == "kubernetes" else FULL)
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
        if (backend_type, name) in CONSTRAINED:
            continue  # narrowed below: what lume-operator renders, and nothing a run may widen
        assert template["variables"]["properties"][name] == schema


# The workers' own variables lume-operator narrows by schema (the server checks every run's
# job variables against the pool's), each with a value a Prefect user might try on one run.
CONSTRAINED = {
    ("docker", "container_create_kwargs"): {"user": "0:0", "cap_drop": [], "security_opt": []},
    ("docker", "privileged"): True,
}


@pytest.mark.unit
@pytest.mark.parametrize(("backend_type", "name"), sorted(CONSTRAINED))
def test_a_run_cannot_widen_what_lume_operator_locks(backend_type, name):
    template = get_backend(backend_type).base_job_template()
    schema = template["variables"]["properties"][name]
    jsonschema.validate(schema["default"], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(CONSTRAINED[backend_type, name], schema)
    variables, _ = rendered(backend_type)
    if name in variables:
        jsonschema.validate(variables[name], schema)  # what lume-operator renders passes


def test_process_variables_through_the_real_worker():
    from prefect.workers.process import ProcessJobConfiguration

    variables, template = rendered("process")
    assert set(variables) == {"env", "labels", "working_dir", "stream_output"}
    config = configure(ProcessJobConfiguration, template, variables)
    assert config.env["OMP_NUM_THREADS"] == "4"
    assert str(config.working_dir) == "/opt/project"
    assert config.stream_output is False


def test_docker_variables_through_the_real_worker():
    from prefect_docker.worker import DockerWorkerJobConfiguration

    variables, template = rendered("docker")
    config = configure(DockerWorkerJobConfiguration, template, variables)
    assert config.image == "ghcr.io/lume/impact:1.2"
    assert config.mem_limit == str(4 * 1024**3)
    assert config.volumes == ["lume-data:/data:rw", "/mnt/scratch:/scratch:ro"]
    assert config.network_mode == "host"
    assert config.container_create_kwargs == {
        "nano_cpus": 2_000_000_000,
        "working_dir": "/opt/project",
        # Pod Security `restricted` in Docker's terms, and the read-only root asked for.
        "user": "1000:1000",
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "read_only": True,
        "tmpfs": {"/tmp": "rw,nosuid,nodev,mode=1777"},
    }
    assert config.labels["team"] == "beam"
    assert config.env["HOME"] == "/tmp" and config.env["OMP_NUM_THREADS"] == "4"


def test_kubernetes_variables_through_the_real_worker():
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    variables, template = rendered("kubernetes")
    config = configure(KubernetesWorkerJobConfiguration, template, variables)
    job = config.job_manifest
    assert job["metadata"]["namespace"] == "science"
    assert job["spec"]["ttlSecondsAfterFinished"] == 600
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "ghcr.io/lume/impact:1.2"
    assert container["resources"] == {
        "requests": {"cpu": "500m", "memory": "1Gi", "nvidia.com/gpu": "1"},
        "limits": {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": "1"},
    }
    assert container["workingDir"] == "/opt/project"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["volumeMounts"] == [
        {"name": "tmp", "mountPath": "/tmp"},  # the only writable place besides volumes
        {"name": "data", "mountPath": "/data", "readOnly": False},
        {"name": "scratch", "mountPath": "/scratch", "readOnly": True},
    ]
    assert pod["volumes"] == [
        {"name": "tmp", "emptyDir": {}},
        {"name": "data", "persistentVolumeClaim": {"claimName": "lume-data"}},
        {"name": "scratch", "emptyDir": {}},
    ]
    assert pod["imagePullSecrets"] == [{"name": "registry"}]
    assert pod["nodeSelector"] == {"lume.dev/pool": "gpu"}
    assert pod["tolerations"] == FULL.model_dump(by_alias=True, exclude_none=True)["tolerations"]
    assert pod["affinity"] == FULL.affinity.to_wire()
    assert container["envFrom"] == [
        {"secretRef": {"name": "s3"}},
        {"configMapRef": {"name": "beam"}, "prefix": "B_"},
    ]
    assert {
        "name": "DB_PASSWORD",
        "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}},
    } in (container["env"])
    assert pod["automountServiceAccountToken"] is False
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
    config = configure(KubernetesWorkerJobConfiguration, template, variables)
    container = config.job_manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "results-db"}}]
    deployment = next(o for o in agent_objects(backend, None) if o["kind"] == "Deployment")
    worker = deployment["spec"]["template"]["spec"]["containers"][0]
    assert worker["envFrom"] == [{"secretRef": {"name": "results-db"}}]
    # Without a result store, a Job takes nothing from Secrets.
    plain = SchedulingBackend.model_validate(
        {"metadata": {"name": "k8s", "namespace": "science"}, "spec": {"type": "kubernetes"}}
    )
    empty = configure(
        KubernetesWorkerJobConfiguration, template, flow_deployment(flow, plain).spec.job_variables
    )
    assert empty.job_manifest["spec"]["template"]["spec"]["containers"][0]["envFrom"] == []


def _worker_job(backend, monkeypatch, secrets: dict[str, str]) -> dict:
    """The Job the real prefect-kubernetes worker would create for a flow run of `backend`,
    the worker running with its agent container's environment (Secrets resolved to `secrets`,
    as the kubelet does): its job configuration from the pool's template and the deployment's
    variables, `prepare_for_flow_run`, then `_create_job` up to the API call."""
    import prefect_kubernetes.worker as k8s_worker
    from prefect.client.schemas.objects import FlowRun
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_KEY, temporary_settings

    from lume_operator.api.flow import LumeFlow
    from lume_operator.backends.agent import agent_objects
    from lume_operator.reconcile.deploy import flow_deployment

    deployment = next(o for o in agent_objects(backend, None) if o["kind"] == "Deployment")
    worker_env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    for item in worker_env:
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        value = secrets[f"{ref['name']}/{ref['key']}"] if ref else item["value"]
        monkeypatch.setenv(item["name"], value)
    flow = LumeFlow.model_validate(
        {
            "metadata": {"name": "f", "namespace": backend.metadata.namespace},
            "spec": {"backendRef": {"name": backend.metadata.name}, "entrypoint": "f.py:f"},
        }
    )
    variables = flow_deployment(flow, backend).spec.job_variables
    template = get_backend("kubernetes").base_job_template()
    created: list[dict] = []

    class Batch:
        def __init__(self, client):
            pass

        async def create_namespaced_job(self, namespace, manifest):
            created.append(manifest)
            return manifest

    monkeypatch.setattr(k8s_worker, "BatchV1Api", Batch)
    settings = {
        PREFECT_API_KEY: secrets.get("prefect-key/api-key"),
        PREFECT_API_AUTH_STRING: secrets.get("prefect-auth/auth-string"),
    }
    with temporary_settings(updates={k: v for k, v in settings.items() if v}):
        config = configure(k8s_worker.KubernetesWorkerJobConfiguration, template, variables)
        config.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="run"))
        worker = k8s_worker.KubernetesWorker(work_pool_name=backend.work_pool_name)
        asyncio.run(worker._create_job(config, client=None))
    (job,) = created
    return job


SECRETS = {"prefect-key/api-key": "pnu_SECRET-KEY", "prefect-auth/auth-string": "admin:pa55"}


def test_api_key_and_auth_string_reach_jobs_only_by_secret(monkeypatch):
    from lume_operator.api.backend import SchedulingBackend

    backend = SchedulingBackend.model_validate(
        {
            "metadata": {"name": "k8s", "namespace": "science"},
            "spec": {
                "type": "kubernetes",
                "prefect": {
                    "apiUrl": "http://prefect.prefect.svc:4200/api",
                    "apiKeySecretRef": {"name": "prefect-key"},
                    "authStringSecretRef": {"name": "prefect-auth"},
                },
            },
        }
    )
    job = _worker_job(backend, monkeypatch, SECRETS)
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["PREFECT_API_KEY"] == {
        "name": "PREFECT_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "prefect-key", "key": "api-key"}},
    }
    assert env["PREFECT_API_AUTH_STRING"] == {
        "name": "PREFECT_API_AUTH_STRING",
        "valueFrom": {"secretKeyRef": {"name": "prefect-auth", "key": "auth-string"}},
    }
    text = json.dumps(job)
    assert all(secret not in text for secret in SECRETS.values())


def test_without_the_secret_settings_the_worker_copies_the_key(monkeypatch):
    """The control: the worker does put the key's value into the Job unless told the Secret."""
    from lume_operator.api.backend import SchedulingBackend
    from lume_operator.backends import agent

    backend = SchedulingBackend.model_validate(
        {
            "metadata": {"name": "k8s", "namespace": "science"},
            "spec": {"type": "kubernetes", "prefect": {"apiKeySecretRef": {"name": "prefect-key"}}},
        }
    )
    monkeypatch.setattr(agent, "K8S_WORKER", "NOT_PREFECT")
    job = _worker_job(backend, monkeypatch, SECRETS)
    assert "pnu_SECRET-KEY" in json.dumps(job)


def test_kubernetes_worker_observes_only_its_namespace(monkeypatch):
    """The observer watches what the agent's namespaced Role allows; the setting's name is the
    installed prefect-kubernetes' own (its settings read it)."""
    from prefect_kubernetes.settings import KubernetesSettings

    from lume_operator.api.backend import SchedulingBackend
    from lume_operator.backends.agent import agent_objects

    assert KubernetesSettings().observer.namespaces == set()  # cluster-wide unless told
    backend = SchedulingBackend.model_validate(
        {"metadata": {"name": "k8s", "namespace": "science"}, "spec": {"type": "kubernetes"}}
    )
    deployment = next(o for o in agent_objects(backend, None) if o["kind"] == "Deployment")
    for item in deployment["spec"]["template"]["spec"]["containers"][0]["env"]:
        if "value" in item:
            monkeypatch.setenv(item["name"], item["value"])
    assert KubernetesSettings().observer.namespaces == {"science"}


def test_host_path_is_refused_for_kubernetes_naming_the_field():
    from lume_operator.api.manifests import parse_resource

    backend = get_backend("kubernetes")
    config, _ = backend.run_config(
        None, RunConfig(volumes=[{"name": "h", "mountPath": "/h", "hostPath": {"path": "/"}}])
    )
    with pytest.raises(ValueError, match=r"runConfig\.volumes\[h\]\.hostPath: not allowed"):
        backend.job_variables(config)
    body = {
        "apiVersion": "lume.dev/v1alpha1",
        "kind": "SchedulingBackend",
        "metadata": {"name": "k8s"},
        "spec": {
            "type": "kubernetes",
            "runConfig": {"volumes": [{"name": "h", "mountPath": "/h", "hostPath": {"path": "/"}}]},
        },
    }
    resource, problems = parse_resource(body, "backend.yaml")
    assert resource is None
    assert [p.path for p in problems] == ["spec.runConfig.volumes[0].hostPath"]
    assert "Pod Security Standard restricted" in problems[0].message
    # A docker backend binds host directories on purpose.
    body["spec"]["type"] = "docker"
    assert parse_resource(body, "backend.yaml")[1] == []


def test_jobs_get_default_requests_and_no_token():
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    backend = get_backend("kubernetes")
    config, _ = backend.run_config(None)
    variables = backend.job_variables(config)
    job = configure(
        KubernetesWorkerJobConfiguration, backend.base_job_template(), variables
    ).job_manifest
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"] == {"requests": {"cpu": "100m", "memory": "256Mi"}}
    assert pod["automountServiceAccountToken"] is False
    # ...and from the template's defaults alone, for a deployment made by hand in Prefect.
    bare = configure(KubernetesWorkerJobConfiguration, backend.base_job_template(), {})
    assert bare.job_manifest["spec"]["template"]["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "100m", "memory": "256Mi"}
    }


@pytest.mark.parametrize("variables", [FULL_K8S, RunConfig()], ids=["full", "defaults"])
def test_rendered_jobs_pass_pss_restricted(variables, monkeypatch):
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    from lume_operator.backends.pss import pss_restricted_problems

    backend = get_backend("kubernetes")
    config, _ = backend.run_config(variables)
    job_config = configure(
        KubernetesWorkerJobConfiguration, backend.base_job_template(), backend.job_variables(config)
    )
    job_config.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="run"))
    pod = job_config.job_manifest["spec"]["template"]
    assert pss_restricted_problems(pod["spec"], pod.get("metadata", {}).get("annotations")) == []
    env = pod["spec"]["containers"][0]["env"]
    if variables.env_value_from:  # kept by the worker after its own env
        assert env[-1]["name"] == "DB_PASSWORD" and "valueFrom" in env[-1]


BAD_JOB_VARIABLES = [
    ("volumes", [{"name": "root", "hostPath": {"path": "/"}}]),
    ("volumes", [{"name": "nfs", "nfs": {"server": "s", "path": "/"}}]),
    ("volumes", [{"name": "d", "emptyDir": {}, "hostPath": {"path": "/"}}]),
    ("volumes", [{"name": "c", "persistentVolumeClaim": {"claimName": "c", "x": 1}}]),
    ("volume_mounts", [{"name": "d", "mountPath": "/d", "mountPropagation": "Bidirectional"}]),
    ("env_from", [{"secretRef": {"name": "s"}, "configMapRef": {"name": "c"}}]),
    ("env_from", [{"secretRef": {"name": "s", "optional": True, "x": 1}}]),
    ("env_from", [{"prefix": "X"}]),
    ("env_refs", [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]),
    ("env_refs", [{"name": "X", "value": "plain"}]),
    ("resources", {"requests": {"cpu": 1}}),
    ("resources", {"claims": [{"name": "x"}]}),
    ("tolerations", [{"key": "k", "privileged": True}]),
    ("affinity", {"hostNetwork": True}),
    ("image_pull_secrets", [{"name": "r", "extra": 1}]),
]


@pytest.mark.parametrize(
    ("name", "value"), BAD_JOB_VARIABLES, ids=[str(v) for _, v in BAD_JOB_VARIABLES]
)
def test_per_run_job_variables_cannot_leave_the_shapes_lume_makes(name, value):
    """Any Prefect user may set job variables on a run: the pool's schema refuses the rest."""
    schema = get_backend("kubernetes").base_job_template()["variables"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({name: value}, schema)


def test_per_run_job_variables_of_the_shapes_lume_makes_are_accepted():
    backend = get_backend("kubernetes")
    config, _ = backend.run_config(FULL_K8S)
    schema = backend.base_job_template()["variables"]
    jsonschema.validate(backend.job_variables(config), schema)
    more = {
        "volumes": [
            {"name": "c", "configMap": {"name": "cfg"}},
            {"name": "s", "secret": {"secretName": "tls"}},
        ],
        "env_refs": [
            {"name": "A", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "a"}}},
        ],
    }
    jsonschema.validate(more, schema)


@pytest.mark.parametrize(
    ("spec", "command", "image"),
    [
        (
            {"type": "process", "labels": ["cpu"]},
            ["lume-operator", "worker", "--pool", "science-b", "--with-healthcheck",
             "--work-queue", "cpu"],
            "registry.example/lume-operator:1.2",
        ),
        (
            {"type": "process", "agent": {"warmStarts": False}},
            ["prefect", "worker", "start", "--pool", "science-b", "--type", "process",
             "--with-healthcheck"],
            "prefecthq/prefect:3-python3.11",
        ),
        (
            {"type": "process", "agent": {"image": "mine:1"}},
            ["lume-operator", "worker", "--pool", "science-b", "--with-healthcheck"],
            "mine:1",
        ),
        (
            {"type": "kubernetes"},
            ["prefect", "worker", "start", "--pool", "science-b", "--type", "kubernetes",
             "--with-healthcheck"],
            "prefecthq/prefect:3-python3.11-kubernetes",
        ),
    ],
)  # fmt: skip
def test_process_agents_start_runs_warm_in_the_operators_image(spec, command, image):
    """A process backend's agent is `lume-operator worker` (warm starts) in the operator's own
    image, unless the backend opts out; other types keep Prefect's worker and image."""
    from lume_operator.api.backend import SchedulingBackend
    from lume_operator.backends.agent import agent_objects

    backend = SchedulingBackend.model_validate(
        {"metadata": {"name": "b", "namespace": "science"}, "spec": spec}
    )
    objects = agent_objects(backend, None, "registry.example/lume-operator:1.2")
    container = next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert container["command"] == command
    assert container["image"] == image


class _AsksAgain(httpx.HTTPTransport):
    """Asks again after a 503, as Prefect's own client does: the shared SQLite server answers
    it while another test writes ("database is locked")."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for _ in range(40):
            response = super().handle_request(request)
            if response.status_code != 503:
                return response
            response.close()
            time.sleep(0.25)
        return response


def test_the_prefect_server_refuses_a_run_that_widens_a_docker_container(
    shared_prefect_server: PrefectServer,
) -> None:
    """The lock is the server's: a run asking for root or a privileged container on a docker
    pool lume-operator made is refused before any worker sees it."""
    import httpx

    runner = get_backend("docker")
    config, _ = runner.run_config(FULL)
    api = httpx.Client(base_url=shared_prefect_server.api_url, timeout=30, transport=_AsksAgain())
    api.post(
        "/work_pools/",
        json={"name": "locked", "type": "docker", "base_job_template": runner.base_job_template()},
    ).raise_for_status()
    flow_id = api.post("/flows/", json={"name": "locked-flow"}).json()["id"]
    deployment = api.post(
        "/deployments/",
        json={
            "name": "d",
            "flow_id": flow_id,
            "work_pool_name": "locked",
            "job_variables": runner.job_variables(config),
        },
    )
    deployment.raise_for_status()
    create = f"/deployments/{deployment.json()['id']}/create_flow_run"
    assert api.post(create, json={}).status_code == 201  # what lume-operator renders runs
    for widened in (
        {"container_create_kwargs": {"user": "0:0", "cap_drop": [], "security_opt": []}},
        {"privileged": True},
    ):
        refused = api.post(create, json={"job_variables": widened})
        assert refused.status_code == 422, (widened, refused.text)
        assert "Validation failed for field" in refused.text
