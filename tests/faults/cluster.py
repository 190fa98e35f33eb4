"""A :class:`ProcessCluster` whose links and stores a fault test can break: any service may
reach NATS through its own :class:`TcpProxy`, use another database, or get its own settings."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from shoal_common import spec as wire
from shoal_common.natsserver import free_port, start_nats_server
from shoal_common.spec import Deal, DockerSpec, Engine, JobState, PublisherType, Spec
from tests.faults.tcpproxy import TcpProxy
from tests.processes import ProcessCluster, ServiceProcess
from tests.support import wait_until


def noop_spec(
    publisher: PublisherType = PublisherType.NOOP, verifier: wire.VerifierType | None = None
) -> Spec:
    return Spec(
        Engine=Engine.NOOP,
        Verifier=verifier,
        Publisher=publisher,
        Docker=DockerSpec(Image="busybox", Entrypoint=["echo", "fault"]),
        Deal=Deal(Concurrency=1),
    )


@dataclass
class FaultCluster(ProcessCluster):
    """Services as real processes, with per-service knobs.

    ``nats_proxied``: services that reach NATS through a proxy (``self.proxies[name]``).
    ``env_of`` / ``args_of``: extra environment and ``shoal serve`` flags per service.
    ``database_url``: the requester's database (default SQLite in its state dir).
    """

    nats_proxied: tuple[str, ...] = ()
    nats_delay: float = 0.0  # what NATS sends a proxied service arrives this much later
    env_of: dict[str, dict[str, str]] = field(default_factory=dict)
    args_of: dict[str, list[str]] = field(default_factory=dict)
    database_url: str | None = None
    nats_port: int = 0
    proxies: dict[str, TcpProxy] = field(default_factory=dict)

    def _service(
        self, node_type: str, name: str, *extra: str, env: dict[str, str] | None = None
    ) -> ServiceProcess:
        env = {**(env or {}), **self.env_of.get(name, {})}
        service = super()._service(node_type, name, *extra, *self.args_of.get(name, []), env=env)
        if name in self.nats_proxied:
            proxy = self.proxies.setdefault(
                name, TcpProxy(self.nats_port, delay_to_client=self.nats_delay).start()
            )
            at = service.args.index("--nats-url") + 1
            service.args[at] = f"nats://{proxy.url_host_port}"
        return service

    def start(self) -> FaultCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        self.nats_port = free_port()
        self.nats = start_nats_server(
            self.root / "nats", port=self.nats_port, log_file=self.root / "nats.log"
        )
        if self.database_url:
            self.args_of.setdefault("requester", []).extend(["--database-url", self.database_url])
        self._start_services()
        return self

    def restart_nats(self) -> None:
        """Start NATS again on the same port and JetStream store (after a kill)."""
        self.nats = start_nats_server(
            self.root / "nats", port=self.nats_port, log_file=self.root / "nats.log"
        )

    def stop(self) -> None:
        # SIGTERM to all at once, then wait: stopping one by one costs ~2.5 s per service.
        for service in self.services.values():
            if service.process and service.process.poll() is None:
                service.process.terminate()
        super().stop()
        for proxy in self.proxies.values():
            proxy.stop()

    # --- what the tests look at ---

    def nodes(self) -> dict[str, str]:
        """node id -> state, as the requester sees them."""
        try:
            rows = httpx.get(f"{self.api_url}/api/v1/nodes", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            return {}
        return {str(r.get("id") or r.get("node_id")): str(r.get("state", "")) for r in rows}

    def log_of(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def metric(self, name: str, metric: str) -> float:
        """An unlabelled metric of a compute node, read from the HTTP endpoint it logged on its
        last start (it serves HTTP directly, not through any NATS proxy)."""
        url = self.logged(name, "compute_node_started")[-1]["content_url"]
        text = httpx.get(f"{url}/metrics", timeout=2).text
        for line in text.splitlines():
            sample, _, value = line.partition(" ")
            if sample == metric:
                return float(value)
        raise AssertionError(f"{name} has no metric {metric}")

    def logged(
        self, name: str, event: str | None = None, *, level: str | None = None
    ) -> list[dict[str, Any]]:
        """The structured log records a service wrote so far, of ``event`` and/or ``level`` (a
        substring match on the raw log would also hit other events naming the same ids)."""
        records = []
        for line in self.log_of(name).splitlines():
            if not line.startswith("{"):
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line being written right now
            if event not in (None, record.get("event")) or level not in (None, record.get("level")):
                continue
            records.append(record)
        return records


def all_terminal(states: list[JobState]) -> bool:
    return all(s.state.terminal for s in states)


def completed_executions(state: JobState) -> list[str]:
    return [e.compute_reference for e in state.executions if e.state.value == "Completed"]


def wait_all_terminal(
    fetch: Callable[[str], JobState], job_ids: list[str], timeout: float
) -> list[JobState]:
    last: list[JobState] = []

    def probe() -> list[JobState] | None:
        nonlocal last
        last = [fetch(j) for j in job_ids]
        return last if all_terminal(last) else None

    try:
        return wait_until(probe, timeout=timeout, what=f"{len(job_ids)} jobs terminal")
    except AssertionError as timed_out:
        # Say which jobs were stuck, and where: "last=None" alone cannot be debugged from CI.
        stuck = [
            f"{s.job_id}: {s.state.value} ({s.status}) "
            f"{[(e.node_id, e.state.value) for e in s.executions]}"
            for s in last
            if not s.state.terminal
        ]
        raise AssertionError(f"{timed_out}; not terminal: {stuck}") from None
