"""The ``shoal`` command: client verbs (the reference system's names and flags), serve, devstack.

Start-up time matters here (``shoal run python -c ...`` is a command people wait on), so this
module and the command modules it loads import only click and the standard library at the top:
rich, yaml, httpx and pydantic are imported by the commands that use them, and the job verbs
work on the Spec's wire form (shoal_cli.jobspec), never on the pydantic models.
tests/test_startup_imports.py holds the line.
"""

from __future__ import annotations

import functools
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from shoal_cli import jobspec
from shoal_client.base import ShoalClientError, short_id

if TYPE_CHECKING:
    from rich.console import Console

    from shoal_client.client import ShoalClient

F = TypeVar("F", bound=Callable[..., Any])


@functools.cache
def console() -> Console:
    """stderr: progress, states, errors (rich is imported on first use)."""
    from rich.console import Console

    return Console(stderr=True)


@functools.cache
def out() -> Console:
    """stdout: what scripts read (job ids, results, JSON)."""
    from rich.console import Console

    return Console()


# Commands whose modules import the services (and with them SQLAlchemy, FastAPI, NATS, ...):
# loaded only when named, so `shoal list` does not pay for `shoal devstack`'s imports.
# With their help's first sentence, so that `shoal --help` lists them without importing them
# (tests/test_startup_imports.py checks these match the commands' own).
_LAZY_COMMANDS = {
    "serve": (
        "shoal_cli.serve",
        "serve",
        "Run one Shoal service until interrupted (settings also from SHOAL_<SERVICE>_* env).",
    ),
    "devstack": (
        "shoal_cli.serve",
        "devstack",
        "Start a whole cluster on this machine (NATS, SQLite, N compute nodes) until Ctrl-C.",
    ),
    "canary": (
        "shoal_cli.canary",
        "canary",
        "Run the canary scenarios against the cluster (``--once`` or ``--every 5m``).",
    ),
}


