"""The Prefect workers' own default base job templates, vendored as JSON.

The operator and the local runner do not need prefect-kubernetes or prefect-docker installed to
build a work pool for those types, so the workers' templates are kept here. Regenerate them with
`python -m lume_operator.backends.templates` (needs the test extras); a test fails when they
differ from the installed workers'.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent / "worker_templates"


def worker_default_template(worker_type: str) -> dict[str, Any]:
    """The installed Prefect worker's default base job template (imports the worker)."""
    # The docker and kubernetes workers are test/dev extras, never needed at run time.
    if worker_type == "process":
        from prefect.workers.process import ProcessWorker as Worker
    elif worker_type == "docker":
        from prefect_docker.worker import DockerWorker as Worker
    elif worker_type == "kubernetes":
        from prefect_kubernetes.worker import KubernetesWorker as Worker
    else:
        raise ValueError(f"unknown worker type {worker_type!r}")
    return Worker.get_default_base_job_template()


@cache
def _vendored(worker_type: str) -> dict[str, Any]:
    return json.loads((HERE / f"{worker_type}.json").read_text())


def vendored_template(worker_type: str) -> dict[str, Any]:
    """A fresh copy of the vendored default template of a worker type."""
    return copy.deepcopy(_vendored(worker_type))


def render(worker_type: str) -> str:
    return json.dumps(worker_default_template(worker_type), indent=2, sort_keys=True) + "\n"


def main() -> None:
    for worker_type in ("process", "docker", "kubernetes"):
        (HERE / f"{worker_type}.json").write_text(render(worker_type))
        print(f"wrote {HERE / f'{worker_type}.json'}")


if __name__ == "__main__":
    main()
