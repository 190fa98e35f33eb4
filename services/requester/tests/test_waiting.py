"""Why a job waits, in plain words (what `shoal describe` shows for a Queued job)."""

from __future__ import annotations

from shoal_common.protocol import Capacity, NodeInfo, job_resources
from shoal_common.selectors import parse_selector
from shoal_common.spec import Engine
from shoal_requester.domain.matching import Requirements, requirements
from shoal_requester.domain.waiting import explain_declined, explain_wait
from shoal_requester.testing import GiB, make_spec, node_info


def gpu_node(node_id: str, *, gpus: int = 2, free_gpus: int = 0, zone: str = "eu") -> NodeInfo:
    info = node_info(node_id, labels={"zone": zone})
    total = info.total.model_copy(update={"gpu": gpus})
    return info.model_copy(
        update={
            "total": total,
            "max_per_job": total,
            "available": total.model_copy(update={"gpu": free_gpus}),
        }
    )


def req_for(**spec: object) -> Requirements:
    s = make_spec(**spec)
    return requirements(s, client_id="client-1", resources=job_resources(s))


def free(*infos: NodeInfo) -> list[tuple[NodeInfo, Capacity]]:
    return [(i, i.available) for i in infos]


def test_busy_gpus_with_a_selector() -> None:
    req = req_for(Resources={"GPU": "2"}, NodeSelectors=parse_selector("zone=eu"))
    nodes = free(gpu_node("a"), gpu_node("b"), gpu_node("c", free_gpus=1), gpu_node("d", zone="us"))
    assert explain_wait(req, nodes) == "no node with 2 GPUs free; 3 nodes match the selector"


def test_room_somewhere_is_not_a_reason() -> None:
    req = req_for(Resources={"GPU": "2"})
    assert explain_wait(req, free(gpu_node("a"), gpu_node("b", free_gpus=2))) is None


def test_each_resource_free_somewhere_but_not_together() -> None:
    req = req_for(Resources={"CPU": "2", "Memory": "4Gb"})
    cpu_only = node_info("a", available=Capacity(cpu=4, memory=1 * GiB, disk=GiB))
    memory_only = node_info("b", available=Capacity(cpu=1, memory=8 * GiB, disk=GiB))
    why = explain_wait(req, free(cpu_only, memory_only))
    assert why is not None
    assert why.startswith("no node with 2 CPUs and ")
    assert why.endswith(" of memory free at once; 2 nodes match the job")


def test_no_matching_node_says_what_is_missing() -> None:
    req = req_for(Engine="Docker")
    nodes = free(node_info("a", engines=[Engine.NOOP]), node_info("b", engines=[Engine.WASM]))
    assert explain_wait(req, nodes) == (
        "none of the 2 live nodes can run the job (engine Docker not available on 2 nodes)"
    )
    assert explain_wait(req, []) == "no compute node is live"


def test_min_bids_and_nodes_already_running_the_job() -> None:
    req = req_for(Resources={"GPU": "1"})
    nodes = free(gpu_node("a", free_gpus=1), gpu_node("b"), gpu_node("c"))
    assert explain_wait(req, nodes, min_free=3) == (
        "1 of the 3 nodes needed at once (min bids) is free; 3 nodes match the job"
    )
    assert explain_wait(req, nodes, taken=frozenset({"a"})) == (
        "no node with 1 GPU free; 3 nodes match the job (1 already running it)"
    )


def test_declined_quotes_the_nodes() -> None:
    said = [("b", "queue full"), ("a", "no")]
    assert explain_declined(said, 1, selectors=True) == (
        "2 nodes asked, none took the job (a: no; b: queue full); 1 node matches the selector"
    )
