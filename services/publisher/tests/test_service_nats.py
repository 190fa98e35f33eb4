"""The publisher as it runs: real NATS (JetStream), SQLite, HTTP fetch from a node."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.responses import Response

from shoal_common.bus import NatsBus
from shoal_common.cid import cid_of_path
from shoal_common.events import Envelope, PublishFailed, ResultAccepted, ResultPublished
from shoal_common.natsserver import NatsServer
from shoal_common.spec import PublisherSpec, PublisherType
from shoal_common.subjects import Producer
from shoal_common.testing import wait_for
from shoal_publisher.service import PublisherService
from shoal_publisher.settings import PublisherSettings

pytestmark = pytest.mark.integration


async def test_publishes_over_nats(
    nats_server: NatsServer, tmp_path: Path, kit: Any, serve: Any
) -> None:
    results = kit.tree(tmp_path / "results", {"stdout": b"ok\n", "exitCode": b"0"})
    tar = kit.tar_of(results)
    node = FastAPI()

    @node.get("/content/{cid}")
    async def content(cid: str) -> Response:
        return Response(tar, media_type="application/x-tar")

    node_url = await serve(node)
    cid = cid_of_path(results)
    service = PublisherService(
        PublisherSettings(
            nats_url=nats_server.url, state_dir=tmp_path / "publisher", fail_nodes=["bad"]
        )
    )
    await service.start()
    client = await NatsBus.connect(nats_server.url, name="test-verifier")
    seen: dict[str, Any] = {}

    async def record(env: Envelope) -> None:
        evt = env.parse()
        seen[getattr(evt, "execution_id", "")] = evt

    try:
        await client.consume_events(producer=Producer.PUBLISHER, durable="test", handler=record)
        for execution_id, node_id in (("e1", "good"), ("e2", "bad")):
            envelope = Envelope.wrap(
                ResultAccepted(
                    job_id="job-n",
                    execution_id=execution_id,
                    node_id=node_id,
                    result_cid=cid,
                    publisher=PublisherSpec(Type=PublisherType.LOCAL),
                    result_url=f"{node_url}/content/{cid}",
                )
            )
            await client.publish_event(envelope)
            await client.publish_event(envelope)  # duplicates change nothing

        async def both() -> dict[str, Any] | None:
            return seen if len(seen) == 2 else None

        outcome = await wait_for(both, timeout=15)
        assert isinstance(outcome["e1"], ResultPublished)
        assert outcome["e1"].result.cid == cid
        assert isinstance(outcome["e2"], PublishFailed)
        assert service.content.has(cid)
        records = await service.store.list_publications("job-n")
        assert {r.execution_id: r.status.value for r in records} == {
            "e1": "published",
            "e2": "failed",
        }
    finally:
        await client.close()
        await service.stop()
