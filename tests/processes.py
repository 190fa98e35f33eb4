"""A Shoal cluster of real processes (`shoal serve` per service), for crash tests: each service
can be killed with SIGKILL and restarted on the same state and port."""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from shoal_cli.processes import serve_command
from shoal_client.client import ShoalClient
from shoal_common.childproc import die_with_parent
from shoal_common.natsserver import NatsServer, free_port, start_nats_server
from shoal_common.signing import ClientKey
from tests.support import wait_until


@dataclass
class ServiceProcess:
    args: list[str]
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.args,
                env=self.env,
                stdout=out,
                stderr=out,
                start_new_session=True,
                preexec_fn=die_with_parent(),  # an interrupted test run leaves no service behind
            )
        return self

    def kill(self) -> None:
        """SIGKILL: no clean-up, exactly like a crash."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class ProcessCluster:
    root: Path
    compute_nodes: int = 2
    compute_env: dict[str, str] = field(default_factory=dict)
    nats: NatsServer | None = None
    services: dict[str, ServiceProcess] = field(default_factory=dict)
    requester_port: int = 0
    clients: list[ShoalClient] = field(default_factory=list)

    def client(self, key_dir: Path) -> ShoalClient:
        """A client of this cluster's requester; closed when the cluster stops."""
        client = ShoalClient(self.api_url, key=ClientKey.load_or_create(key_dir))
        self.clients.append(client)
        return client

    def _service(
        self, node_type: str, name: str, *extra: str, env: dict[str, str] | None = None
    ) -> ServiceProcess:
        assert self.nats is not None
        args = serve_command(
            node_type, "--nats-url", self.nats.url, "--state-dir", str(self.root / name), *extra
        )
        return ServiceProcess(args, {**os.environ, **(env or {})}, self.root / f"{name}.log")

    def start(self) -> ProcessCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        self.nats = start_nats_server(
            self.root / "nats", log_file=self.root / "nats.log", die_with_parent=True
        )
        self._start_services()
        return self

    def _start_services(self) -> None:
        """Publisher, verifier, requester and the compute nodes, on ``self.nats``; then wait."""
        self.requester_port = free_port()
        publisher_port = free_port()
        self.publisher_url = f"http://127.0.0.1:{publisher_port}"
        self.services["publisher"] = self._service(
            "publisher", "publisher", "--port", str(publisher_port)
        ).start()
        self.services["verifier"] = self._service("verifier", "verifier").start()
        self.services["requester"] = self._service(
            "requester",
            "requester",
            "--port",
            str(self.requester_port),
            "--publisher-url",
            self.publisher_url,
        ).start()
        for i in range(self.compute_nodes):
            name = f"compute-{i}"
            self.services[name] = self._service(
                "compute",
                name,
                "--node-id",
                name,
                "--noop",
                "--content-store-url",
                self.publisher_url,
                env=self.compute_env,
            ).start()
        self.wait_ready()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.requester_port}"

    def wait_ready(self, timeout: float = 90) -> None:
        import httpx

        def ready() -> bool:
            try:
                nodes = httpx.get(f"{self.api_url}/api/v1/nodes", timeout=1).json()
            except (httpx.HTTPError, ValueError):
                return False
            live = [
                n
                for n in nodes
                if str(n.get("state", "")).lower() in ("", "live", "alive", "ready", "connected")
            ]
            return len(live) >= self.compute_nodes

        wait_until(ready, timeout=timeout, what="requester with every compute node")

    def restart(self, name: str) -> None:
        service = self.services[name]
        service.stop()
        service.start()

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        for service in self.services.values():
            service.stop()
        if self.nats:
            self.nats.stop()
