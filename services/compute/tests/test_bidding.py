"""Bid strategies, one by one and composed by a node (behaviours 23, 27, 30, 31, 33)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal_common.events import new_id
from shoal_common.protocol import Capacity
from shoal_common.spec import (
    Engine,
    Job,
    NetworkSpec,
    NetworkType,
    PublisherType,
    StorageSourceType,
    StorageSpec,
    VerifierType,
    WasmSpec,
)
from shoal_compute.domain.bidding import (
    AllOf,
    BidOutcome,
    BidRequest,
    BidStrategyError,
    DataLocality,
    EngineSupported,
    ExecutorAccepts,
    Misbehaviour,
    NetworkingAllowed,
    PublisherSupported,
    ResourcesWithinLimits,
    StorageSupported,
    TimeoutWithinBounds,
    VerifierSupported,
    job_cids,
)
from shoal_compute.executors.base import BidCheck
from shoal_compute.executors.noop import NoopExecutor
from shoal_compute.settings import Locality
from shoal_compute.testing import MakeNode, noop_job

CID = "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"


def request(job: Job, *, resources: Capacity | None = None, timeout: float = 60) -> BidRequest:
    return BidRequest(
        execution_id=new_id(),
        job=job,
        resources=resources or Capacity(cpu=0.1, memory=100),
        timeout=timeout,
    )


async def test_engine_supported() -> None:
    strategy = EngineSupported([Engine.NOOP])
    assert (await strategy.decide(request(noop_job()))).accepted
    answer = await strategy.decide(request(noop_job(engine=Engine.WASM)))
    assert not answer.accepted
    assert "Wasm" in answer.reason


async def test_storage_sources() -> None:
    strategy = StorageSupported([StorageSourceType.IPFS])
    ok = noop_job(inputs=[StorageSpec(CID=CID, path="/in")])
    assert (await strategy.decide(request(ok))).accepted
    url = noop_job(inputs=[StorageSpec(StorageSource="URLDownload", URL="http://x/y")])
    answer = await strategy.decide(request(url))
    assert not answer.accepted
    assert "URLDownload" in answer.reason
    module = noop_job(
        engine=Engine.WASM,
        Wasm=WasmSpec(EntryModule=StorageSpec(StorageSource="Inline", URL="data:,x")),
    )
    assert not (await strategy.decide(request(module))).accepted


async def test_publisher_and_verifier_supported() -> None:
    job = noop_job()
    job.spec.publisher = PublisherType.IPFS
    job.spec.verifier = VerifierType.DETERMINISTIC
    assert not (await PublisherSupported([PublisherType.NOOP]).decide(request(job))).accepted
    assert (await PublisherSupported([PublisherType.IPFS]).decide(request(job))).accepted
    assert not (await VerifierSupported([VerifierType.NOOP]).decide(request(job))).accepted


async def test_resources_within_per_job_limit() -> None:
    strategy = ResourcesWithinLimits(Capacity(cpu=1, memory=1000, disk=10, gpu=0))
    assert (await strategy.decide(request(noop_job(), resources=Capacity(cpu=1)))).accepted
    for need, word in (
        (Capacity(cpu=1.5), "CPU"),
        (Capacity(memory=1001), "memory"),
        (Capacity(disk=11), "disk"),
        (Capacity(gpu=1), "GPU"),
    ):
        answer = await strategy.decide(request(noop_job(), resources=need))
        assert not answer.accepted
        assert word in answer.reason


async def test_timeout_bounds_and_bypass() -> None:
    strategy = TimeoutWithinBounds(10, 100, ["vip"])
    assert (await strategy.decide(request(noop_job(), timeout=50))).accepted
    above = await strategy.decide(request(noop_job(), timeout=101))
    assert not above.accepted
    assert "maximum" in above.reason
    below = await strategy.decide(request(noop_job(), timeout=5))
    assert not below.accepted
    assert "minimum" in below.reason
    vip = noop_job(client_id="vip")
    assert (await strategy.decide(request(vip, timeout=10_000))).accepted


async def test_networking_opt_in() -> None:
    job = noop_job(Network=NetworkSpec(Type=NetworkType.FULL))
    assert not (await NetworkingAllowed(False).decide(request(job))).accepted
    assert (await NetworkingAllowed(True).decide(request(job))).accepted
    assert (await NetworkingAllowed(False).decide(request(noop_job()))).accepted


async def test_data_locality() -> None:
    cached = {CID}
    job = noop_job(inputs=[StorageSpec(CID=CID, path="/in")])
    other = noop_job(inputs=[StorageSpec(CID="QmOther", path="/in")])
    local = DataLocality(Locality.LOCAL, False, cached.__contains__)
    assert (await local.decide(request(job))).accepted
    assert not (await local.decide(request(other))).accepted
    assert job_cids(other.spec) == ["QmOther"]
    anywhere = DataLocality(Locality.ANYWHERE, False, cached.__contains__)
    assert (await anywhere.decide(request(other))).accepted
    stateless = DataLocality(Locality.ANYWHERE, True, cached.__contains__)
    answer = await stateless.decide(request(noop_job()))
    assert not answer.accepted
    assert "inputs" in answer.reason


class Picky(NoopExecutor):
    async def check(self, job: Job) -> BidCheck:
        return BidCheck(False, "image platform linux/arm64 does not include amd64")


class Broken(NoopExecutor):
    async def check(self, job: Job) -> BidCheck:
        raise RuntimeError("daemon went away")


async def test_executor_check_behaviour_33() -> None:
    answer = await ExecutorAccepts({Engine.NOOP: Picky()}).decide(request(noop_job()))
    assert not answer.accepted
    assert "platform" in answer.reason
    broken = await ExecutorAccepts({Engine.NOOP: Broken()}).decide(request(noop_job()))
    assert not broken.accepted
    assert "daemon went away" in broken.reason


async def test_misbehaviour_knobs() -> None:
    with pytest.raises(BidStrategyError):
        await Misbehaviour(bad_bids=True, reject_bids=False).decide(request(noop_job()))
    answer = await Misbehaviour(bad_bids=False, reject_bids=True).decide(request(noop_job()))
    assert not answer.accepted


async def test_all_of_stops_at_the_first_no() -> None:
    calls: list[str] = []

    class Rec:
        def __init__(self, name: str, outcome: BidOutcome) -> None:
            self.name, self.outcome = name, outcome

        async def decide(self, request: BidRequest) -> BidOutcome:
            calls.append(self.name)
            return self.outcome

    combined = AllOf(
        [Rec("a", BidOutcome.yes()), Rec("b", BidOutcome.no("b")), Rec("c", BidOutcome.yes())]
    )
    assert (await combined.decide(request(noop_job()))).reason == "b"
    assert calls == ["a", "b"]


# --- through a node's ask_bid ------------------------------------------------------------------


async def test_node_refuses_what_it_cannot_do(make_node: MakeNode) -> None:
    node = await make_node(timeout_max=100, verifiers=["Noop"])
    assert (await node.ask(noop_job(timeout=50))).accepted
    answer = await node.ask(noop_job(timeout=1000))
    assert not answer.accepted
    assert "maximum" in answer.reason
    wasm = await node.ask(noop_job(engine=Engine.WASM))
    assert not wasm.accepted
    assert "Wasm" in wasm.reason
    det = noop_job()
    det.spec.verifier = VerifierType.DETERMINISTIC
    assert not (await node.ask(det)).accepted
    local = noop_job(inputs=[StorageSpec(StorageSource="LocalDirectory", SourcePath="/etc")])
    answer = await node.ask(local)
    assert not answer.accepted
    assert "LocalDirectory" in answer.reason


async def test_node_with_bad_bids_errors(make_node: MakeNode) -> None:
    node = await make_node(bad_bids=True)
    with pytest.raises(BidStrategyError):
        await node.ask(noop_job())


async def test_node_rejecting_bids_says_why(make_node: MakeNode) -> None:
    node = await make_node(reject_bids=True)
    answer = await node.ask(noop_job())
    assert not answer.accepted
    assert "reject" in answer.reason


async def test_invalid_job_is_refused_not_crashed(make_node: MakeNode) -> None:
    node = await make_node()
    answer = await node.ask(noop_job(cpu="lots"))
    assert not answer.accepted
    assert "invalid" in answer.reason


async def test_noop_all_engines_bids_on_every_engine(make_node: MakeNode) -> None:
    node = await make_node(noop_all_engines=True, engines=None)
    assert (await node.ask(noop_job(engine=Engine.DOCKER))).accepted
    assert Engine.WASM in node.service.node_info().engines


async def test_locality_local_uses_the_cache(make_node: MakeNode, tmp_path: Path) -> None:
    node = await make_node(locality="local")
    data = tmp_path / "data.txt"
    data.write_text("hello world\n")
    cid = await node.service.cache.put_path(data)
    assert cid == CID
    assert (await node.ask(noop_job(inputs=[StorageSpec(CID=CID, path="/in")]))).accepted
    other = "QmNLei78zWmzUdbeRB3CiUfAizWUrbeeZh5K1rhAQKCh51"
    assert not (await node.ask(noop_job(inputs=[StorageSpec(CID=other, path="/in")]))).accepted
    assert CID in node.service.node_info().local_cids


async def test_behaviour_30_data_on_two_of_three_nodes(make_node: MakeNode, tmp_path: Path) -> None:
    """With locality=local, exactly the two nodes that hold the input bid on the job."""
    data = tmp_path / "input.txt"
    data.write_text("hello world\n")
    nodes = [await make_node(f"n{i}", locality="local") for i in range(3)]
    for node in nodes[:2]:
        await node.service.cache.put_path(data)
    job = noop_job(inputs=[StorageSpec(CID=CID, path="/inputs/input.txt")])
    answers = [await node.ask(job) for node in nodes]
    assert [a.accepted for a in answers] == [True, True, False]
    assert [CID in n.service.node_info().local_cids for n in nodes] == [True, True, False]
