"""``shoal serve`` (one service per process, for production) and ``shoal devstack``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Any

import click

from shoal_cli.processes import NODE_TYPES
from shoal_common import collector, event_loop
from shoal_common.logging import configure_logging

PROCESS_CHOICES = ("1", "2", "all")


async def _run_until_signalled(start: Any, stop: Any, failed: asyncio.Event | None = None) -> bool:
    """start(), then wait for SIGINT/SIGTERM (or ``failed``), then stop(); True if ``failed``."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    waits = [asyncio.ensure_future(stopping.wait())]
    if failed is not None:
        waits.append(asyncio.ensure_future(failed.wait()))
    try:
        await start()
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()
        await stop()
    return failed is not None and failed.is_set()


@click.command()
@click.option("--node-type", type=click.Choice(NODE_TYPES), required=True)
@click.option("--nats-url", envvar="SHOAL_NATS_URL", default=None)
@click.option("--database-url", envvar="SHOAL_DATABASE_URL", default=None)
@click.option("--state-dir", type=click.Path(path_type=Path), default=None)
@click.option("--node-id", default=None)
@click.option("--host", default=None)
@click.option("--port", type=int, default=None, help="HTTP port (API, content or node endpoint).")
@click.option("--labels", default=None, help="Compute node labels, k=v,k2=v2.")
@click.option("--cpu", type=float, default=None, help="Compute node CPU cores to offer.")
@click.option("--memory", default=None, help="Compute node memory to offer (e.g. 8Gb).")
@click.option("--publisher-url", default=None, help="Requester: the publisher's content URL.")
@click.option("--content-store-url", default=None, help="Compute: the publisher's content URL.")
@click.option("--bad-results", is_flag=True, help="Compute: return wrong results (tests, demos).")
@click.option("--noop", is_flag=True, help="Compute: run every engine on the noop executor.")
@click.option(
    "--settings-json",
    default=None,
    help="Settings values as a JSON object (what `shoal devstack` passes its children); "
    "the options above override them.",
)
@click.option(
    "--ready-file",
    type=click.Path(path_type=Path),
    default=None,
    help="Create this file once the service is started and its HTTP server listens.",
)
@click.option("--log-level", default="INFO", show_default=True)
@click.option("--log-json/--log-text", default=True, show_default=True)
def serve(
    node_type: str,
    settings_json: str | None,
    ready_file: Path | None,
    log_level: str,
    log_json: bool,
    **options: Any,
) -> None:
    """Run one Shoal service until interrupted (settings also from SHOAL_<SERVICE>_* env)."""
    configure_logging(level=log_level, json=log_json)
    from shoal_cli.devstack import make_settings, parse_labels
    from shoal_cli.processes import serve_http, service_classes

    if options.get("labels"):
        options["labels"] = parse_labels(options["labels"])
    options["noop_all_engines"] = options.pop("noop") or None
    options["bad_results"] = options.pop("bad_results") or None
    values = json.loads(settings_json) if settings_json else {}
    values.update({k: v for k, v in options.items() if v is not None})
    service_cls, settings_cls = service_classes(node_type)
    settings = make_settings(settings_cls, **values)
    service = service_cls(settings)

    async def main() -> None:
        servers: list[Any] = []

        async def start() -> None:
            await service.start()
            app = getattr(service, "app", None)
            if app is not None and settings.port:
                servers.append(await serve_http(app, settings.port, settings.host))
            collector.tune_for_service()
            if ready_file is not None:
                await asyncio.to_thread(ready_file.touch)
            click.echo(f"shoal {node_type} running (Ctrl-C to stop)", err=True)

        async def stop() -> None:
            if ready_file is not None:
                await asyncio.to_thread(ready_file.unlink, missing_ok=True)
            for server, task in servers:
                server.should_exit = True
                with contextlib.suppress(Exception):
                    await task
            await service.stop()

        await _run_until_signalled(start, stop)

    try:
        event_loop.run(main())
    finally:
        from shoal_common import tracing

        tracing.shutdown_tracing()  # send the last spans


@click.command()
@click.option("--compute-nodes", type=int, default=3, show_default=True)
@click.option(
    "--simulated-nodes",
    type=int,
    default=0,
    show_default=True,
    help="Also run N lightweight simulated compute nodes in one child process, over the real NATS "
    "server (noop runs, in-memory state; for scale benchmarks, see docs/benchmarks.md).",
)
@click.option("--noop", is_flag=True, help="Run every engine on the noop executor (stress tests).")
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=Path(".devstack"),
    show_default=True,
    help="Keep state here; restart with the same dir to resume.",
)
@click.option("--labels", multiple=True, help="k=v,k2=v2 per compute node (repeat; cycled).")
@click.option("--requester-port", type=int, default=None, help="Default: a free port.")
@click.option("--bad-compute-actors", type=int, default=0, help="Nodes that return wrong results.")
@click.option("--cpu", type=float, default=None, help="CPU cores each compute node offers.")
@click.option("--memory", default=None, help="Memory each compute node offers.")
@click.option("--gpus", type=int, default=0, help="Declared (fake) GPUs per compute node.")
@click.option("--allow-local-dir", multiple=True, help="Local folders jobs may mount.")
@click.option(
    "--env-file",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write the export lines here.",
)
@click.option(
    "--processes",
    type=click.Choice(PROCESS_CHOICES),
    envvar="SHOAL_DEVSTACK_PROCESSES",
    default="2",
    show_default=True,
    help="How the services share OS processes: 1 = all in this process (one event loop, one "
    "core at most, the smallest footprint); 2 = the requester in a process of its own, the "
    "others here (two cores); all = one `shoal serve` process per service, as in production "
    "(~120 MiB each). NATS is always its own process; children log to <state-dir>/<name>.log "
    "and die with the devstack (docs/adr/0012-devstack-processes.md).",
)
@click.option("-v", "--verbose", is_flag=True)
def devstack(
    compute_nodes: int,
    simulated_nodes: int,
    noop: bool,
    state_dir: Path,
    labels: tuple[str, ...],
    requester_port: int | None,
    bad_compute_actors: int,
    cpu: float | None,
    memory: str | None,
    gpus: int,
    allow_local_dir: tuple[str, ...],
    env_file: Path | None,
    processes: str,
    verbose: bool,
) -> None:
    """Start a whole cluster on this machine (NATS, SQLite, N compute nodes) until Ctrl-C."""
    configure_logging(level="DEBUG" if verbose else "WARNING")
    from shoal_cli.devstack import Devstack, DevstackConfig

    stack = Devstack(
        DevstackConfig(
            state_dir=state_dir.resolve(),
            compute_nodes=compute_nodes,
            simulated_nodes=simulated_nodes,
            noop=noop,
            labels=list(labels),
            requester_port=requester_port,
            bad_compute_actors=bad_compute_actors,
            compute_cpu=cpu,
            compute_memory=memory,
            compute_gpus=gpus,
            allow_local_dirs=[str(Path(d).resolve()) for d in allow_local_dir],
            processes=processes,
            log_level="DEBUG" if verbose else "WARNING",
        )
    )

    async def start() -> None:
        await stack.start()
        collector.tune_for_service()
        exports = stack.exports()
        if env_file:
            await asyncio.to_thread(env_file.write_text, exports)
        click.echo("Shoal devstack is running. To use it from another shell:\n", err=True)
        click.echo(exports)
        sys.stdout.flush()

    if event_loop.run(_run_until_signalled(start, stack.stop, stack.failed)):
        children = ", ".join(str(c.log_file) for c in stack.children.values() if not c.running)
        raise click.ClickException(f"a devstack service exited; see {children}")
