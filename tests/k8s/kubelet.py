"""A kubelet stand-in: runs an agent Deployment's container as a local process.

It takes the container's command and environment exactly as the operator rendered them
(secretKeyRef values read from the emulator's Secrets), so a wrong command, pool name or env
fails the test. The image is the one thing it cannot honour: the process runs in this venv.
When the worker's health endpoint answers, it marks the Deployment ready, as a kubelet would.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.k8s.emulator import EmulatorServer
from tests.k8s.prefect_server import free_port


class KubeletStandIn:
    def __init__(
        self,
        server: EmulatorServer,
        namespace: str,
        name: str,
        workdir: Path,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.server, self.namespace, self.name = server, namespace, name
        self.workdir = workdir
        self.extra_env = extra_env or {}
        self.process: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"{name}.log"
        self.container: dict[str, Any] = {}
        self.env: dict[str, str] = {}

    def _env(self, container: dict[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = item["value"]
                continue
            ref = item["valueFrom"]["secretKeyRef"]
            secret = self.server.emulator.get_object("v1/secrets", self.namespace, ref["name"])
            assert secret is not None, f"Secret {ref['name']} missing for {item['name']}"
            env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        return env

    def start(self, timeout: float = 90) -> KubeletStandIn:
        deployment = self.server.emulator.get_object(
            "apps/v1/deployments", self.namespace, self.name
        )
        assert deployment is not None, f"Deployment {self.name} not created"
        self.container = deployment["spec"]["template"]["spec"]["containers"][0]
        self.env = self._env(self.container)
        port = free_port()
        bin_dir = str(Path(sys.executable).parent)
        env = {
            **os.environ,
            **self.env,
            # A pod has its own network and /tmp; here both are shared with the tests.
            "PREFECT_WORKER_WEBSERVER_PORT": str(port),
            "PREFECT_HOME": str(self.workdir / "prefect-home"),
            "HOME": str(self.workdir),
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            **self.extra_env,
        }
        command = list(self.container["command"]) + list(self.container.get("args", []))
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, env=env, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the worker exited:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    break
            except OSError:
                time.sleep(0.3)
        else:
            raise TimeoutError(f"worker health endpoint silent:\n{self.log.read_text()}")
        self.server.patch_status(
            "apps/v1/deployments",
            self.namespace,
            self.name,
            {"replicas": 1, "readyReplicas": 1, "availableReplicas": 1},
        )
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
