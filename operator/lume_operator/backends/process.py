"""The `process` backend: flow runs are local processes started by a Prefect process worker."""

from __future__ import annotations

from typing import Any

from lume_operator.backends.base import Backend, TypedRunConfig

# Prefect 3.9's ProcessWorker default template (prefect.workers.process); checked by a test.
_TEMPLATE: dict[str, Any] = {
    "job_configuration": {
        "command": "{{ command }}",
        "env": "{{ env }}",
        "labels": "{{ labels }}",
        "name": "{{ name }}",
        "stream_output": "{{ stream_output }}",
        "working_dir": "{{ working_dir }}",
    },
    "variables": {
        "type": "object",
        "properties": {
            "name": {
                "anyOf": [{"type": "string"}, {"type": "null"}],
                "default": None,
                "description": "Name given to infrastructure created by a worker.",
                "title": "Name",
            },
            "env": {
                "additionalProperties": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "description": "Environment variables to set when starting a flow run.",
                "title": "Environment Variables",
                "type": "object",
            },
            "labels": {
                "additionalProperties": {"type": "string"},
                "description": "Labels applied to infrastructure created by a worker.",
                "title": "Labels",
                "type": "object",
            },
            "command": {
                "anyOf": [{"type": "string"}, {"type": "null"}],
                "default": None,
                "description": "The command to use when starting a flow run.",
                "title": "Command",
            },
            "stream_output": {
                "default": True,
                "description": "Stream output from flow run processes to the worker's output.",
                "title": "Stream Output",
                "type": "boolean",
            },
            "working_dir": {
                "anyOf": [{"format": "path", "type": "string"}, {"type": "null"}],
                "default": None,
                "description": "Working directory of flow run processes.",
                "title": "Working Directory",
            },
        },
    },
}


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
        return self._copy(_TEMPLATE)
