"""Spec validation: each bad input gets a message naming the field."""

from __future__ import annotations

import pytest
import yaml

from lume_operator.api.common import quantity_to_bytes, quantity_to_cpus, quantity_to_nano_cpus
from lume_operator.api.manifests import parse_resource
from lume_operator.api.runconfig import RunConfig
from lume_operator.backends import get_backend
from lume_operator.flows.convert import load_manifests as load

pytestmark = pytest.mark.unit


def problems_of(text: str) -> list[str]:
    _, problems = parse_resource(yaml.safe_load(text), "m.yaml")
    return [f"{p.path}: {p.message}" for p in problems]


BACKEND = """
apiVersion: lume.dev/v1alpha1
kind: SchedulingBackend
metadata: {name: b}
spec:
  type: %s
"""

FLOW = """
apiVersion: lume.dev/v1alpha1
kind: LumeFlow
metadata: {name: f}
spec:
  backendRef: {name: b}
  entrypoint: flows/x.py:run
"""


def test_unknown_backend_type_names_the_field_and_the_choices():
    assert problems_of(BACKEND % "slurm") == [
        "spec.type: 'slurm' is not one of 'kubernetes', 'docker' or 'process'"
    ]


def test_missing_entrypoint():
    text = FLOW.replace("  entrypoint: flows/x.py:run\n", "")
    assert problems_of(text) == ["spec.entrypoint: required field is missing"]


def test_malformed_entrypoint():
    text = FLOW.replace("flows/x.py:run", "flows/x.py")
    [problem] = problems_of(text)
    assert problem.startswith("spec.entrypoint: 'flows/x.py' does not match the pattern")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('"2 gigs"', "'2 gigs' is not a Kubernetes quantity"),
        ("2", "2 must be a string Kubernetes quantity: write it in quotes, e.g. '2'"),
        ('"2GB"', "'2GB' is not a Kubernetes quantity"),
    ],
)
def test_bad_memory_limit(value, message):
    text = FLOW + f"  runConfig: {{memoryLimit: {value}}}\n"
    [problem] = problems_of(text)
    assert problem.startswith(f"spec.runConfig.memoryLimit: {message}")


@pytest.mark.parametrize("value", ["2Gi", "512Mi", "1.5G", "500m", "1e3", "0.5"])
def test_good_quantities(value):
    assert problems_of(FLOW + f'  runConfig: {{memoryLimit: "{value}"}}\n') == []


def test_unknown_field_is_named():
    [problem] = problems_of(FLOW + "  runConfig: {memoryLimt: 1Gi}\n")
    assert problem == "spec.runConfig.memoryLimt: unknown field"


def test_backend_defaults_that_do_not_apply_to_its_type():
    text = BACKEND % "process" + "  runConfig: {image: 'python:3.11', env: {A: b}}\n"
    [problem] = problems_of(text)
    assert problem.startswith("spec.runConfig.image: does not apply to process backends")


def test_volume_needs_one_source():
    text = (
        FLOW
        + "  runConfig: {volumes: [{name: d, mountPath: /d, hostPath: {path: /h}, emptyDir: true}]}\n"
    )
    [problem] = problems_of(text)
    assert problem == (
        "spec.runConfig.volumes[0]: a volume needs exactly one source of persistentVolumeClaim, "
        "hostPath or emptyDir (got hostPath, emptyDir)"
    )


def test_schedule_needs_a_valid_cron():
    assert problems_of(FLOW + "  run: {policy: Schedule}\n") == [
        "spec.run: cron is required when policy is Schedule"
    ]
    [problem] = problems_of(FLOW + "  run: {policy: Schedule, cron: 'every day'}\n")
    assert problem.startswith("spec.run: invalid cron schedule 'every day'")


def test_every_problem_of_every_document_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text(
        BACKEND % "slurm" + "---" + FLOW.replace("{name: f}", "{name: F_}")
    )
    (tmp_path / "b.yml").write_text("kind: [unclosed\n")
    manifests = load([tmp_path])
    messages = [str(p) for p in manifests.problems]
    assert any("a.yaml#0 (SchedulingBackend b): spec.type" in m for m in messages)
    assert any("a.yaml#1 (LumeFlow F_): metadata.name" in m for m in messages)
    assert any("b.yml:2: not valid YAML" in m for m in messages)


def test_documents_of_other_groups_are_skipped(tmp_path):
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n")
    manifests = load([tmp_path])
    assert manifests.problems == [] and len(manifests.skipped) == 1


def test_overrides_merge_over_defaults():
    defaults = RunConfig(
        env={"A": "1", "B": "1"},
        memory_limit="1Gi",
        volumes=[{"name": "d", "mountPath": "/d", "emptyDir": True}],
    )
    overrides = RunConfig(
        env={"B": "2"},
        cpu_limit="2",
        volumes=[{"name": "d", "mountPath": "/data", "emptyDir": True}],
    )
    merged = overrides.merged_over(defaults)
    assert merged.env == {"A": "1", "B": "2"}
    assert merged.memory_limit == "1Gi" and merged.cpu_limit == "2"
    assert [v.mount_path for v in merged.volumes] == ["/data"]


