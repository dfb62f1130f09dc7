"""Argo CD health checks of the three kinds, run by a real Lua interpreter against their fixtures.

Why Lua 5.1 from `lupa`: Argo CD runs `health.lua` in gopher-lua, a Lua 5.1, with a global `obj`
and no `os`, `io` or module loading; the runtime below is the same language with the same
globals removed, so a script that passes here uses nothing Argo CD lacks. The layout
(`<group>/<Kind>/health.lua`, `health_test.yaml`, `testdata/`) is Argo CD's own
`resource_customizations`, whose test form is `{tests: [{healthStatus: {status, message},
inputPath}]}`.

`python -m tests.test_argo_health` rewrites deploy/argocd/argocd-cm-patch.yaml from the scripts;
a test fails when the two differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import lupa.lua51
import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
ARGOCD = ROOT / "deploy" / "argocd"
CUSTOMIZATIONS = ARGOCD / "resource_customizations" / "lume.dev"
PATCH = ARGOCD / "argocd-cm-patch.yaml"
KINDS = ("SchedulingBackend", "LumeFlow", "FlowOfFlows")
# Globals Argo CD's Lua VM does not offer (or that would reach outside the script).
UNSAFE_GLOBALS = (
    "os",
    "io",
    "require",
    "package",
    "dofile",
    "loadfile",
    "load",
    "loadstring",
    "debug",
    "module",
    "collectgarbage",
    "coroutine",
)


def health(kind: str, manifest: dict[str, Any]) -> dict[str, str]:
    """What Argo CD would show for `manifest`: {status, message}."""
    lua = lupa.lua51.LuaRuntime(register_eval=False, register_builtins=False)
    env = lua.globals()
    for name in UNSAFE_GLOBALS:
        env[name] = None
    env.obj = lua.table_from(manifest, recursive=True)
    result = lua.execute((CUSTOMIZATIONS / kind / "health.lua").read_text())
    return dict(result.items())


def cases() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for kind in KINDS:
        spec = yaml.safe_load((CUSTOMIZATIONS / kind / "health_test.yaml").read_text())
        out += [(kind, case) for case in spec["tests"]]
    return out


CASES = cases()


@pytest.mark.parametrize(
    ("kind", "case"), CASES, ids=[f"{k}-{Path(c['inputPath']).stem}" for k, c in CASES]
)
def test_health_of_each_fixture(kind, case):
    manifest = yaml.safe_load((CUSTOMIZATIONS / kind / case["inputPath"]).read_text())
    assert health(kind, manifest) == case["healthStatus"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_status_that_applies_has_a_case(kind):
    statuses = {c["healthStatus"]["status"] for k, c in CASES if k == kind}
    required = {"Healthy", "Progressing", "Degraded"}
    # A SchedulingBackend has no paused state; a flow (or composition) run can be paused.
    if kind != "SchedulingBackend":
        required.add("Suspended")
    assert statuses == required


@pytest.mark.parametrize("kind", KINDS)
def test_fixtures_are_valid_objects_of_their_kind(kind):
    """The fixtures are objects the API server would accept: checked against our own CRD."""
    plural = {"SchedulingBackend": "schedulingbackends", "LumeFlow": "lumeflows"}.get(
        kind, "flowofflows"
    )
    crd = yaml.safe_load((ROOT / "crds" / f"lume.dev_{plural}.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    paths = sorted((CUSTOMIZATIONS / kind / "testdata").glob("*.yaml"))
    assert len(paths) == len([c for k, c in CASES if k == kind])
    for path in paths:
        manifest = yaml.safe_load(path.read_text())
        assert manifest["kind"] == kind
        jsonschema.validate(manifest, schema)


def test_scripts_use_nothing_outside_argo_cds_sandbox():
    """Each script, run with no status at all, needs no global beyond the safe ones."""
    for kind in KINDS:
        manifest = {"apiVersion": "lume.dev/v1alpha1", "kind": kind, "metadata": {"name": "x"}}
        assert health(kind, manifest)["status"] == "Progressing"


def render_argocd_cm_patch() -> str:
    """The merge patch of argocd-cm that installs the three health checks."""
    lines = [
        "# Generated from resource_customizations/lume.dev/*/health.lua by",
        "# `python -m tests.test_argo_health`; do not edit. Apply to a running Argo CD with:",
        "#   kubectl -n argocd patch configmap argocd-cm --type merge \\",
        "#     --patch-file deploy/argocd/argocd-cm-patch.yaml",
        "# (with Argo CD's Helm chart, put the same keys under configs.cm instead).",
        "data:",
    ]
    for kind in KINDS:
        lines.append(f"  resource.customizations.health.lume.dev_{kind}: |")
        script = (CUSTOMIZATIONS / kind / "health.lua").read_text()
        lines += [f"    {line}" if line else "" for line in script.rstrip("\n").split("\n")]
    return "\n".join(lines) + "\n"


def test_argocd_cm_patch_is_up_to_date():
    assert PATCH.read_text() == render_argocd_cm_patch(), (
        "run `python -m tests.test_argo_health` to regenerate deploy/argocd/argocd-cm-patch.yaml"
    )
    data = yaml.safe_load(PATCH.read_text())["data"]
    for kind in KINDS:
        script = (CUSTOMIZATIONS / kind / "health.lua").read_text()
        assert data[f"resource.customizations.health.lume.dev_{kind}"] == script


if __name__ == "__main__":
    PATCH.write_text(render_argocd_cm_patch())
    print(f"wrote {PATCH.relative_to(ROOT)}")
