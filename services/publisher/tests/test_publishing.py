"""Publishing accepted results: noop, local, ipfs, failures, and idempotency."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import Response

from shoal_common.bus import MemoryBus
from shoal_common.cid import cid_of_path
from shoal_common.content_store import ContentStore
from shoal_common.events import (
    Envelope,
    Event,
    ExecutionFailed,
    PublishFailed,
    ResultAccepted,
    ResultProposed,
    ResultPublished,
)
from shoal_common.result_folder import cid_of_files, folder_from_run_output
from shoal_common.spec import (
    PublisherSpec,
    PublisherType,
    RunOutput,
    StorageSourceType,
    VerifierType,
)
from shoal_common.testing import wait_for
from shoal_publisher.adapters.content import AsyncContentStore
from shoal_publisher.adapters.fetch import HttpResultFetcher, StaticResultFetcher
from shoal_publisher.adapters.kubo import AioipfsKubo, FakeKubo
from shoal_publisher.domain.models import PublishRequest, TransientPublishError
from shoal_publisher.domain.ports import KuboClient, ResultFetcher
from shoal_publisher.domain.publishers import LocalPublisher
from shoal_publisher.service import PublisherService
from shoal_publisher.settings import PublisherSettings
from shoal_publisher.store.memory import MemoryPublisherStore

Serve = Callable[[Any], Awaitable[str]]


@dataclass
class Rig:
    bus: MemoryBus
    service: PublisherService
    store: MemoryPublisherStore
    emitted: int = 0

    def accepted(
        self,
        execution_id: str,
        cid: str,
        *,
        kind: PublisherType | None = PublisherType.LOCAL,
        url: str | None = None,
        node_id: str | None = None,
    ) -> ResultAccepted:
        return ResultAccepted(
            job_id="job-1",
            execution_id=execution_id,
            node_id=node_id or f"node-{execution_id}",
            result_cid=cid,
            publisher=PublisherSpec(Type=kind),
            result_url=url,
        )

    async def emit(self, evt: Event) -> Envelope:
        self.emitted += 1
        envelope = Envelope.wrap(evt)
        await self.bus.publish_event(envelope)
        return envelope

    def outcomes(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for env in self.bus.published:
            if env.type in (ResultPublished.type, PublishFailed.type):
                evt = env.parse()
                out[getattr(evt, "execution_id", "")] = evt
        return out

    async def wait(self, count: int) -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            found = self.outcomes()
            return found if len(found) >= count else None

        return await wait_for(probe, timeout=15)

    async def settle(self, handled: int | None = None) -> None:
        """Until ``handled`` events (default: all emitted) are recorded and relayed."""
        wanted = self.emitted if handled is None else handled

        async def probe() -> bool:
            return self.store.processed_count() >= wanted and await self.store.outbox_size() == 0

        await wait_for(probe, timeout=15)


async def _rig(
    tmp_path: Path,
    *,
    fetcher: ResultFetcher | None = None,
    kubo: KuboClient | None = None,
    **settings: Any,
) -> AsyncIterator[Rig]:
    bus = MemoryBus()
    store = MemoryPublisherStore()
    service = PublisherService(
        PublisherSettings(
            state_dir=tmp_path / "publisher",
            public_url="http://publisher.example",
            relay_poll_interval=0.05,
            retry_delay=0.01,
            **settings,
        ),
        bus=bus,
        store=store,
        fetcher=fetcher,
        kubo=kubo,
    )
    await service.start()
    try:
        yield Rig(bus, service, store)
    finally:
        await service.stop()
        await bus.close()


@pytest.fixture
def results(kit: Any, tmp_path: Path) -> Path:
    return kit.tree(
        tmp_path / "results",
        {
            "stdout": b"42\n",
            "stderr": b"",
            "exitCode": b"0",
            "outputs/data.bin": b"\x01" * 300_000,
            "outputs/.keep": b"",
        },
    )


# --- noop ---------------------------------------------------------------------------------------


async def test_noop_acceptances_are_left_to_the_requester(tmp_path: Path) -> None:
    """ADR 0017: the requester records a noop publication itself; the publisher acks the
    acceptance and does nothing (a publication here would be a second, racing record)."""
    async for rig in _rig(tmp_path):
        await rig.emit(rig.accepted("e1", "QmNoop", kind=PublisherType.NOOP))
        await rig.emit(rig.accepted("e2", "QmLocal", kind=PublisherType.LOCAL))
        await rig.wait(1)  # e2 fails (no URL); e1 came first on the same consumer
        assert set(rig.outcomes()) == {"e2"}
        assert await rig.store.find_publication("e1") is None


async def test_noop_records_a_partial_results_cid(tmp_path: Path) -> None:
    cid = "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"
    async for rig in _rig(tmp_path):
        failed = _failed_run("e1", cid, None).model_copy(
            update={"publisher": PublisherSpec(Type=PublisherType.NOOP)}
        )
        await rig.emit(failed)
        published = (await rig.wait(1))["e1"]
        assert isinstance(published, ResultPublished)
        assert published.partial
        assert published.result.storage_source is StorageSourceType.IPFS
        assert published.result.name == "job-job-1-host-node-e1"
        assert published.result.cid == cid
        record = await rig.store.find_publication("e1")
        assert record is not None
        assert record.status.value == "published"


def _proposal(
    execution_id: str,
    cid: str,
    *,
    verifier: VerifierType = VerifierType.NOOP,
    kind: PublisherType = PublisherType.LOCAL,
) -> ResultProposed:
    return ResultProposed(
        job_id="job-1",
        execution_id=execution_id,
        node_id=f"node-{execution_id}",
        result_cid=cid,
        run_output=RunOutput(stdout="42\n"),
        verifier=verifier,
        publisher=PublisherSpec(Type=kind),
        result_url="http://node/r",
    )


async def test_a_noop_verified_result_is_published_from_its_proposal(
    tmp_path: Path, results: Path
) -> None:
    """ADR 0017: no verifier decision to wait for; marked unverified, so the requester counts
    it only for a job whose own verifier is noop."""
    cid = cid_of_path(results)
    fetcher = StaticResultFetcher({"http://node/r": results})
    async for rig in _rig(tmp_path, fetcher=fetcher):
        await rig.emit(_proposal("det", cid, verifier=VerifierType.DETERMINISTIC))
        await rig.emit(_proposal("noop", cid, kind=PublisherType.NOOP))
        await rig.emit(_proposal("e1", cid))
        outcomes = await rig.wait(1)
        assert set(outcomes) == {"e1"}  # the others came first on the same consumer
        published = outcomes["e1"]
        assert isinstance(published, ResultPublished), published
        assert published.unverified
        assert not published.partial
        assert published.result.cid == cid
        assert rig.service.content.has(cid)
        # The same result accepted by a verifier later (a node's claim disagreed with the
        # job) changes nothing: one publication per execution.
        await rig.emit(rig.accepted("e1", cid, url="http://node/r"))

        await rig.settle(handled=2)  # e1's proposal and acceptance; the others are ignored
        assert len([e for e in rig.bus.published if e.type == ResultPublished.type]) == 1


# --- local --------------------------------------------------------------------------------------


async def test_local_fetches_over_http_and_stores(
    tmp_path: Path, results: Path, kit: Any, serve: Serve
) -> None:
    node = FastAPI()
    tar = kit.tar_of(results)

    @node.get("/content/{cid}")
    async def content(cid: str) -> Response:
        return Response(tar, media_type="application/x-tar")

    base = await serve(node)
    cid = cid_of_path(results)
    async for rig in _rig(tmp_path):
        await rig.emit(rig.accepted("e1", cid, url=f"{base}/content/{cid}"))
        published = (await rig.wait(1))["e1"]
        assert isinstance(published, ResultPublished), published
        assert published.result.cid == cid
        assert published.result.url == f"http://publisher.example/content/{cid}"
        assert published.result.metadata == {"publisher": "Local"}
        assert rig.service.content.has(cid)
        stored = rig.service.content.path_of(cid)
        assert (stored / "stdout").read_bytes() == b"42\n"


async def test_local_is_the_default_and_reuses_stored_content(
    tmp_path: Path, results: Path
) -> None:
    cid = cid_of_path(results)
    fetcher = StaticResultFetcher({"http://node/r": results})
    async for rig in _rig(tmp_path, fetcher=fetcher):
        await rig.emit(rig.accepted("e1", cid, kind=None, url="http://node/r"))
        await rig.emit(rig.accepted("e2", cid, kind=None, url="http://node/r"))
        outcomes = await rig.wait(2)
        assert all(isinstance(o, ResultPublished) for o in outcomes.values())
        assert {o.result.cid for o in outcomes.values()} == {cid}
        # The second agreeing execution's result was already in the store: no second fetch.
        assert fetcher.fetched == ["http://node/r"]


async def test_local_rebuilds_a_small_result_from_its_run_output(tmp_path: Path, kit: Any) -> None:
    small = kit.tree(
        tmp_path / "small", {"stdout": b"hello \xe2\x9c\x93\n", "stderr": b"", "exitCode": b"0"}
    )
    big = kit.tree(
        tmp_path / "big", {"stdout": b"42\n", "stderr": b"", "exitCode": b"0", "outputs/x": b"1"}
    )
    fetcher = StaticResultFetcher({"http://node/small": small, "http://node/big": big})
    async for rig in _rig(tmp_path, fetcher=fetcher):
        said = RunOutput(stdout="hello \u2713\n", exitCode=0)
        accepted = rig.accepted("e1", cid_of_path(small), url="http://node/small")
        await rig.emit(accepted.model_copy(update={"run_output": said}))
        # The run output is not all of this one (an output volume): downloaded as before.
        with_outputs = rig.accepted("e2", cid_of_path(big), url="http://node/big")
        await rig.emit(with_outputs.model_copy(update={"run_output": RunOutput(stdout="42\n")}))
        outcomes = await rig.wait(2)
        assert all(isinstance(o, ResultPublished) for o in outcomes.values()), outcomes
        assert fetcher.fetched == ["http://node/big"]
        stored = rig.service.content.path_of(cid_of_path(small))
        assert (stored / "stdout").read_bytes() == "hello \u2713\n".encode()
        assert (stored / "exitCode").read_bytes() == b"0"


async def test_local_stores_a_repeated_small_result_once(tmp_path: Path) -> None:
    """The same run output again (a canary, every node printing the same) is found stored and
    published without a second write."""

    class CountingContent(AsyncContentStore):
        puts = 0

        async def put_files(self, files: Mapping[str, bytes]) -> str:
            self.puts += 1
            return await super().put_files(files)

    content = CountingContent(ContentStore(tmp_path / "content"))
    publisher = LocalPublisher(
        content,
        StaticResultFetcher({}),
        staging=tmp_path / "staging",
        content_url="http://publisher.example",
    )
    said = RunOutput(stdout="Hello, world!\n", exitCode=0)
    files = folder_from_run_output(said)
    assert files is not None
    cid = cid_of_files(files)
    for execution_id in ("e1", "e2"):
        request = PublishRequest("job-1", execution_id, "node-1", cid, run_output=said)
        spec = await publisher.publish(request)
        assert spec.cid == cid
    assert content.puts == 1
    assert (content.store.path_of(cid) / "stdout").read_bytes() == b"Hello, world!\n"


async def test_local_cid_mismatch_fails(tmp_path: Path, results: Path, kit: Any) -> None:
    other = kit.tree(tmp_path / "other", {"stdout": b"not what was proposed\n"})
    fetcher = StaticResultFetcher({"http://node/r": other})
    cid = cid_of_path(results)
    async for rig in _rig(tmp_path, fetcher=fetcher):
        await rig.emit(rig.accepted("e1", cid, url="http://node/r"))
        failed = (await rig.wait(1))["e1"]
        assert isinstance(failed, PublishFailed)
        assert "result CID mismatch" in failed.error
        assert cid in failed.error
        assert cid_of_path(other) in failed.error


async def test_local_refuses_a_tar_that_escapes(tmp_path: Path, kit: Any, serve: Serve) -> None:
    node = FastAPI()

    @node.get("/evil")
    async def evil() -> Response:
        return Response(kit.evil_tar("../../outside.txt"), media_type="application/x-tar")

    base = await serve(node)
    async for rig in _rig(tmp_path):
        await rig.emit(
            rig.accepted("e1", "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o", url=f"{base}/evil")
        )
        failed = (await rig.wait(1))["e1"]
        assert isinstance(failed, PublishFailed)
        assert "refused the result" in failed.error
        assert "'..'" in failed.error
    assert not (tmp_path / "outside.txt").exists()


async def test_unreachable_node_is_retried_then_fails(tmp_path: Path, serve: Serve) -> None:
    node = FastAPI()
    calls: list[int] = []

    @node.get("/flaky")
    async def flaky() -> Response:
        calls.append(1)
        return Response("busy", status_code=503)

    base = await serve(node)
    async for rig in _rig(tmp_path, publish_attempts=3):
        await rig.emit(
            rig.accepted(
                "e1", "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o", url=f"{base}/flaky"
            )
        )
        failed = (await rig.wait(1))["e1"]
        assert isinstance(failed, PublishFailed)
        assert "HTTP 503" in failed.error
        assert "gave up after 3 attempts" in failed.error
        assert len(calls) == 3


async def test_transient_failure_then_success(tmp_path: Path, results: Path) -> None:
    class Flaky(StaticResultFetcher):
        failures = 2

        async def fetch(self, url: str, workdir: Path) -> Path:
            if self.failures:
                self.failures -= 1
                raise TransientPublishError("connection reset")
            return await super().fetch(url, workdir)

    cid = cid_of_path(results)
    async for rig in _rig(tmp_path, fetcher=Flaky({"http://node/r": results})):
        await rig.emit(rig.accepted("e1", cid, url="http://node/r"))
        assert isinstance((await rig.wait(1))["e1"], ResultPublished)
        record = await rig.store.find_publication("e1")
        assert record is not None
        assert record.attempts == 3


def _down_then_up(content: bytes, down_for: int) -> tuple[HttpResultFetcher, list[str]]:
    """A fetcher whose node refuses connections ``down_for`` times (killed, restarting),
    then serves ``content``: httpx raises ConnectError as it would for a closed port."""
    calls: list[str] = []

    def node(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url))
        if len(calls) <= down_for:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        return httpx.Response(
            200, stream=httpx.ByteStream(content), headers={"X-Shoal-Kind": "file"}
        )

    client = httpx.AsyncClient(transport=httpx.MockTransport(node))
    return HttpResultFetcher(max_bytes=1 << 20, client=client), calls


async def test_a_node_down_for_longer_than_the_attempts_is_waited_for(
    tmp_path: Path, kit: Any
) -> None:
    """B17: a node killed after its result was accepted, restarted a few seconds later: its
    result was published nowhere and the job ended in Error 1.5 s after the kill (3 attempts).
    Connection refused is now waited for (``unreachable_wait``), not counted as attempts."""
    result = kit.tree(tmp_path / "r", {"out": b"42\n"}) / "out"
    fetcher, calls = _down_then_up(result.read_bytes(), down_for=6)
    async for rig in _rig(tmp_path, fetcher=fetcher, publish_attempts=3):
        await rig.emit(rig.accepted("e1", cid_of_path(result), url="http://node/r"))
        published = (await rig.wait(1))["e1"]
        assert isinstance(published, ResultPublished), published
        record = await rig.store.find_publication("e1")
        assert record is not None
        assert record.attempts == 7
        assert len(calls) == 7


async def test_a_node_that_stays_down_fails_the_result_saying_so(tmp_path: Path, kit: Any) -> None:
    result = kit.tree(tmp_path / "r", {"out": b"42\n"}) / "out"
    fetcher, calls = _down_then_up(result.read_bytes(), down_for=10**6)
    async for rig in _rig(tmp_path, fetcher=fetcher, unreachable_wait=0.3):
        await rig.emit(rig.accepted("e1", cid_of_path(result), url="http://node/r"))
        failed = (await rig.wait(1))["e1"]
        assert isinstance(failed, PublishFailed)
        assert "Connection refused" in failed.error
        assert "node node-e1 unreachable for" in failed.error, failed.error
        assert len(calls) > 3  # waited past the attempt count, then gave up


async def test_no_result_url_fails_clearly(tmp_path: Path) -> None:
    async for rig in _rig(tmp_path, fetcher=StaticResultFetcher()):
        await rig.emit(rig.accepted("e1", "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"))
        failed = (await rig.wait(1))["e1"]
        assert isinstance(failed, PublishFailed)
        assert "gave no URL" in failed.error


# --- partial results of failed runs (behaviour 11) ----------------------------------------------


def _failed_run(execution_id: str, cid: str | None, url: str | None) -> ExecutionFailed:
    return ExecutionFailed(
        job_id="job-1",
        execution_id=execution_id,
        node_id=f"node-{execution_id}",
        error="timed out after 2s",
        timed_out=True,
        result_cid=cid,
        result_url=url,
        publisher=PublisherSpec(Type=PublisherType.LOCAL),
    )


async def test_a_failed_runs_partial_result_is_published(tmp_path: Path, results: Path) -> None:
    cid = cid_of_path(results)
    fetcher = StaticResultFetcher({"http://node/r": results})
    async for rig in _rig(tmp_path, fetcher=fetcher):
        await rig.emit(_failed_run("e1", cid, "http://node/r"))
        published = (await rig.wait(1))["e1"]
        assert isinstance(published, ResultPublished), published
        assert published.partial
        assert published.result.cid == cid
        assert (rig.service.content.path_of(cid) / "stdout").read_bytes() == b"42\n"


async def test_a_partial_result_that_cannot_be_fetched_is_a_partial_failure(
    tmp_path: Path,
) -> None:
    async for rig in _rig(tmp_path, fetcher=StaticResultFetcher()):
        await rig.emit(_failed_run("e1", "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o", None))
        failed = (await rig.wait(1))["e1"]
        assert isinstance(failed, PublishFailed)
        assert failed.partial
        assert "gave no URL" in failed.error


async def test_a_failure_without_a_partial_result_publishes_nothing(
    tmp_path: Path, results: Path
) -> None:
    cid = cid_of_path(results)
    fetcher = StaticResultFetcher({"http://node/r": results})
    async for rig in _rig(tmp_path, fetcher=fetcher):
        await rig.emit(_failed_run("e1", None, None))
        # The compute stream is delivered in order: once e2 is published, e1 was passed over.
        await rig.emit(_failed_run("e2", cid, "http://node/r"))
        outcomes = await rig.wait(1)
        assert set(outcomes) == {"e2"}
        assert await rig.store.find_publication("e1") is None


# --- failures on purpose (behaviour 38) ---------------------------------------------------------


async def test_failing_publisher_beside_a_good_one(tmp_path: Path, results: Path) -> None:
    cid = cid_of_path(results)
    fetcher = StaticResultFetcher({"http://good/r": results, "http://bad/r": results})
    async for rig in _rig(tmp_path, fetcher=fetcher, fail_nodes=["bad-node"]):
        await rig.emit(rig.accepted("good", cid, url="http://good/r", node_id="good-node"))
        await rig.emit(rig.accepted("bad", cid, url="http://bad/r", node_id="bad-node"))
        outcomes = await rig.wait(2)
        assert isinstance(outcomes["good"], ResultPublished)
        assert isinstance(outcomes["bad"], PublishFailed)
        assert "failure injected" in outcomes["bad"].error
        bad = await rig.store.find_publication("bad")
        assert bad is not None
        assert bad.status.value == "failed"
        assert "failure injected" in bad.error


async def test_a_publisher_type_can_be_made_to_fail(tmp_path: Path) -> None:
    async for rig in _rig(tmp_path, fail_publishers=["local"]):
        await rig.emit(rig.accepted("e1", "QmX", kind=PublisherType.LOCAL))
        failed = (await rig.wait(1))["e1"]
        assert isinstance(failed, PublishFailed)
        assert failed.error.startswith("Local publisher failed")


async def test_unsupported_publisher_fails_with_the_reason(tmp_path: Path) -> None:
    async for rig in _rig(tmp_path):
        await rig.emit(rig.accepted("e1", "QmX", kind=PublisherType.ESTUARY))
        outcomes = await rig.wait(1)
        assert "Estuary publisher is not available here" in outcomes["e1"].error
        assert "Ipfs, Local, Noop" in outcomes["e1"].error


async def test_ipfs_without_kubo_publishes_to_the_content_store(tmp_path: Path) -> None:
    """Bacalhau's clients always ask for IPFS; with no kubo node it lands in our own store."""
    async for rig in _rig(tmp_path):
        await rig.emit(rig.accepted("e2", "QmX", kind=PublisherType.IPFS))
        outcome = (await rig.wait(1))["e2"]
        # Same path as the local publisher: it tries to fetch the result from the node.
        assert "gave no URL to fetch result QmX" in outcome.error