def test_flow_overrides_that_do_not_apply_are_reported_not_fatal():
    config, ignored = get_backend("process").run_config(
        RunConfig(env={"A": "1"}), RunConfig(image="x", memory_limit="2Gi", working_dir="/w")
    )
    assert ignored == ["image", "memoryLimit"]
    assert config.env == {"A": "1"} and config.working_dir == "/w"


def test_quantity_conversions():
    assert quantity_to_bytes("2Gi") == 2 * 1024**3
    assert quantity_to_bytes("1.5G") == 1_500_000_000
    assert quantity_to_bytes("1e3") == 1000
    assert quantity_to_cpus("1500m") == 1.5
    assert quantity_to_cpus("2") == 2.0


@pytest.mark.parametrize(
    ("quantity", "nano"),
    [("0.5", 500_000_000), ("500m", 500_000_000), ("2", 2_000_000_000), ("1.5", 1_500_000_000)],
)
def test_cpu_quantities_in_docker(quantity, nano):
    """Docker's nano_cpus, as a kubelet reads the quantity ("0.5" was 0 before)."""
    assert quantity_to_nano_cpus(quantity) == nano
    assert quantity_to_cpus(quantity) == nano / 1e9
    backend = get_backend("docker")
    config, _ = backend.run_config(RunConfig(cpu_limit=quantity))
    create = backend.job_variables(config)["container_create_kwargs"]
    assert create["nano_cpus"] == nano
    assert "read_only" not in create  # only when the run config asks for it


def test_repeated_volume_and_result_names_are_named_at_their_list():
    text = FLOW + (
        "  runConfig: {volumes: [{name: d, mountPath: /a, emptyDir: true},"
        " {name: d, mountPath: /b, emptyDir: true}]}\n"
        "  results: [{name: beam}, {name: beam}]\n"
    )
    assert problems_of(text) == [
        "spec.runConfig.volumes: volume names must be unique: d repeated",
        "spec.results: result names must be unique: beam repeated",
    ]


STORAGE = BACKEND + "  resultStorage: %s\n"


@pytest.mark.parametrize(
    ("kind", "storage", "expected"),
    [
        ("kubernetes", "{}", "spec.resultStorage: resultStorage needs exactly one of objectStore "
         "or volume (neither)"),
        ("kubernetes", "{objectStore: {url: 's3://bk1/p'}, volume: {claimName: c, mountPath: /r}}",
         "spec.resultStorage: resultStorage needs exactly one of objectStore or volume (both)"),
        ("kubernetes", "{objectStore: {url: 'https://bucket'}}",
         "spec.resultStorage.objectStore.url: 'https://bucket' is not s3://bucket or "
         "s3://bucket/prefix"),
        ("kubernetes", "{objectStore: {url: 's3://bk1/a/../b'}}",
         "spec.resultStorage.objectStore.url: 's3://bk1/a/../b': the prefix may not contain"),
        ("kubernetes", "{objectStore: {url: 's3://bk1', endpointUrl: 'http://me:pw@minio'}}",
         "spec.resultStorage.objectStore.endpointUrl: must not carry a user or password"),
        ("kubernetes", "{objectStore: {url: 's3://bk1', credentialsSecretRef: {}}}",
         "spec.resultStorage.objectStore.credentialsSecretRef.name: required field is missing"),
        ("kubernetes", "{volume: {claimName: c, mountPath: /r/../x}}",
         "spec.resultStorage.volume.mountPath: '/r/../x' must be a normalized absolute path"),
        ("docker", "{objectStore: {url: 's3://bk1', credentialsSecretRef: {name: s3}}}",
         "spec: resultStorage.objectStore.credentialsSecretRef: a docker backend cannot give a "
         "Secret to its flow-run containers"),
    ],
)  # fmt: skip
def test_result_storage_problems_name_the_field(kind, storage, expected):
    [problem] = problems_of(STORAGE % (kind, storage))
    assert problem.startswith(expected), problem


def test_result_storage_accepted_shapes():
    from lume_operator.api.backend import SchedulingBackend

    text = STORAGE % (
        "kubernetes",
        "{objectStore: {url: 's3://lume-results/beam/', endpointUrl: 'http://minio:9000', "
        "region: us-east-1, credentialsSecretRef: {name: s3}}}",
    )
    assert problems_of(text) == []
    backend = SchedulingBackend.model_validate(yaml.safe_load(text))
    storage = backend.spec.result_storage
    assert storage.object_store.url == "s3://lume-results/beam"  # a trailing / dropped
    assert storage.identifier == storage.root == "s3://lume-results/beam"
    ref = storage.object_store.credentials_secret_ref
    assert (ref.access_key_id_key, ref.secret_access_key_key) == (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    )
    # docker: a volume, or an object store with ambient credentials
    for storage_yaml in (
        "{volume: {claimName: r, mountPath: /results}}",
        "{objectStore: {url: 's3://bk1'}}",
    ):
        assert problems_of(STORAGE % ("docker", storage_yaml)) == []
    volume = SchedulingBackend.model_validate(
        yaml.safe_load(STORAGE % ("process", "{volume: {claimName: r, mountPath: /results}}"))
    ).spec.result_storage
    assert (volume.identifier, volume.root) == ("pvc/r", "/results")
