"""`lume-operator results` reading a resource's status from a cluster (the emulated API)."""

from __future__ import annotations

import socket
from pathlib import Path

import yaml

from lume_operator.results import TextFile
from tests.conftest import run_cli
from tests.k8s.emulator import EmulatorServer

LF = "lume.dev/v1alpha1/lumeflows"
RUN_ID = "5b1c0d7e-3f7a-4c55-9a7e-0c1d2e3f4a5b"


def test_results_list_and_get_read_a_lumeflows_status_in_the_cluster(
    k8s_emulator: EmulatorServer, kubeconfig: Path, tmp_path: Path
) -> None:
    report = TextFile(filename=str(tmp_path / "flow-out" / "report.txt")).write("emittance: 1e-8\n")
    k8s_emulator.emulator.put_object(
        LF,
        "default",
        {
            "metadata": {"name": "beam-stats", "namespace": "default"},
            "spec": {"backendRef": {"name": "local"}, "entrypoint": "flows/beam.py:beam_stats"},
        },
    )
    k8s_emulator.patch_status(
        LF,
        "default",
        "beam-stats",
        {
            "phase": "Completed",
            "lastRun": {"id": RUN_ID, "state": "Completed"},
            "results": [
                {
                    "name": "report",
                    "type": "TextFile",
                    "filesystem": "local",
                    "location": report.filename,
                }
            ],
        },
    )
    cluster = ("--kubeconfig", str(kubeconfig))
    listed = run_cli("results", "list", "lf/beam-stats", *cluster, cwd=tmp_path)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert "LumeFlow default/beam-stats" in listed.stdout
    row = next(line.split() for line in listed.stdout.splitlines() if "report" in line)
    assert row == ["report", "TextFile", report.filename]

    got = run_cli(
        "results", "get", "lf/beam-stats", "report", "-o", "copy.txt", *cluster, cwd=tmp_path
    )
    assert got.returncode == 0, got.stdout + got.stderr
    assert (tmp_path / "copy.txt").read_bytes() == b"emittance: 1e-8\n"

    # A flow run id finds the LumeFlow whose last run it is (listing the namespace).
    by_run = run_cli("results", "list", RUN_ID, "-o", "yaml", *cluster, cwd=tmp_path)
    assert by_run.returncode == 0, by_run.stdout + by_run.stderr
    assert yaml.safe_load(by_run.stdout) == [
        {"name": "report", "type": "TextFile", "filesystem": "local", "location": report.filename}
    ]

    # Errors: an object that is not there, and a cluster that does not answer.
    missing = run_cli("results", "list", "lf/other", *cluster, cwd=tmp_path)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert (
        f"no LumeFlow 'other' in namespace 'default' of the cluster at {k8s_emulator.url}"
        in " ".join(missing.stderr.split())
    )
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = yaml.safe_load(kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = f"http://127.0.0.1:{port}"
    dead = tmp_path / "dead-kubeconfig.yaml"
    dead.write_text(yaml.safe_dump(config))
    down = run_cli("results", "list", "lf/beam-stats", "--kubeconfig", str(dead), cwd=tmp_path)
    assert down.returncode == 1 and "Traceback" not in down.stderr
    assert f"cannot reach the cluster at http://127.0.0.1:{port}" in " ".join(down.stderr.split())
