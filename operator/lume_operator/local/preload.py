"""Which of a flow's imports the fork server may import ahead of its runs.

A warm run skips Prefect's import; it can also skip its flow's heavy dependencies (numpy,
lume-base: seconds each) if the fork server imported them. Only installed packages qualify:
the project's own modules change between runs and run the user's code at import, so they are
imported by each run, as before. Read from the flow file's top-level imports (not executed).
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

# The parent flow of every FlowOfFlows (it imports only Prefect and lume-operator).
ALWAYS = ("lume_operator.flows.composition",)


def _installed(name: str, project_dir: Path) -> bool:
    """A top-level package found outside the project (site-packages), not the project's own."""
    if name in sys.stdlib_module_names:  # cheap, and mostly imported already
        return False
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    if spec is None or spec.origin in (None, "built-in", "frozen"):
        return False
    where = Path(spec.origin).resolve()
    return not where.is_relative_to(project_dir.resolve())


def installed_imports(source_file: Path, project_dir: Path) -> list[str]:
    """Modules the file imports at its top level that come from installed packages."""
    try:
        tree = ast.parse(source_file.read_text())
    except (OSError, SyntaxError, UnicodeDecodeError):
        return []
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    found: list[str] = []
    for name in names:
        if name not in found and _installed(name.split(".")[0], project_dir):
            found.append(name)
    return found


def preload_for(sources: list[tuple[Path, Path]]) -> list[str]:
    """The preload list for flows given as (source file, project directory) pairs."""
    found: list[str] = list(ALWAYS)
    for source_file, project_dir in sources:
        for name in installed_imports(source_file, project_dir):
            if name not in found:
                found.append(name)
    return found
