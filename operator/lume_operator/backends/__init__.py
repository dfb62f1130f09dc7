"""Backend types: each turns run-config specs into Prefect work pool templates and job variables."""

from __future__ import annotations

from lume_operator.api.backend import SchedulingBackend
from lume_operator.api.flow import LumeFlow
from lume_operator.backends.base import Backend, TypedRunConfig
from lume_operator.backends.docker import DockerBackend
from lume_operator.backends.kubernetes import KubernetesBackend
from lume_operator.backends.process import ProcessBackend

BACKENDS: dict[str, Backend] = {
    backend.type: backend for backend in (ProcessBackend(), DockerBackend(), KubernetesBackend())
}


def get_backend(backend_type: str) -> Backend:
    """The backend implementation of a type ('kubernetes', 'docker' or 'process')."""
    try:
        return BACKENDS[backend_type]
    except KeyError:
        raise ValueError(
            f"unknown backend type {backend_type!r} (expected one of {', '.join(BACKENDS)})"
        ) from None


def work_queue(flow: LumeFlow) -> str:
    """The flow's work queue: its first label, or the pool's default queue."""
    return flow.spec.labels[0] if flow.spec.labels else "default"


def tags(flow: LumeFlow, backend: SchedulingBackend) -> list[str]:
    """Prefect tags of a flow's deployment and runs: every label, plus where it came from."""
    labels = [*(flow.spec.labels or []), f"lume.dev/flow={flow.metadata.name}"]
    labels.append(f"lume.dev/backend={backend.metadata.name}")
    return list(dict.fromkeys(labels))


__all__ = ["BACKENDS", "Backend", "TypedRunConfig", "get_backend", "tags", "work_queue"]
