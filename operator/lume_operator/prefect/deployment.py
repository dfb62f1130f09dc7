"""A deployment as lume-operator wants it, and the pure diff against what Prefect has.

No Prefect import here: the gateway turns Prefect's deployment into a `DeploymentView`, so the
"would this write change anything?" decision is plain data and unit-tested as such.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class DeploymentView:
    """What Prefect holds for a deployment, in the fields `DeploymentSpec` defines."""

    id: str
    flow_name: str
    name: str
    entrypoint: str | None = None
    work_pool_name: str | None = None
    work_queue_name: str | None = None
    job_variables: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    pull_steps: list[dict[str, Any]] | None = None
    description: str | None = None
    # Cron schedules as {"cron": ..., "timezone": ...}.
    schedules: list[dict[str, str]] = field(default_factory=list)
    parameter_openapi_schema: dict[str, Any] | None = None


@dataclass
class DeploymentSpec:
    """Everything that defines a deployment; compared field by field before any write."""

    flow_name: str
    name: str
    entrypoint: str
    work_pool_name: str
    work_queue_name: str
    job_variables: dict[str, Any]
    parameters: dict[str, Any]
    tags: list[str]
    pull_steps: list[dict[str, Any]] = field(default_factory=list)
    parameter_openapi_schema: dict[str, Any] | None = None
    # Never None: Prefect stores a missing description as the text "None".
    description: str = "Managed by lume-operator."
    # Cron schedules as {"cron": ..., "timezone": ...}; None: no schedule.
    schedules: list[dict[str, str]] | None = None

    def differs_from(self, current: DeploymentView) -> list[str]:
        """Names of the fields whose current value in Prefect is not what we want.

        Each deployment update deletes its future scheduled runs, so an update that changes
        nothing is not harmless: callers write only when this is non-empty.
        """
        wanted: dict[str, Any] = {
            "entrypoint": self.entrypoint,
            "work_pool_name": self.work_pool_name,
            "work_queue_name": self.work_queue_name,
            "job_variables": self.job_variables,
            "parameters": self.parameters,
            "tags": sorted(self.tags),
            "pull_steps": self.pull_steps or None,
            "description": self.description,
            "schedules": self.schedules or [],
        }
        actual: dict[str, Any] = {
            "entrypoint": current.entrypoint,
            "work_pool_name": current.work_pool_name,
            "work_queue_name": current.work_queue_name,
            "job_variables": current.job_variables or {},
            "parameters": current.parameters or {},
            "tags": sorted(current.tags or []),
            "pull_steps": current.pull_steps or None,
            "description": current.description,
            "schedules": current.schedules or [],
        }
        changed = [name for name in wanted if wanted[name] != actual[name]]
        if self.parameter_openapi_schema is not None and (
            self.parameter_openapi_schema != current.parameter_openapi_schema
        ):
            changed.append("parameter_openapi_schema")
        return changed
