"""What every backend type provides: a typed run config and the Prefect job variables for it."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from pydantic import Field

from lume_operator.api.backend import ResultStorage
from lume_operator.api.common import Model
from lume_operator.api.runconfig import APPLICABLE_FIELDS, RunConfig

# The name of the result storage's volume in pods (and its mount in their containers).
STORAGE_VOLUME = "lume-result-storage"


class TypedRunConfig(Model):
    """Base of the per-backend run configs: only the fields that backend understands."""

    env: dict[str, str] = Field(default_factory=dict, description="Environment of the run.")
    labels: dict[str, str] = Field(default_factory=dict, description="Infrastructure labels.")
    working_dir: str | None = Field(default=None, description="Working directory of the run.")
    stream_output: bool = Field(default=True, description="Stream the run's output.")


class Backend(ABC):
    """One backend type. Pure: spec in, Prefect objects out; never calls an API."""

    type: ClassVar[str]
    run_config_model: ClassVar[type[TypedRunConfig]]

    @property
    def work_pool_type(self) -> str:
        """The Prefect work pool (and worker) type."""
        return self.type

    def run_config(
        self, defaults: RunConfig | None, overrides: RunConfig | None = None
    ) -> tuple[TypedRunConfig, list[str]]:
        """The backend's defaults with a flow's overrides on top, kept to what applies here.

        Returns the typed config and the camelCase names of override fields that do not apply
        to this backend type (a flow written for a cluster also runs on a laptop).
        """
        merged = (overrides or RunConfig()).merged_over(defaults or RunConfig())
        applicable = APPLICABLE_FIELDS[self.type]
        ignored = [name for name in merged.set_fields() if name not in applicable]
        values = {
            key: value
            for key, value in merged.model_dump(exclude_none=True).items()
            if (RunConfig.model_fields[key].alias or key) in applicable
        }
        return self.run_config_model.model_validate(values), ignored

    @abstractmethod
    def job_variables(self, config: TypedRunConfig) -> dict[str, Any]:
        """The deployment's `job_variables` for this config."""

    def storage_variables(self, storage: ResultStorage) -> dict[str, Any]:
        """Job variables (besides env) that give each run the backend's result storage: its
        volume, its credentials by reference. A process run gets both from its worker, whose
        environment and mounts it inherits (see backends/agent.py)."""
        return {}

    @abstractmethod
    def base_job_template(self) -> dict[str, Any]:
        """The work pool's base job template: the worker's own, with what lume-operator adds."""

    @staticmethod
    def _copy(template: dict[str, Any]) -> dict[str, Any]:
        return copy.deepcopy(template)