class ShoalGroup(click.Group):
    """Turns the errors users can cause into one clear line and exit code 1, never a traceback."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        found = super().get_command(ctx, cmd_name)
        if found is None and cmd_name in _LAZY_COMMANDS:
            module, attr, _ = _LAZY_COMMANDS[cmd_name]
            found = getattr(importlib.import_module(module), attr)
            assert isinstance(found, click.Command)
            self.add_command(found, cmd_name)
        return found

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """As click's, but the lazy commands not loaded yet show their short help from
        ``_LAZY_COMMANDS`` instead of being imported for it."""
        shown: list[tuple[str, click.Command]] = []
        for name in self.list_commands(ctx):
            if name in _LAZY_COMMANDS and name not in self.commands:
                # A stand-in with the same help: click shortens it the same way.
                shown.append((name, click.Command(name, help=_LAZY_COMMANDS[name][2])))
                continue
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                shown.append((name, command))
        if shown:
            limit = formatter.width - 6 - max(len(name) for name, _ in shown)
            with formatter.section("Commands"):
                formatter.write_dl([(name, cmd.get_short_help_str(limit)) for name, cmd in shown])

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ShoalClientError as exc:
            console().print(f"[red]Error:[/red] {exc}")
            sys.exit(1)
        except jobspec.SpecError as exc:
            console().print(f"[red]Invalid job:[/red] {exc}")
            sys.exit(2)


@click.group(cls=ShoalGroup)
@click.option("--api-host", envvar="SHOAL_API_HOST", default=None, help="Requester host.")
@click.option("--api-port", envvar="SHOAL_API_PORT", type=int, default=None, help="Requester port.")
@click.pass_context
def cli(ctx: click.Context, api_host: str | None, api_port: int | None) -> None:
    """Shoal: run Docker, WASM and Python jobs over content-addressed data."""
    from shoal_client.base import api_base_url

    ctx.obj = {"base_url": api_base_url(api_host, api_port)}


def client_from(ctx: click.Context) -> ShoalClient:
    """One client per command invocation, closed when the command ends."""
    root = ctx.find_root()
    client: ShoalClient | None = root.obj.get("client")
    if client is None:
        from shoal_client.client import ShoalClient

        client = ShoalClient(root.obj["base_url"])
        root.obj["client"] = client
        root.call_on_close(client.close)
    return client


def job_options(func: F) -> F:
    """Flags shared by every command that submits a job."""
    options = [
        click.option(
            "-i",
            "--input",
            "inputs",
            multiple=True,
            help="ipfs://CID[:/path], URL[:/path], file:///dir[:/path].",
        ),
        click.option(
            "-o",
            "--output-volumes",
            "outputs",
            multiple=True,
            help="NAME:/path the job writes (default outputs:/outputs).",
        ),
        click.option(
            "--concurrency",
            type=int,
            default=1,
            show_default=True,
            help="How many nodes run the job.",
        ),
        click.option(
            "--confidence",
            type=int,
            default=0,
            help="Matching results needed to accept (deterministic verifier).",
        ),
        click.option(
            "--min-bids", type=int, default=0, help="Bids to collect before accepting any."
        ),
        click.option(
            "-s",
            "--selector",
            default=None,
            help="Node label selector, e.g. 'env=prod,zone in (a,b)'.",
        ),
        click.option("--cpu", default=None, help="CPU cores (0.5 or 500m)."),
        click.option("--memory", default=None, help="Memory (e.g. 500Mb, 1Gi)."),
        click.option("--disk", default=None, help="Disk space (e.g. 1Gb)."),
        click.option("--gpu", default=None, help="Number of GPUs."),
        click.option(
            "--timeout", type=float, default=None, help="Seconds before the job is stopped."
        ),
        click.option("--network", default=None, help="None (default), HTTP or Full."),
        click.option(
            "--domain", "domains", multiple=True, help="Domains reachable with --network HTTP."
        ),
        click.option(
            "--publisher", default=None, help="Where results go: Local (default), Ipfs, Noop."
        ),
        click.option("--verifier", default=None, help="Noop (default) or Deterministic."),
        click.option("-l", "--labels", multiple=True, help="Annotations (tags) for the job."),
        click.option(
            "--wait/--no-wait", default=True, show_default=True, help="Wait for the job to end."
        ),
        click.option(
            "--wait-timeout",
            type=float,
            default=600.0,
            show_default=True,
            help="Give up waiting after this many seconds.",
        ),
        click.option("--id-only", is_flag=True, help="Print only the job id."),
        click.option("-f", "--follow", is_flag=True, help="Stream the job's output while it runs."),
        click.option(
            "--output", "output_format", type=click.Choice(["text", "json"]), default="text"
        ),
        click.option(
            "--dry-run", is_flag=True, help="Print the job spec instead of submitting it."
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


_SUBMIT_KEYS = ("wait", "wait_timeout", "id_only", "follow", "output_format", "dry_run")


def split_submit_flags(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    flags = {k: kwargs.pop(k) for k in _SUBMIT_KEYS}
    return kwargs, flags


def submit_and_report(ctx: click.Context, spec: dict[str, Any], flags: dict[str, Any]) -> None:
    """Submit ``spec`` (wire form), then (by default) wait and show the outcome, like
    ``bacalhau docker run``."""
    from shoal_common.wire_enums import API_VERSION, JobStateType

    jobspec.check_spec(spec)
    if flags["dry_run"]:
        out().print_json(data={"APIVersion": API_VERSION, "Spec": spec})
        return
    client = client_from(ctx)
    job = client.submit_wire(spec)
    job_id = str((job.get("Metadata") or {}).get("ID", ""))
    if flags["id_only"]:
        out().print(job_id)
        if not flags["wait"]:
            return
    elif flags["output_format"] == "text":
        console().print(f"Job [bold]{job_id}[/bold] submitted.")
    if not flags["wait"] and not flags["follow"]:
        if flags["output_format"] == "json":
            out().print_json(data={"JobID": job_id})
        return
    if flags["follow"]:
        for text in client.logs(job_id, follow=True):
            sys.stdout.write(text)
            sys.stdout.flush()
    quiet = flags["id_only"] or flags["output_format"] == "json"
    from shoal_cli.output import state_line

    state = client.wait_wire(
        job_id,
        timeout=flags["wait_timeout"],
        on_change=None if quiet else lambda s: console().print(state_line(s)),
    )
    report_final(state, flags, show_stdout=not flags["follow"])
    if JobStateType(state["State"]) is not JobStateType.COMPLETED:
        sys.exit(1)


def report_final(state: dict[str, Any], flags: dict[str, Any], *, show_stdout: bool) -> None:
    """The end of a job verb; ``state``: the JobState in wire form."""
    if flags["output_format"] == "json":
        from shoal_common.spec import JobState, to_wire

        # Through the model, as before: what scripts read is the normalised JobState.
        out().print_json(data=to_wire(JobState.model_validate(state)))
        return
    if flags["id_only"]:
        return
    from shoal_cli.output import job_summary

    job_summary(console(), out(), state, show_stdout=show_stdout)


# --- job verbs -----------------------------------------------------------------------------------


@cli.group()
def docker() -> None:
    """Run Docker containers as jobs."""


@docker.command("run", context_settings={"ignore_unknown_options": True})
@job_options
@click.option("-e", "--env", multiple=True, help="KEY=VALUE for the container.")
@click.option("-w", "--workdir", default=None, help="Working directory in the container.")
@click.option("--entrypoint", default=None, help="Override the image's entrypoint.")
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def docker_run(
    ctx: click.Context,
    /,
    image: str,
    command: tuple[str, ...],
    env: tuple[str, ...],
    workdir: str | None,
    entrypoint: str | None,
    **kwargs: Any,
) -> None:
    """Run IMAGE with COMMAND on the cluster, e.g. ``shoal docker run busybox echo hi``."""
    opts, flags = split_submit_flags(kwargs)
    cmd = ([entrypoint] if entrypoint else []) + list(command)
    spec = jobspec.wire_spec(
        Engine="Docker",
        Docker=jobspec.compact(
            {
                "Image": image,
                "Entrypoint": cmd or None,
                "EnvironmentVariables": jobspec.parse_env(env) or None,
                "WorkingDirectory": workdir,
            }
        ),
        **jobspec.common_spec(**opts),
    )
    submit_and_report(ctx, spec, flags)


@cli.command()
@job_options
@click.argument("spec_file", type=click.Path(path_type=Path))
@click.pass_context
def create(ctx: click.Context, /, spec_file: Path, **kwargs: Any) -> None:
    """Submit a job from a YAML or JSON spec file."""
    from shoal_common.spec import to_wire

    _, flags = split_submit_flags(kwargs)
    submit_and_report(ctx, to_wire(jobspec.load_spec_file(spec_file)), flags)


@cli.command()
@click.argument("spec_file", type=click.Path(path_type=Path))
def validate(spec_file: Path) -> None:
    """Check a job spec file without submitting it."""
    spec = jobspec.load_spec_file(spec_file)
    console().print(f"[green]{spec_file} is a valid {spec.engine} job spec.[/green]")


@cli.command("list")
@click.option("-n", "--number", "limit", type=int, default=10, show_default=True)
@click.option("--all", "return_all", is_flag=True, help="Jobs of every client, not only yours.")
@click.option("--include-tag", multiple=True)
@click.option("--exclude-tag", multiple=True, default=("shoal-canary",), show_default=True)
@click.option("--output", "output_format", type=click.Choice(["text", "json"]), default="text")
@click.pass_context
def list_jobs(
    ctx: click.Context,
    limit: int,
    return_all: bool,
    include_tag: tuple[str, ...],
    exclude_tag: tuple[str, ...],
    output_format: str,
) -> None:
    """List your newest jobs."""
    jobs = client_from(ctx).list_jobs(
        limit=limit,
        return_all=return_all,
        include_tags=list(include_tag),
        # Asking for a tag overrides excluding it (the default hides canary jobs).
        exclude_tags=[t for t in exclude_tag if t not in include_tag],
    )
    if output_format == "json":
        out().print_json(data=jobs)
        return
    from rich.table import Table

    table = Table("CREATED", "ID", "ENGINE", "STATE", box=None)
    for item in jobs:
        job, state = item.get("Job", {}), item.get("State", {})
        meta = job.get("Metadata", {})
        table.add_row(
            str(meta.get("CreatedAt", ""))[:19].replace("T", " "),
            short_id(str(meta.get("ID", ""))),
            str(job.get("Spec", {}).get("Engine", "")),
            str(state.get("State", "")),
        )
    out().print(table)


@cli.command()
@click.argument("job_id")
@click.option("--output", "output_format", type=click.Choice(["yaml", "json"]), default="yaml")
@click.pass_context
def describe(ctx: click.Context, job_id: str, output_format: str) -> None:
    """Show a job: spec, state of every execution, and its history."""
    from shoal_common.spec import to_wire

    details = client_from(ctx).describe(job_id)
    data = {
        "Job": to_wire(details.job),
        "State": to_wire(details.state),
        "History": [to_wire(h) for h in details.history],
    }
    if output_format == "json":
        out().print_json(data=data)
    else:
        import yaml

        # Plain words first (why a job waits, why it failed); a YAML comment keeps it parseable.
        state = details.state
        summary = f"# Job {state.job_id} is {state.state.value}"
        if state.status:
            summary += f": {state.status}"
        out().print(summary, highlight=False, markup=False, soft_wrap=True)
        out().print(yaml.safe_dump(data, sort_keys=False), highlight=False, markup=False)


@cli.command()
@click.argument("job_id")
@click.pass_context
def cancel(ctx: click.Context, job_id: str) -> None:
    """Cancel one of your jobs."""
    state = client_from(ctx).cancel(job_id)
    console().print(f"Job {job_id} is {state.state}.")


@cli.command()
@click.argument("job_id")
@click.option("-f", "--follow", is_flag=True, help="Keep streaming while the job runs.")
@click.option("--execution", default="", help="Which execution (default: the first).")
@click.pass_context
def logs(ctx: click.Context, job_id: str, follow: bool, execution: str) -> None:
    """Print a job's stdout and stderr."""
    for text in client_from(ctx).logs(job_id, execution, follow=follow):
        sys.stdout.write(text)
        sys.stdout.flush()


