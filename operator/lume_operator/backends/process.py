"""The `process` backend: flow runs are local processes started by a Prefect process worker."""

from __future__ import annotations

from typing import Any

from lume_operator.backends.base import Backend, TypedRunConfig
from lume_operator.backends.templates import vendored_template


class ProcessRunConfig(TypedRunConfig):
    """A flow run as a local process: its environment and working directory."""


class ProcessBackend(Backend):
    type = "process"
    run_config_model = ProcessRunConfig

    def job_variables(self, config: TypedRunConfig) -> dict[str, Any]:
        variables: dict[str, Any] = {"stream_output": config.stream_output}
        if config.env:
            variables["env"] = dict(config.env)
        if config.labels:
            variables["labels"] = dict(config.labels)
        if config.working_dir:
            variables["working_dir"] = config.working_dir
        return variables

    def base_job_template(self) -> dict[str, Any]:
        return vendored_template("process")
