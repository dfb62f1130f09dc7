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
@click.option(
    "--no-code",
    is_flag=True,
    help="Skip the checks that need the flows' code here (entrypoint, signature, parameters): "
    "for code that is only in an image.",
)
def validate(paths: tuple[str, ...], no_code: bool) -> None:
    """Check manifests as `run` does before anything runs: every problem, with its field path.

    Manifests, references between them, compositions, and (unless --no-code) each flow's
    entrypoint and parameters against its code. Exit 1 if any problem, or nothing to check.
    """
    from lume_operator.api.manifests import ManifestError
    from lume_operator.local.checks import check, print_problems

    console = _console()
    try:
        checked = check(list(paths), code=not no_code)
    except ManifestError as error:
        for problem in error.problems:
            console.print(f"[red]error[/red] {escape(str(problem))}")
        sys.exit(1)
    print_problems(console, checked)
    if checked.problems:
        console.print(f"{len(checked.problems)} problem(s)")
        sys.exit(1)
    console.print(f"{checked.count} resource(s) valid")


@main.command()
@FILES
@click.option(
    "--status-out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Status file to merge each resource's status into. Default: status.yaml in the "
    "results directory.",
)
@click.option(
    "--results-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("lume-results"),
    show_default=True,
    help="Where flow runs write their results (one directory per run), the status file, "
    "Prefect's log and, unless PREFECT_API_URL or PREFECT_HOME is set, Prefect's home.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=3600.0,
    show_default=True,
    help="Seconds to wait for runs; then they are cancelled.",
)
@click.option("--verbose", "-v", is_flag=True, help="Also show Prefect's own log lines.")
def run(
    paths: tuple[str, ...],
    status_out: Path | None,
    results_dir: Path,
    timeout: float,
    verbose: bool,
) -> None:
    """Run the LumeFlows in the manifests on Prefect: the server PREFECT_API_URL names (in the
    environment or the active Prefect profile, as `prefect config set` writes it), else an
    embedded one.

    Ctrl-C or --timeout cancels the runs started (exit 130 or 1).
    """
    if not os.environ.get("PREFECT_API_URL") and not os.environ.get("PREFECT_HOME"):
        # Before Prefect is imported: its database and plain-value results stay with the
        # project's results, not in the user's global ~/.prefect. The user's profiles live
        # there too, and still apply (a server of `prefect server start` they configured).
        profiles = Path.home() / ".prefect" / "profiles.toml"
        if not os.environ.get("PREFECT_PROFILES_PATH") and profiles.is_file():
            os.environ["PREFECT_PROFILES_PATH"] = str(profiles)
        home = results_dir.resolve() / "prefect"
        home.mkdir(parents=True, exist_ok=True)
        os.environ["PREFECT_HOME"] = str(home)
    from lume_operator.api.manifests import ManifestError
    from lume_operator.local.checks import check, runnable

    console = _console()
    try:
        checked = check(list(paths))
        if not runnable(console, checked):
            sys.exit(1)
        # Only now Prefect's client and worker (seconds of imports): a refused manifest is
        # answered without them.
        from lume_operator.local.runner import run_local

        code = run_local(
            checked,
            console=console,
            results_root=results_dir,
            status_out=status_out,
            timeout=timeout,
            verbose=verbose,
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
@FILES
@click.option("--namespace", default="default", show_default=True, help="Namespace of the result.")
def convert(paths: tuple[str, ...], namespace: str) -> None:
    """Print the FlowOfFlows manifests equivalent to original-format flow-of-flows YAML files."""
    from lume_operator.api.manifests import ManifestError, read_documents
    from lume_operator.flows.convert import LegacyFormatError, dump, ignored_note, is_legacy
    from lume_operator.flows.convert import convert as convert_document

    errors = Console(stderr=True, soft_wrap=True, highlight=False)
    try:
        documents, problems = read_documents(paths)
    except ManifestError as error:
        problems, documents = error.problems, []
    failed = bool(problems)
    for problem in problems:
        errors.print(f"[red]error[/red] {escape(str(problem))}")
    converted: list[str] = []
    for document in documents:
        if not is_legacy(document.body):
            errors.print(escape(f"skipped {document.source}: not the lume-services format"))
            continue
        try:
            manifest = convert_document(document.body, namespace=namespace)
        except LegacyFormatError as error:
            for where, message in error.problems:
                where = f"{where}: " if where else ""
                errors.print(f"[red]error[/red] {escape(f'{document.source}: {where}{message}')}")
            failed = True
            continue
        note = ignored_note(document.body)
        if note:
            errors.print(f"[yellow]note[/yellow] {escape(f'{document.source}: {note}')}")
        converted.append(dump(manifest))
    if not converted and not failed:
        errors.print("[red]error[/red] no lume-services flow-of-flows file in the paths given")
        sys.exit(1)
    click.echo("---\n".join(converted), nl=False)
    if failed:
        sys.exit(1)


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


@main.command()
@click.option("--pool", required=True, help="The work pool (type process) to take runs from.")
@click.option(
    "--work-queue",
    "queues",
    multiple=True,
    help="A work queue of the pool to poll; repeatable. Default: all of them.",
)
@click.option("--limit", type=click.IntRange(min=1), help="Most flow runs at once.")
@click.option(
    "--with-healthcheck",
    is_flag=True,
    help="Serve /health (PREFECT_WORKER_WEBSERVER_HOST and _PORT), as `prefect worker start`.",
)
@click.option(
    "--cold",
    is_flag=True,
    help="Start each flow run as a new interpreter, as Prefect's own process worker does.",
)
def worker(
    pool: str, queues: tuple[str, ...], limit: int | None, with_healthcheck: bool, cold: bool
) -> None:
    """Prefect's process worker with warm starts: the agent of a `process` SchedulingBackend.

    Each flow run whose command is Prefect's engine is forked from a fork server that
    imported Prefect once (LUME_WARM_PRELOAD: more modules to import there, comma-separated),
    instead of a new interpreter importing it again; everything else is Prefect's process
    worker, as `prefect worker start --type process` runs it.
    """
    import anyio
    from prefect.utilities.processutils import setup_signal_handlers_worker

    from lume_operator.prefect.worker import WarmProcessWorker

    console = _console()
    # As Prefect's CLI does: SIGTERM stops taking runs and ends the worker's own cleanly.
    setup_signal_handlers_worker(os.getpid(), "the warm process worker", console.print)

    async def serve() -> None:
        warm = WarmProcessWorker(
            work_pool_name=pool,
            work_queues=list(queues) or None,
            limit=limit,
            warm_starts=not cold,
            # FlowOfFlows parent runs run here too.
            preload=["lume_operator.flows.composition"],
        )
        await warm.start(with_healthcheck=with_healthcheck, printer=console.print)

    try:
        anyio.run(serve)
    except KeyboardInterrupt:
        console.print("worker stopped")


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
