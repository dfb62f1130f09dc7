"""The documentation: docs/api.md generated from the models."""

from __future__ import annotations

import re

from lume_operator.api.reference import render_reference

from .conftest import ROOT, run_cli

DOCS = ROOT / "docs"


def test_api_reference_matches_the_models(tmp_path):
    """Regenerating with the project's own command changes nothing in docs/api.md."""
    output = tmp_path / "api.md"
    result = run_cli("api-docs", "-o", str(output))
    assert result.returncode == 0, result.stderr
    assert output.read_text() == (DOCS / "api.md").read_text(), (
        "docs/api.md is stale: run `lume-operator api-docs -o docs/api.md`"
    )


def test_api_docs_prints_to_stdout_by_default():
    result = run_cli("api-docs")
    assert result.returncode == 0, result.stderr
    assert result.stdout == render_reference()


def test_api_reference_covers_every_kind_and_enum():
    text = render_reference()
    for kind in ("SchedulingBackend", "LumeFlow", "FlowOfFlows"):
        assert f"## {kind}\n" in text
    assert "| `spec.backendRef` | [ObjectRef](#objectref) | required |" in text
    assert "one of `OnChange`, `Schedule`, `OnRequest` | default `OnChange`" in text
    assert "\n### RunConfig\n" in text  # a nested model has its own section
    for anchor in set(re.findall(r"\]\(#([a-z0-9-]+)\)", text)):
        assert f'<a id="{anchor}"></a>' in text, f"link to a missing section #{anchor}"