# --- ipfs ---------------------------------------------------------------------------------------


async def test_ipfs_publisher_with_a_fake_kubo(tmp_path: Path, results: Path) -> None:
    kubo = FakeKubo()
    cid = cid_of_path(results)
    fetcher = StaticResultFetcher({"http://node/r": results})
    async for rig in _rig(tmp_path, fetcher=fetcher, kubo=kubo):
        await rig.emit(rig.accepted("e1", cid, kind=PublisherType.IPFS, url="http://node/r"))
        published = (await rig.wait(1))["e1"]
        assert isinstance(published, ResultPublished)
        assert published.result.cid == cid
        assert kubo.pinned == {cid}


async def test_ipfs_publisher_against_our_own_kubo_api(
    tmp_path: Path, results: Path, serve: Serve
) -> None:
    """aioipfs adds and pins on a second content store through its kubo-compatible API."""
    target = PublisherService(
        PublisherSettings(state_dir=tmp_path / "target"),
        bus=MemoryBus(),
        store=MemoryPublisherStore(),
    )
    await target.start()
    try:
        kubo_url = await serve(target.app)
        cid = cid_of_path(results)
        fetcher = StaticResultFetcher({"http://node/r": results})
        async for rig in _rig(
            tmp_path, fetcher=fetcher, kubo=AioipfsKubo(kubo_url), kubo_rpc_url=kubo_url
        ):
            await rig.emit(rig.accepted("e1", cid, kind=PublisherType.IPFS, url="http://node/r"))
            published = (await rig.wait(1))["e1"]
            assert isinstance(published, ResultPublished), published
            assert published.result.cid == cid
            assert published.result.metadata == {"publisher": "Ipfs", "kubo": kubo_url}
            assert target.content.has(cid)
            # The same result through the local publisher gets the same CID.
            await rig.emit(rig.accepted("e2", cid, url="http://node/r"))
            assert (await rig.wait(2))["e2"].result.cid == cid
    finally:
        await target.stop()


