"""Strategic merge patch, client-side, for the Job manifests of kubernetes work pools.

Why our own: a `jobTemplatePatch` is merged into the pool's base job template before Prefect
ever sees it, so no API server does the merge; and no maintained Python library implements
strategic merge. This covers what a Job manifest holds: maps merge; lists of objects merge by
the key Kubernetes declares for them (`x-kubernetes-patch-merge-key`); other lists are
replaced; `$patch: delete` removes a list item or a map, `$patch: replace` replaces a map
instead of merging it; a `null` value deletes a field.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

# patchMergeKey of each list field of a Job/PodSpec that Kubernetes merges (its OpenAPI).
MERGE_KEYS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
    "topologySpreadConstraints": "topologyKey",
    "resourceClaims": "name",
    "ownerReferences": "uid",
    "conditions": "type",
}
DIRECTIVE = "$patch"


def strategic_merge(target: Any, patch: Any, field: str | None = None) -> Any:
    """`target` with `patch` merged in, as the API server would merge a strategic patch."""
    if isinstance(patch, Mapping):
        if patch.get(DIRECTIVE) == "replace":
            return {k: copy.deepcopy(v) for k, v in patch.items() if k != DIRECTIVE}
        if patch.get(DIRECTIVE) == "delete":
            return None
        merged = copy.deepcopy(dict(target)) if isinstance(target, Mapping) else {}
        for key, value in patch.items():
            if key == DIRECTIVE:
                continue
            if value is None:
                merged.pop(key, None)
                continue
            result = strategic_merge(merged.get(key), value, key)
            if result is None:
                merged.pop(key, None)
            else:
                merged[key] = result
        return merged
    if isinstance(patch, list) and field in MERGE_KEYS and isinstance(target, list):
        return _merge_list(target, patch, MERGE_KEYS[field], field)
    return copy.deepcopy(patch)


def _merge_list(target: list[Any], patch: list[Any], key: str, field: str) -> list[Any]:
    merged = copy.deepcopy(target)
    for item in patch:
        if not isinstance(item, Mapping) or key not in item:
            raise ValueError(f"{field}: each item needs its merge key {key!r}")
        index = next(
            (
                i
                for i, old in enumerate(merged)
                if isinstance(old, Mapping) and old.get(key) == item[key]
            ),
            None,
        )
        if item.get(DIRECTIVE) == "delete":
            if index is not None:
                del merged[index]
            continue
        if index is None:
            merged.append({k: copy.deepcopy(v) for k, v in item.items() if k != DIRECTIVE})
        else:
            merged[index] = strategic_merge(merged[index], item, None)
    return merged