@cli.command()
@click.argument("job_id")
@click.option("--output-dir", type=click.Path(path_type=Path), default=Path("."))
@click.option("--raw", is_flag=True, help="One folder per execution instead of merged results.")
@click.pass_context
def get(ctx: click.Context, job_id: str, output_dir: Path, raw: bool) -> None:
    """Download a job's results (checked against their CIDs) into job-<id8>/."""
    from shoal_cli.results import download_results

    target = download_results(client_from(ctx), job_id, output_dir, raw=raw, console=console())
    console().print(f"Results for job {job_id} are in [bold]{target}[/bold]")


@cli.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.pass_context
def put(ctx: click.Context, path: Path) -> None:
    """Upload a file or folder to the content store and print its CID."""
    from shoal_cli.output import progress_bar

    with progress_bar(console(), f"Uploading {path.name}") as update:
        cid = client_from(ctx).put(path, progress=update)
    out().print(cid)


@cli.command("id")
@click.option("--output", "output_format", type=click.Choice(["text", "json"]), default="text")
def show_id(output_format: str) -> None:
    """Print your client id (from $SHOAL_DIR/user_id.pem, created if missing)."""
    from shoal_client.base import shoal_dir
    from shoal_common.signing import ClientKey

    key = ClientKey.load_or_create(shoal_dir())
    if output_format == "json":
        out().print_json(data={"ClientID": key.client_id, "PublicKey": key.public_key_b64})
    else:
        out().print(key.client_id)


