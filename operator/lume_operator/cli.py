"""The `lume-operator` command: run and validate manifests locally, generate CRDs and API docs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from lume_operator import __version__

# Each command imports what it needs when it runs, not here: Prefect, kopf and lume-base take
# seconds to import, and `--help`, `crds` or `validate` of a bad file should not wait for them.

FILES = click.option(
    "-f",
    "--filename",
    "paths",
    multiple=True,
    required=True,
    type=click.Path(path_type=str),
    help="Manifest file or directory (multi-document YAML); repeatable.",
)


def _console() -> Console:
    return Console(soft_wrap=True, highlight=False)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lume-operator")
def main() -> None:
    """Prefect 3 workflows as Kubernetes objects: LumeFlow, FlowOfFlows, SchedulingBackend."""
    # Nothing here may reach the network by itself (no telemetry from the embedded server).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@main.command()
@FILES
def validate(paths: tuple[str, ...]) -> None:
    """Check manifests: every problem, with its field path; exit 1 if any."""
    from lume_operator.api.manifests import ManifestError
    from lume_operator.flows.convert import load_manifests as load

    console = _console()
    try:
        manifests = load(paths)
    except ManifestError as error:
        for problem in error.problems:
            console.print(f"[red]error[/red] {escape(str(problem))}")
        sys.exit(1)
    from lume_operator.local.checks import composition_problems_local

    manifests.problems.extend(composition_problems_local(manifests))
    for skipped in manifests.skipped:
        console.print(escape(f"skipped {skipped}: not a lume.dev resource"))
    if manifests.problems:
        for problem in manifests.problems:
            console.print(f"[red]error[/red] {escape(str(problem))}")
        console.print(f"{len(manifests.problems)} problem(s)")
        sys.exit(1)
    count = len(manifests.backends) + len(manifests.flows) + len(manifests.compositions)
    console.print(f"{count} resource(s) valid")


@main.command()
@FILES
@click.option(
    "--status-out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write the resulting status as YAML to this file.",
)
@click.option(
    "--results-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("lume-results"),
    show_default=True,
    help="Where flow runs write their file results (one directory per run).",
)
@click.option(
    "--timeout", type=float, default=3600.0, show_default=True, help="Seconds to wait for runs."
)
def run(paths: tuple[str, ...], status_out: Path | None, results_dir: Path, timeout: float) -> None:
    """Run the LumeFlows in the manifests on Prefect (embedded unless PREFECT_API_URL is set)."""
    from lume_operator.api.manifests import ManifestError
    from lume_operator.local.runner import run_local

    console = _console()
    try:
        code = run_local(
            list(paths),
            console=console,
            results_root=results_dir,
            status_out=status_out,
            timeout=timeout,
        )
    except ManifestError as error:
        for problem in error.problems:
            console.print(f"[red]error[/red] {escape(str(problem))}")
        code = 1
    except Exception as error:  # never a traceback for users; LUME_OPERATOR_DEBUG=1 shows it
        if os.environ.get("LUME_OPERATOR_DEBUG"):
            raise
        console.print(f"[red]error[/red] {escape(type(error).__name__)}: {escape(str(error))}")
        code = 1
    sys.exit(code)


@main.command()
@click.option(
    "-f",
    "--filename",
    "path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A flow-of-flows YAML in the original lume-services format.",
)
@click.option("--namespace", default="default", show_default=True, help="Namespace of the result.")
def convert(path: Path, namespace: str) -> None:
    """Print the FlowOfFlows manifest equivalent to an original-format flow-of-flows YAML."""
    import yaml

    from lume_operator.flows.convert import LegacyFormatError, dump
    from lume_operator.flows.convert import convert as convert_document

    console = _console()
    try:
        document = yaml.safe_load(path.read_text())
        manifest = convert_document(document, namespace=namespace)
    except yaml.YAMLError as error:
        console.print(f"[red]error[/red] {escape(str(path))}: not valid YAML: {escape(str(error))}")
        sys.exit(1)
    except LegacyFormatError as error:
        for where, message in error.problems:
            console.print(
                f"[red]error[/red] {escape(str(path))}: {escape(where)}: {escape(message)}"
            )
        sys.exit(1)
    click.echo(dump(manifest), nl=False)


@main.command()
@FILES
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write .dot, .png or .svg (the images need Graphviz's `dot`). Default: DOT to stdout.",
)
def graph(paths: tuple[str, ...], output: Path | None) -> None:
    """Draw each FlowOfFlows in the manifests as a Graphviz DAG."""
    from lume_operator.flows.convert import load_manifests as load
    from lume_operator.flows.graph import GraphvizNotFound, render, to_dot

    console = _console()
    manifests = load(paths)
    if manifests.problems or not manifests.compositions:
        for problem in manifests.problems:
            console.print(f"[red]error[/red] {escape(str(problem))}")
        if not manifests.compositions:
            console.print("[red]error[/red] no FlowOfFlows in the manifests given")
        sys.exit(1)
    dot = "\n".join(to_dot(fof) for fof in manifests.compositions)
    if output is None:
        click.echo(dot, nl=False)
        return
    try:
        render(dot, output)
    except (GraphvizNotFound, RuntimeError, ValueError) as error:
        console.print(f"[red]error[/red] {escape(str(error))}")
        sys.exit(1)
    click.echo(str(output))


@main.command()
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("crds"),
    show_default=True,
    help="Directory to write the CRD YAML files into.",
)
@click.option(
    "--chart",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Also copy them into this Helm chart's crds/. Default: charts/lume-operator when "
    "it exists here.",
)
def crds(output: Path, chart: Path | None) -> None:
    """Generate the CustomResourceDefinitions from the API models."""
    from lume_operator.api.crds import write_all, write_chart_crds

    for path in write_all(output):
        click.echo(str(path))
    default_chart = Path("charts/lume-operator")
    if chart is None and (default_chart / "Chart.yaml").exists():
        chart = default_chart
    if chart is not None:
        for path in write_chart_crds(chart):
            click.echo(str(path))


@main.command("api-docs")
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Write the Markdown to this file (e.g. docs/api.md). Default: print it.",
)
def api_docs(output: Path | None) -> None:
    """Generate the API reference (Markdown) from the API models."""
    from lume_operator.api.reference import render_reference

    text = render_reference()
    if output is None:
        click.echo(text, nl=False)
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    if not output.exists() or output.read_text() != text:
        output.write_text(text)
    click.echo(str(output))


@main.command("operator")
@click.option(
    "--namespace",
    "namespaces",
    multiple=True,
    help="Namespace to watch (repeatable). None: the whole cluster.",
)
@click.option(
    "--peering",
    default=None,
    help="kopf peering name: only one replica with the same name acts. None: standalone.",
)
@click.option(
    "--liveness",
    default=None,
    help="Serve kopf's liveness probe, e.g. http://0.0.0.0:8080/healthz.",
)
@click.option(
    "--kubeconfig", default=None, help="Kubeconfig file. Default: in-cluster or $KUBECONFIG."
)
@click.option(
    "--log-format", type=click.Choice(["plain", "full", "json"]), default="plain", show_default=True
)
@click.option("--verbose", is_flag=True, help="Debug logging.")
def operator_command(
    namespaces: tuple[str, ...],
    peering: str | None,
    liveness: str | None,
    kubeconfig: str | None,
    log_format: str,
    verbose: bool,
) -> None:
    """Run the operator: SchedulingBackends, LumeFlows and FlowOfFlows to Prefect and back."""
    from lume_operator.handlers import run_operator

    run_operator(
        namespaces=list(namespaces),
        peering=peering,
        liveness=liveness,
        kubeconfig=kubeconfig,
        verbose=verbose,
        log_format=log_format,
    )


from lume_operator.results_cli import results_group  # noqa: E402

main.add_command(results_group)


if __name__ == "__main__":
    main()
