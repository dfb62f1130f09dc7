"""Strategic merge of Job manifests (backends/patch.py), checked against what the API server does.

Each case is one the Kubernetes docs spell out for strategic merge patch (update-api-object-
kubectl-patch): lists of containers, volumes and env merge by their keys, other lists are
replaced, `$patch` directives delete or replace, `null` deletes a field.
"""

from __future__ import annotations

import pytest

from lume_operator.backends.patch import strategic_merge

pytestmark = pytest.mark.unit

POD = {
    "containers": [
        {
            "name": "prefect-job",
            "image": "flow:1",
            "env": [{"name": "A", "value": "1"}],
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
            "args": ["a", "b"],
        }
    ],
    "volumes": [{"name": "tmp", "emptyDir": {}}],
    "tolerations": [{"key": "x", "operator": "Exists"}],
    "securityContext": {"runAsUser": 1000, "runAsNonRoot": True},
}


def test_lists_with_a_merge_key_merge_item_by_item() -> None:
    patch = {
        "containers": [
            {"name": "prefect-job", "env": [{"name": "B", "value": "2"}]},
            {"name": "sidecar", "image": "proxy:1"},
        ],
        "volumes": [{"name": "cache", "emptyDir": {"medium": "Memory"}}],
    }
    merged = strategic_merge(POD, patch)
    first, second = merged["containers"]
    assert first["image"] == "flow:1"  # untouched fields stay
    assert first["env"] == [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]
    assert second == {"name": "sidecar", "image": "proxy:1"}
    assert [v["name"] for v in merged["volumes"]] == ["tmp", "cache"]
    assert POD["containers"][0]["env"] == [{"name": "A", "value": "1"}]  # input not mutated


def test_lists_without_a_merge_key_are_replaced() -> None:
    merged = strategic_merge(POD, {"tolerations": [{"key": "gpu", "operator": "Exists"}]})
    assert merged["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    merged = strategic_merge(POD, {"containers": [{"name": "prefect-job", "args": ["c"]}]})
    assert merged["containers"][0]["args"] == ["c"]


def test_directives_and_null_delete_or_replace() -> None:
    patch = {
        "volumes": [{"name": "tmp", "$patch": "delete"}],
        "securityContext": {"$patch": "replace", "runAsUser": 2000},
        "containers": [{"name": "prefect-job", "volumeMounts": None}],
    }
    merged = strategic_merge(POD, patch)
    assert merged["volumes"] == []
    assert merged["securityContext"] == {"runAsUser": 2000}
    assert "volumeMounts" not in merged["containers"][0]


def test_an_item_without_its_merge_key_is_refused() -> None:
    with pytest.raises(ValueError, match="containers: each item needs its merge key 'name'"):
        strategic_merge(POD, {"containers": [{"image": "x"}]})
