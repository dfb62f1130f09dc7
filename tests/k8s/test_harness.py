"""The Kubernetes harness itself: real kubectl and real kopf against the emulated API server.

These prove the parts the operator's end-to-end tests stand on: if one of them fails, an
operator test failing next to it says nothing about the operator.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
import urllib.request
from pathlib import Path
from typing import Any

import kopf
import yaml

from tests.k8s.conftest import Kubectl, kopf_registry
from tests.k8s.emulator import EmulatorServer, wait_until
from tests.k8s.tools import helm_path, kubectl_path

ROOT = Path(__file__).resolve().parents[2]
BACKEND = ROOT / "examples" / "beam" / "backend.yaml"
LUMEFLOW = ROOT / "examples" / "beam" / "lumeflow.yaml"
LF = "lume.dev/v1alpha1/lumeflows"


def get(kubectl: Kubectl, *args: str) -> dict[str, Any]:
    return yaml.safe_load(kubectl("get", *args, "-o", "yaml").stdout)


def lumeflow_manifest(**changes: Any) -> dict[str, Any]:
    """The beam example LumeFlow, with top-level sections or metadata merged in."""
    manifest = yaml.safe_load(LUMEFLOW.read_text())
    for key, value in changes.items():
        manifest.setdefault(key, {}).update(value)
    return manifest


def apply(kubectl: Kubectl, manifest: dict[str, Any]) -> str:
    return kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump(manifest)).stdout


def test_tools_are_the_promised_versions() -> None:
    kubectl_version = subprocess.run(
        [str(kubectl_path()), "version", "--client", "-o", "yaml"], capture_output=True, text=True
    )
    helm_version = subprocess.run(
        [str(helm_path()), "version", "--short"], capture_output=True, text=True
    )
    assert yaml.safe_load(kubectl_version.stdout)["clientVersion"]["minor"] == "35"
    assert helm_version.stdout.startswith("v4.")


def test_kubectl_apply_then_get_returns_our_kinds(
    kubectl: Kubectl, k8s_emulator: EmulatorServer
) -> None:
    out = kubectl("apply", "--validate=false", "-f", str(BACKEND), "-f", str(LUMEFLOW)).stdout
    assert "schedulingbackend.lume.dev/local created" in out
    assert "lumeflow.lume.dev/beam-stats created" in out

    listed = get(kubectl, "lumeflows")
    assert [item["kind"] for item in listed["items"]] == ["LumeFlow"]
    flow = listed["items"][0]
    assert flow["apiVersion"] == "lume.dev/v1alpha1"
    assert flow["metadata"]["name"] == "beam-stats"
    assert flow["spec"] == yaml.safe_load(LUMEFLOW.read_text())["spec"]
    assert flow["metadata"]["generation"] == 1
    assert flow["metadata"]["uid"] and flow["metadata"]["resourceVersion"]
    assert flow["metadata"]["creationTimestamp"].endswith("Z")
    assert get(kubectl, "sb", "local")["spec"]["type"] == "process"

    # Short names resolve without kmock's ambiguity warning; unknown names are a clean 404.
    table = kubectl("get", "lf")
    assert "beam-stats" in table.stdout and "Warning" not in table.stderr
    missing = kubectl("get", "lf", "nope", check=False)
    assert missing.returncode != 0 and "NotFound" in missing.stderr

    # The request log saw exactly one create per object.
    emu = k8s_emulator.emulator
    assert emu.count("POST", "/apis/lume.dev/v1alpha1/namespaces/default/lumeflows") == 1
    assert emu.counts()[("POST", "/apis/lume.dev/v1alpha1/namespaces/default/schedulingbackends")]
    assert emu.count("DELETE") == 0


def test_generation_follows_spec_not_status(kubectl: Kubectl, k8s_emulator: EmulatorServer) -> None:
    apply(kubectl, lumeflow_manifest())
    first = get(kubectl, "lf", "beam-stats")["metadata"]

    # Re-applying the same manifest writes nothing: no new resourceVersion (no drift loop).
    assert "unchanged" in apply(kubectl, lumeflow_manifest())
    assert (
        get(kubectl, "lf", "beam-stats")["metadata"]["resourceVersion"] == first["resourceVersion"]
    )

    # A spec change bumps generation.
    apply(kubectl, lumeflow_manifest(spec={"parameters": {"n_particles": 10}}))
    second = get(kubectl, "lf", "beam-stats")
    assert second["metadata"]["generation"] == 2
    assert second["spec"]["parameters"]["n_particles"] == 10

    # A status write through /status changes status and resourceVersion, not generation.
    kubectl(
        "patch", "lf", "beam-stats", "--subresource=status", "--type=merge",
        "-p", '{"status": {"phase": "Running", "observedGeneration": 2}}',
    )  # fmt: skip
    third = get(kubectl, "lf", "beam-stats")
    assert third["status"] == {"phase": "Running", "observedGeneration": 2}
    assert third["metadata"]["generation"] == 2
    assert int(third["metadata"]["resourceVersion"]) > int(second["metadata"]["resourceVersion"])

    # Status sent to the main resource is dropped; spec sent to /status is dropped.
    kubectl("patch", "lf", "beam-stats", "--type=merge", "-p", '{"status": {"phase": "Failed"}}')
    kubectl(
        "patch", "lf", "beam-stats", "--subresource=status", "--type=merge",
        "-p", '{"spec": {"entrypoint": "x.py:y"}}',
    )  # fmt: skip
    fourth = get(kubectl, "lf", "beam-stats")
    assert fourth["status"]["phase"] == "Running"
    assert fourth["spec"]["entrypoint"] == "flows/beam.py:beam_stats"
    assert fourth["metadata"]["generation"] == 2

    # What kubectl saw is what the store holds.
    stored = k8s_emulator.emulator.get_object(LF, "default", "beam-stats")
    assert stored is not None and stored["status"]["phase"] == "Running"


def test_a_generated_name_already_taken_is_generated_again(
    kubectl: Kubectl, k8s_emulator: EmulatorServer
) -> None:
    """As the API server since Kubernetes 1.31: a create with `generateName` whose generated
    name exists gets another, not 409 (kopf posts every event with one; 409s lost events)."""
    suffixes = iter(["bbbbb", "bbbbb", "ccccc"])
    k8s_emulator.emulator.name_suffix = lambda: next(suffixes)
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": "kopf-event-"},
        "involvedObject": {"kind": "LumeFlow", "name": "x", "namespace": "default"},
        "reason": "Test",
        "message": "m",
        "type": "Normal",
    }
    names = [
        kubectl(
            "create", "--validate=false", "-o", "name", "-f", "-", input=json.dumps(event)
        ).stdout.strip()
        for _ in range(2)
    ]
    assert names == ["event/kopf-event-bbbbb", "event/kopf-event-ccccc"]


def test_deletion_waits_for_finalizers(kubectl: Kubectl) -> None:
    apply(kubectl, lumeflow_manifest(metadata={"finalizers": ["lume.dev/cleanup"]}))
    kubectl("delete", "lf", "beam-stats", "--wait=false")

    held = get(kubectl, "lf", "beam-stats")["metadata"]
    assert held["deletionTimestamp"]
    assert held["finalizers"] == ["lume.dev/cleanup"]

    # No new finalizers on an object being deleted, as the real API server rules.
    refused = kubectl(
        "patch", "lf", "beam-stats", "--type=merge",
        "-p", '{"metadata": {"finalizers": ["lume.dev/cleanup", "other/x"]}}', check=False,
    )  # fmt: skip
    assert refused.returncode != 0 and "no new finalizers" in refused.stderr
    assert get(kubectl, "lf", "beam-stats")["metadata"]["finalizers"] == ["lume.dev/cleanup"]

    kubectl("patch", "lf", "beam-stats", "--type=merge", "-p", '{"metadata":{"finalizers":null}}')
    gone = kubectl("get", "lf", "beam-stats", check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr


def test_owner_references_are_garbage_collected(
    kubectl: Kubectl, k8s_emulator: EmulatorServer
) -> None:
    apply(kubectl, lumeflow_manifest())
    uid = get(kubectl, "lf", "beam-stats")["metadata"]["uid"]
    owned = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": "owned",
            "namespace": "default",
            "ownerReferences": [
                {"apiVersion": "lume.dev/v1alpha1", "kind": "LumeFlow", "name": "beam-stats",
                 "uid": uid}
            ],
        },
        "stringData": {"k": "v"},
    }  # fmt: skip
    apply(kubectl, owned)
    apply(kubectl, {**owned, "metadata": {"name": "unowned", "namespace": "default"}})

    kubectl("delete", "lf", "beam-stats")
    assert k8s_emulator.emulator.get_object("v1/secrets", "default", "owned") is None
    assert k8s_emulator.emulator.get_object("v1/secrets", "default", "unowned") is not None


def test_namespaces_hold_their_objects(kubectl: Kubectl) -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "stringData": {"k": "v"}}
    refused = kubectl(
        "apply", "--validate=false", "-f", "-", check=False,
        input=yaml.safe_dump({**secret, "metadata": {"name": "s", "namespace": "lab"}}),
    )  # fmt: skip
    assert refused.returncode != 0 and 'namespaces "lab" not found' in refused.stderr

    apply(kubectl, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "lab"}})
    apply(kubectl, {**secret, "metadata": {"name": "s", "namespace": "lab"}})
    assert get(kubectl, "ns", "lab")["status"]["phase"] == "Active"
    assert kubectl("get", "secret", "s", "-n", "lab", "-o", "name").stdout.strip() == "secret/s"

    kubectl("delete", "ns", "lab")
    assert "lab" not in kubectl("get", "ns", "-o", "name").stdout
    assert kubectl("get", "secrets", "-A", "-o", "name").stdout == ""


def test_kopf_operator_create_handler_status_visible_to_kubectl(
    kubectl: Kubectl, k8s_emulator: EmulatorServer, run_kopf_operator: Any
) -> None:
    registry = kopf_registry()
    seen: list[str] = []

    @kopf.on.create("lume.dev", "v1alpha1", "lumeflows", registry=registry)
    def created(spec: kopf.Spec, patch: kopf.Patch, **_: Any) -> None:
        seen.append(spec["entrypoint"])
        patch.status["phase"] = "Deploying"

    run_kopf_operator(registry)
    apply(kubectl, lumeflow_manifest())

    def phase() -> str:
        return kubectl("get", "lf", "beam-stats", "-o", "jsonpath={.status.phase}").stdout

    assert wait_until(phase) == "Deploying"
    assert seen == ["flows/beam.py:beam_stats"]
    status_path = "/apis/lume.dev/v1alpha1/namespaces/default/lumeflows/beam-stats/status"
    assert k8s_emulator.emulator.count("PATCH", status_path) >= 1
    assert get(kubectl, "lf", "beam-stats")["metadata"]["generation"] == 1


def test_kopf_delete_handler_holds_deletion_until_done(
    kubectl: Kubectl, k8s_emulator: EmulatorServer, run_kopf_operator: Any
) -> None:
    registry = kopf_registry()
    deleted: list[str] = []

    @kopf.on.delete("lume.dev", "v1alpha1", "lumeflows", registry=registry)
    def on_delete(name: str, meta: kopf.Meta, **_: Any) -> None:
        assert meta.get("deletionTimestamp")  # still there while the handler runs
        deleted.append(name)

    run_kopf_operator(registry)
    apply(kubectl, lumeflow_manifest())
    finalizers = wait_until(lambda: get(kubectl, "lf", "beam-stats")["metadata"].get("finalizers"))
    assert finalizers == ["kopf.zalando.org/KopfFinalizerMarker"]

    kubectl("delete", "lf", "beam-stats", "--timeout=15s")  # waits until really gone
    assert deleted == ["beam-stats"]
    assert k8s_emulator.emulator.get_object(LF, "default", "beam-stats") is None


def test_kopf_operator_as_a_subprocess(
    kubectl: Kubectl, run_kopf_operator: Any, tmp_path: Path
) -> None:
    module = tmp_path / "tiny_operator.py"
    module.write_text(
        textwrap.dedent(
            """
            import kopf

            @kopf.on.create("lume.dev", "v1alpha1", "lumeflows")
            def created(patch, **_):
                patch.status["phase"] = "FromSubprocess"
            """
        )
    )
    operator = run_kopf_operator(str(module), in_subprocess=True)
    apply(kubectl, lumeflow_manifest())
    path = "jsonpath={.status.phase}"
    assert wait_until(lambda: kubectl("get", "lf", "beam-stats", "-o", path).stdout, 15) == (
        "FromSubprocess"
    )
    operator.stop()
    assert not operator.alive
    assert "Handler 'created' succeeded" in operator.output()


def test_watch_resumes_from_resource_version(
    k8s_emulator: EmulatorServer, kubectl: Kubectl
) -> None:
    """A watch from resourceVersion N replays only later events (kopf lists, then watches)."""
    apply(kubectl, lumeflow_manifest())
    rv = get(kubectl, "lf", "beam-stats")["metadata"]["resourceVersion"]
    kubectl("label", "lf", "beam-stats", "step=2")
    query = f"watch=true&resourceVersion={rv}&timeoutSeconds=1"
    url = f"{k8s_emulator.url}/apis/lume.dev/v1alpha1/namespaces/default/lumeflows?{query}"
    with urllib.request.urlopen(url, timeout=10) as reply:  # ends after timeoutSeconds
        assert reply.headers["Content-Type"].startswith("application/json")
        events = [json.loads(line) for line in reply.read().splitlines() if line.strip()]
    assert [e["type"] for e in events] == ["MODIFIED"]
    assert events[0]["object"]["metadata"]["labels"] == {"step": "2"}
    assert int(events[0]["object"]["metadata"]["resourceVersion"]) > int(rv)