@cli.command()
@click.option("--client-only", is_flag=True)
@click.pass_context
def version(ctx: click.Context, client_only: bool) -> None:
    """Client and server versions."""
    from shoal_cli import __version__

    out().print(f"Client: {__version__}")
    if not client_only:
        try:
            info = client_from(ctx).version().get("build_version_info", {})
            out().print(f"Server: {info.get('gitversion', '?')}")
        except ShoalClientError as exc:
            out().print(f"Server: unreachable ({exc.message})")


# --- operators -----------------------------------------------------------------------------------


@cli.group()
def node() -> None:
    """Inspect the cluster's compute nodes."""


@node.command("list")
@click.option("--output", "output_format", type=click.Choice(["text", "json"]), default="text")
@click.pass_context
def node_list(ctx: click.Context, output_format: str) -> None:
    """Every known compute node with its state and free capacity."""
    from shoal_cli.output import nodes_table

    nodes = client_from(ctx).nodes()
    if output_format == "json":
        out().print_json(data=nodes)
    else:
        out().print(nodes_table(nodes))


@node.command("describe")
@click.argument("node_id")
@click.pass_context
def node_describe(ctx: click.Context, node_id: str) -> None:
    """One node: labels, arch, engines, capacity, running executions, last heartbeat."""
    import yaml

    out().print(yaml.safe_dump(client_from(ctx).node(node_id), sort_keys=False), markup=False)


def _register_optional() -> None:
    from shoal_cli.wasm_commands import register

    register(cli)


_register_optional()


# Imported by httpx/httpcore whenever installed, used by no `shoal` client command: httpx's own
# command-line tool (pygments, much of rich: ~30 ms) and trio (httpcore's sync client never
# needs it; ~100 ms, installed here for IPFS's multiaddr). A None entry in sys.modules makes
# their `import` fail, which both handle. Not for the commands that run services in-process.
_UNUSED_IMPORTS = ("httpx._main", "trio")
_RUNS_SERVICES = frozenset({"serve", "devstack"})


def main() -> None:
    """The ``shoal`` program (not imported by tests: only a real process skips imports)."""
    if _RUNS_SERVICES.isdisjoint(sys.argv[1:]):
        for name in _UNUSED_IMPORTS:
            sys.modules.setdefault(name, None)  # type: ignore[arg-type]
    cli(prog_name="shoal")


def print_json(data: Any) -> None:
    out().print(json.dumps(data, indent=2))