async def test_ipfs_cid_mismatch_fails(tmp_path: Path, results: Path) -> None:
    fetcher = StaticResultFetcher({"http://node/r": results})
    async for rig in _rig(tmp_path, fetcher=fetcher, kubo=FakeKubo()):
        await rig.emit(
            rig.accepted(
                "e1",
                "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o",
                kind=PublisherType.IPFS,
                url="http://node/r",
            )
        )
        failed = (await rig.wait(1))["e1"]
        assert isinstance(failed, PublishFailed)
        assert "result CID mismatch" in failed.error


# --- idempotency --------------------------------------------------------------------------------


async def test_same_envelope_twice_publishes_once(tmp_path: Path) -> None:
    async for rig in _rig(tmp_path):
        envelope = Envelope.wrap(rig.accepted("e1", "QmX", kind=PublisherType.NOOP))
        publishing = rig.service.publishing
        assert publishing is not None
        evt = envelope.parse()
        assert isinstance(evt, ResultAccepted)
        await publishing.on_accepted(envelope.id, evt)
        await publishing.on_accepted(envelope.id, evt)
        # Another envelope for the same execution (a re-sent decision) changes nothing either.
        again = Envelope.wrap(rig.accepted("e1", "QmX", kind=PublisherType.NOOP))
        await publishing.on_accepted(again.id, evt)
        await rig.settle()  # the outbox relayed what it held
        published = [e for e in rig.bus.published if e.type == ResultPublished.type]
        assert len(published) == 1


async def test_publish_request_name() -> None:
    request = PublishRequest(job_id="j", execution_id="e", node_id="n", result_cid="c")
    assert request.name == "job-j-host-n"
