"""Shared pieces of the three kinds: the base model, object metadata, conditions and quantities."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic.alias_generators import to_camel

from lume_operator import API_VERSION

# Kubernetes' resource.Quantity grammar: a signed decimal number, then a binary-SI suffix
# (Ki..Ei), a decimal-SI suffix (n, u, m, k, M, G, T, P, E) or a decimal exponent (e3).
QUANTITY_PATTERN = (
    r"^[+-]?(\d+(\.\d*)?|\.\d+)"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?(\d+(\.\d*)?|\.\d+)))?$"
)
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)

# RFC 1123 label: what Kubernetes accepts for most object names and label-like values.
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# RFC 1123 subdomain: metadata.name of most kinds.
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A label users select by: a work queue name and a tag, so a DNS label.
Label = Annotated[str, Field(pattern=DNS_LABEL_PATTERN, max_length=63)]


class Model(BaseModel):
    """Base of every API model: camelCase on the wire, unknown fields rejected by name."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=False,
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as it appears in a manifest: camelCase, unset fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def _strict_quantity(value: Any) -> Any:
    if isinstance(value, bool) or isinstance(value, int | float):
        raise ValueError(
            f"{value!r} must be a string Kubernetes quantity: write it in quotes, e.g. '{value}'"
        )
    return value


def _check_quantity(value: str) -> str:
    if not _QUANTITY_RE.match(value):
        raise ValueError(
            f"{value!r} is not a Kubernetes quantity (for example '500m', '2', '512Mi' or '2Gi')"
        )
    return value


Quantity = Annotated[
    str,
    BeforeValidator(_strict_quantity),
    AfterValidator(_check_quantity),
    Field(json_schema_extra={"pattern": QUANTITY_PATTERN}),
]


def parse_quantity(quantity: str) -> Decimal:
    """Kubernetes' own reading of a quantity, so that "0.5", "500m" and "1.5Gi" mean here what
    they mean to a kubelet."""
    # A pure helper (no API client, no I/O), imported here because importing `kubernetes`
    # takes 0.6 s that the models do not otherwise need. The layer contract allows exactly
    # this import (pyproject.toml, [tool.importlinter]).
    from kubernetes.utils import parse_quantity as parse

    return parse(quantity)


def quantity_to_bytes(quantity: str) -> int:
    """A memory quantity in bytes, for runtimes (Docker) that do not speak Kubernetes units."""
    return int(parse_quantity(quantity))


def quantity_to_cpus(quantity: str) -> float:
    """A CPU quantity in cores ('500m' and '0.5' are 0.5)."""
    return float(parse_quantity(quantity))


def quantity_to_nano_cpus(quantity: str) -> int:
    """A CPU quantity in billionths of a core, exactly (Docker's `nano_cpus`)."""
    return int(parse_quantity(quantity) * 1_000_000_000)


def require_unique(what: str, names: list[str]) -> None:
    """Raise naming every repeated name: lists keyed by name (steps, volumes, results)."""
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{what} names must be unique: {', '.join(repeated)} repeated")


class ObjectMeta(Model):
    """The part of Kubernetes' ObjectMeta that lume-operator reads."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(
        description="Name of the object, unique in its namespace.",
        pattern=DNS_SUBDOMAIN_PATTERN,
        max_length=253,
    )
    namespace: str = Field(default="default", description="Namespace of the object.")
    uid: str | None = Field(default=None, description="Unique id set by the API server.")
    generation: int | None = Field(
        default=None, description="Spec generation, set by the API server."
    )
    labels: dict[str, str] = Field(default_factory=dict, description="Kubernetes labels.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Kubernetes annotations.")


class SecretKeyRef(Model):
    """A key in a Secret of the resource's namespace: the only way credentials reach the operator."""

    name: str = Field(description="Name of the Secret.", pattern=DNS_SUBDOMAIN_PATTERN)
    key: str = Field(default="api-key", description="Key in the Secret's data.")


class AuthStringSecretRef(SecretKeyRef):
    """A key in a Secret of the resource's namespace holding Prefect's basic-auth string."""

    key: str = Field(default="auth-string", description="Key in the Secret's data.")


class Condition(Model):
    """A kstatus-style condition: stable CamelCase reasons, messages without timestamps."""

    type: str = Field(description="Condition type, e.g. Ready, Reconciling or Stalled.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(default="", description="Stable CamelCase reason for the status.")
    message: str = Field(default="", description="Human-readable detail.")
    observed_generation: int | None = Field(
        default=None, description="The spec generation this condition was computed from."
    )
    last_transition_time: str | None = Field(
        default=None, description="When the status last changed (RFC 3339)."
    )


class Resource(Model):
    """A whole manifest of one of our kinds; subclasses pin `kind`, `spec` and `status`."""

    api_version: Literal["lume.dev/v1alpha1"] = Field(
        default=API_VERSION, description="APIVersion of this object: lume.dev/v1alpha1."
    )
    metadata: ObjectMeta = Field(description="Standard object metadata.")

    @property
    def key(self) -> str:
        """namespace/name, how users and logs refer to the object."""
        return f"{self.metadata.namespace}/{self.metadata.name}"
