"""Services in processes of their own: what ``shoal serve`` and the devstack share.

* ``service_classes``: a node type's service and settings classes.
* ``serve_command``: the command line of ``python -m shoal_cli serve --node-type ...`` (the
  devstack's children, tests/processes.py and the chaos benchmark start services with it).
* ``serve_http``: a service's FastAPI app on uvicorn, returned once it listens.
* ``ChildProcess``: a child of the devstack's event loop that dies with it (SIGTERM from the
  kernel if the devstack is killed, see shoal_common.childproc), logs to a file in the state dir
  and is stopped with SIGTERM (SIGKILL after a grace period).
* ``ServiceChild``: one ``shoal serve`` child, configured with the exact settings values the
  in-process service would get (``--settings-json``), ready once it touches its ready file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from shoal_common.childproc import die_with_parent

log = structlog.get_logger(__name__)

NODE_TYPES = ("requester", "compute", "verifier", "publisher")


def service_classes(node_type: str) -> tuple[type[Any], type[Any]]:
    """(``<Name>Service``, ``<Name>Settings``) of a node type, imported on demand."""
    if node_type not in NODE_TYPES:
        raise ValueError(f"unknown node type {node_type!r}")
    name = node_type.capitalize()
    module = __import__(f"shoal_{node_type}.service", fromlist=["x"])
    settings_module = __import__(f"shoal_{node_type}.settings", fromlist=["x"])
    return getattr(module, f"{name}Service"), getattr(settings_module, f"{name}Settings")


def serve_command(node_type: str, *args: str) -> list[str]:
    """``python -m shoal_cli serve --node-type <node_type> <args>`` with this interpreter."""
    return [sys.executable, "-m", "shoal_cli", "serve", "--node-type", node_type, *args]


async def serve_http(app: Any, port: int, host: str = "127.0.0.1") -> tuple[Any, Any]:
    """Serve ``app`` on uvicorn; returns (server, task) once it listens (raises a bind error)."""
    import uvicorn

    from shoal_common.quiet_server import QuietServer

    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", lifespan="off", access_log=False
    )
    server = QuietServer(config)  # wakes once a second when idle, not 10 times (ADR 0013)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()  # raises the bind error
            raise RuntimeError(f"HTTP server on port {port} stopped before it started")
        await asyncio.sleep(0.01)
    return server, task


class ChildProcess:
    """A child process started from the event loop's thread, which dies with this process."""

    def __init__(self, name: str, args: list[str], log_file: Path) -> None:
        self.name = name
        self.args = args
        self.log_file = log_file
        self.proc: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._watch: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def spawn(
        self, *, stdout: int | None = None, on_exit: Callable[[ChildProcess], None] | None = None
    ) -> None:
        """Start it (stderr, and stdout unless given, to the log file).

        ``on_exit`` is called if it exits before ``stop``: a service that died.
        """
        self._stopping = False
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as out:
            # Forked here, on the loop's thread (which lives as long as the devstack), so the
            # parent-death signal is tied to the devstack's life, not to a worker thread's.
            self.proc = await asyncio.create_subprocess_exec(
                *self.args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out if stdout is None else stdout,
                stderr=out,
                # Its own session: a terminal's Ctrl-C reaches only the devstack, which stops
                # its children in order.
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        if on_exit is not None:
            self._watch = asyncio.create_task(self._watch_exit(self.proc, on_exit))

    async def _watch_exit(
        self, proc: asyncio.subprocess.Process, on_exit: Callable[[ChildProcess], None]
    ) -> None:
        code = await proc.wait()
        if not self._stopping:
            log.error("devstack_child_exited", child=self.name, code=code, log=str(self.log_file))
            on_exit(self)

    def terminate(self) -> None:
        """SIGTERM without waiting (``stop`` waits)."""
        self._stopping = True
        if self.running:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    async def stop(self, timeout: float = 15.0) -> None:
        proc = self.proc
        if proc is None:
            return
        self.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            log.warning("devstack_child_killed", child=self.name, after_s=timeout)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch


class ServiceChild(ChildProcess):
    """``shoal serve`` for one service of a devstack, as a child process.

    ``values`` are the settings values (as for ``make_settings``); the child builds its
    settings from them exactly as the in-process service would.
    """

    def __init__(
        self,
        node_type: str,
        name: str,
        values: dict[str, Any],
        run_dir: Path,
        *,
        log_level: str = "WARNING",
        on_exit: Callable[[ChildProcess], None] | None = None,
    ) -> None:
        self.node_type = node_type
        self.ready_file = run_dir / f"{name}.ready"
        settings = json.dumps({k: v for k, v in values.items() if v is not None}, default=str)
        args = serve_command(
            node_type,
            "--settings-json",
            settings,
            "--ready-file",
            str(self.ready_file),
            "--log-level",
            log_level,
        )
        super().__init__(name, args, run_dir / f"{name}.log")
        self._on_exit = on_exit

    async def spawn(
        self, *, stdout: int | None = None, on_exit: Callable[[ChildProcess], None] | None = None
    ) -> None:
        self.ready_file.unlink(missing_ok=True)
        await super().spawn(stdout=stdout, on_exit=on_exit or self._on_exit)

    async def start(self, timeout: float = 60.0) -> None:
        """Spawn it unless spawned, and wait until it serves (the ready file)."""
        if self.proc is None:
            await self.spawn()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.ready_file.exists():
            if not self.running:
                raise RuntimeError(f"shoal serve {self.name} exited; see {self.log_file}")
            if loop.time() > deadline:
                await self.stop()
                raise RuntimeError(f"shoal serve {self.name} not ready in {timeout} s")
            await asyncio.sleep(0.02)
