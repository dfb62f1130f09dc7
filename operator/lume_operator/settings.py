"""The operator's settings, from the environment (`LUME_OPERATOR_*`), read at each start.

Every field is described and bounded, so a bad value stops the operator at start with the
variable's name instead of misbehaving later.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from lume_operator import __version__


class OperatorSettings(BaseSettings):
    """How the operator paces itself and where it finds Prefect when a backend does not say."""

    model_config = SettingsConfigDict(
        env_prefix="LUME_OPERATOR_", extra="ignore", populate_by_name=True
    )

    follow_interval: float = Field(
        default=5.0,
        ge=0.2,
        le=3600,
        description="Seconds between reads of runs in flight and of backend health.",
    )
    prefect_concurrency: int = Field(
        default=8,
        ge=1,
        le=256,
        description="Prefect calls in flight at once to one Prefect API at start, across all "
        "objects (a mass apply queues); the limit then follows the server's latency.",
    )
    prefect_concurrency_max: int = Field(
        default=64,
        ge=1,
        le=1024,
        description="The most Prefect calls in flight at once to one Prefect API, however "
        "fast it answers.",
    )
    prefect_timeout: float = Field(
        default=10.0, ge=0.5, le=300, description="Seconds before one Prefect call gives up."
    )
    max_backoff: float = Field(
        default=60.0, ge=1, le=3600, description="Longest wait between retries of one object."
    )
    error_backoff: float = Field(
        default=10.0,
        ge=0.5,
        le=3600,
        description="Retry delay after an unexpected error (a refused Kubernetes call).",
    )
    step_poll_interval: float = Field(
        default=2.0,
        ge=0.1,
        le=600,
        description="Seconds between a FlowOfFlows parent run's reads of a running step.",
    )
    secret_ttl: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description="Seconds a Secret's value (a Prefect API key) is used before it is read "
        "again: a rotated key takes effect within this time.",
    )
    cancel_grace: float = Field(
        default=60.0,
        ge=0,
        le=3600,
        description="Seconds a deletion waits for cancelled runs to stop (their worker ends "
        "them) before marking them Cancelled in Prefect itself.",
    )
    volumes_root: Path = Field(
        default=Path("/var/run/lume/volumes"),
        description="Where the operator finds the claims of backends with volume result "
        "storage: <root>/<namespace>/<claimName> (the chart's resultVolumes mounts them).",
    )
    scan_cluster: bool = Field(
        default=True,
        description="kopf lists and watches CustomResourceDefinitions (and, watching listed "
        "namespaces, the Namespaces) to notice them change. False where the operator has no "
        "cluster-wide rights (the chart's namespaced mode): what exists at start is served.",
    )
    agent_image: str = Field(
        default=f"lume-operator:{__version__}",
        min_length=1,
        description="Image of process backends' agents with warm starts (`lume-operator "
        "worker`) when the backend names none: the operator's own (the chart sets it).",
    )
    default_api_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("LUME_PREFECT_API_URL", "PREFECT_API_URL"),
        description="Prefect API of backends that name none (LUME_PREFECT_API_URL, "
        "else PREFECT_API_URL).",
    )

    default_api_auth_string: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("PREFECT_API_AUTH_STRING"),
        description="Basic-auth 'user:password' of the default Prefect API (the bundled "
        "server's, from a Secret); never logged.",
    )

    def backoff(self, retry: int) -> float:
        """1, 2, 4, ... seconds, at most `max_backoff`."""
        return min(self.max_backoff, 2.0 ** min(retry, 16))
