"""The documentation: docs/api.md generated from the models, a short README, no broken links."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lume_operator.api.reference import render_reference

from .conftest import ROOT, run_cli

README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_BYTES = 11000

FENCED = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def relative_links(path: Path) -> list[str]:
    """Targets of the Markdown links in a file that point into this repository."""
    text = INLINE_CODE.sub("", FENCED.sub("", path.read_text()))
    targets = [match.group(1) for match in LINK.finditer(text)]
    return [t for t in targets if not re.match(r"^([a-z][a-z0-9+.-]*:|#)", t, re.IGNORECASE)]


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


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes (at most {README_MAX_BYTES}): move detail into docs/"
    )


@pytest.mark.parametrize(
    "document", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: str(p.relative_to(ROOT))
)
def test_relative_links_point_to_existing_files(document):
    broken = [
        target
        for target in relative_links(document)
        if not (document.parent / target.split("#", 1)[0]).exists()
    ]
    assert not broken, f"{document.relative_to(ROOT)} links to missing files: {broken}"


def test_link_checker_sees_links():
    """The check above is not vacuous: README links into docs/."""
    assert any(target.startswith("docs/") for target in relative_links(README))
