"""A compute node on real NATS (JetStream) with its SQLite store and HTTP content endpoint."""

from __future__ import annotations

import asyncio
import io
import socket
from pathlib import Path

import httpx
import pytest

from shoal_common.bus import NatsBus
from shoal_common.cid import cid_of_path
from shoal_common.content_store import safe_extract_tar
from shoal_common.events import Envelope, ResultProposed, new_id
from shoal_common.natsserver import NatsServer
from shoal_common.protocol import Ack, AskBid, BidAnswer, BidDecision, Heartbeat, LogChunk
from shoal_common.spec import to_wire
from shoal_common.subjects import ComputeOp, Producer, compute_rpc, heartbeat, log_stream
from shoal_compute.service import ComputeService
from shoal_compute.settings import ComputeSettings
from shoal_compute.testing import noop_job

pytestmark = pytest.mark.integration


async def test_ask_accept_and_result_proposed_on_jetstream(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    settings = ComputeSettings(
        node_id="nats-node",
        nats_url=nats_server.url,
        state_dir=tmp_path / "node",
        engines=["Noop"],
        gpus=0,
        heartbeat_interval_s=0.2,
        live_log_chunks=True,
    )
    requester = await NatsBus.connect(nats_server.url, name="test-requester")
    beats: asyncio.Queue[Heartbeat] = asyncio.Queue()

    async def on_beat(subject: str, data: bytes) -> None:
        beats.put_nowait(Heartbeat.from_bytes(data))

    await requester.subscribe(heartbeat("nats-node"), on_beat)
    node = ComputeService(settings)  # connects its own bus
    await node.start()
    try:
        first = await asyncio.wait_for(beats.get(), 5)  # sent at start, not a second later
        assert first.info.node_id == "nats-node"
        assert first.info.content_url == node.content_url

        proposals: asyncio.Queue[ResultProposed] = asyncio.Queue()

        async def on_event(envelope: Envelope) -> None:
            event = envelope.parse()
            if isinstance(event, ResultProposed):
                proposals.put_nowait(event)

        await requester.consume_events(
            producer=Producer.COMPUTE,
            durable="test-requester",
            handler=on_event,
            event_types=["result_proposed"],
        )
        eid = new_id()
        chunks: list[LogChunk] = []

        async def on_chunk(subject: str, data: bytes) -> None:
            chunks.append(LogChunk.from_bytes(data))

        await requester.subscribe(log_stream(eid), on_chunk)
        job = noop_job("echo", "over", "nats")
        ask = AskBid(execution_id=eid, job=to_wire(job), requester_id="test")
        raw = await requester.request(
            compute_rpc("nats-node", ComputeOp.ASK_BID), ask.to_bytes(), timeout=5
        )
        assert BidAnswer.from_bytes(raw).accepted
        decision = BidDecision(execution_id=eid, job_id=job.metadata.id)
        raw = await requester.request(
            compute_rpc("nats-node", ComputeOp.BID_ACCEPTED), decision.to_bytes(), timeout=5
        )
        assert Ack.from_bytes(raw).ok

        proposed = await asyncio.wait_for(proposals.get(), 10)
        assert proposed.execution_id == eid
        assert proposed.node_id == "nats-node"
        assert proposed.run_output.stdout == "over nats\n"
        assert proposed.result_url is not None
        assert "".join(c.data for c in chunks) == "over nats\n"

        async with httpx.AsyncClient() as client:
            response = await client.get(proposed.result_url)
        response.raise_for_status()
        fetched = tmp_path / "fetched"
        safe_extract_tar(io.BytesIO(response.content), fetched)
        assert cid_of_path(fetched) == proposed.result_cid
        assert (fetched / "stdout").read_text() == "over nats\n"

        # A malformed request gets an error answer, not silence.
        raw = await requester.request(
            compute_rpc("nats-node", ComputeOp.BID_ACCEPTED), b"{}", timeout=5
        )
        assert b"error" in raw
    finally:
        await node.stop()
        await requester.close()


async def test_stopping_heartbeat_on_clean_stop(nats_server: NatsServer, tmp_path: Path) -> None:
    requester = await NatsBus.connect(nats_server.url, name="test-requester")
    beats: list[Heartbeat] = []

    async def on_beat(subject: str, data: bytes) -> None:
        beats.append(Heartbeat.from_bytes(data))

    await requester.subscribe(heartbeat("stopper"), on_beat)
    node = ComputeService(
        ComputeSettings(
            node_id="stopper",
            nats_url=nats_server.url,
            state_dir=tmp_path,
            engines=["Noop"],
            gpus=0,
            serve_http=False,
        )
    )
    await node.start()
    await node.stop()

    async def stopped() -> bool:
        return bool(beats) and beats[-1].stopping

    from shoal_common.testing import wait_for

    await wait_for(stopped, timeout=5)
    assert not beats[0].stopping
    await requester.close()


async def test_a_node_without_a_port_serves_on_the_same_port_after_a_restart(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """B19: the results a node proposed carry its content URL; after a restart (same state
    dir, no port configured) it binds the port it chose before and advertises the same URL,
    so they can still be fetched. Only if that port is taken does it pick a new one."""
    requester = await NatsBus.connect(nats_server.url, name="test-requester")
    beats: asyncio.Queue[Heartbeat] = asyncio.Queue()

    async def on_beat(subject: str, data: bytes) -> None:
        beats.put_nowait(Heartbeat.from_bytes(data))

    await requester.subscribe(heartbeat("restarter"), on_beat)

    def settings() -> ComputeSettings:
        return ComputeSettings(
            node_id="restarter",
            nats_url=nats_server.url,
            state_dir=tmp_path / "node",
            engines=["Noop"],
            gpus=0,
        )

    async def started() -> tuple[ComputeService, str]:
        """A node started on the state dir, and the content URL its first heartbeat carries."""
        while not beats.empty():
            beats.get_nowait()
        node = ComputeService(settings())
        await node.start()
        beat = await asyncio.wait_for(beats.get(), 5)
        assert beat.info.content_url == node.content_url
        assert node.content_url is not None
        async with httpx.AsyncClient() as client:
            response = await client.get(f"{node.content_url}/node")  # served there
        assert response.json()["content_url"] == node.content_url
        return node, node.content_url

    try:
        node, first_url = await started()
        port = int(first_url.rsplit(":", 1)[1])
        assert settings().remembered_http_port("restarter") == port
        await node.stop()

        node, url = await started()
        assert url == first_url  # same port, same advertised address
        await node.stop()

        # The port taken by someone else meanwhile: a new one, kept for the next restart.
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", port))
            squatter.listen()
            node, url = await started()
            await node.stop()
        assert url != first_url
        assert settings().remembered_http_port("restarter") == int(url.rsplit(":", 1)[1])
    finally:
        await requester.close()
