"""Many lightweight compute nodes in one process, for scale benchmarks (issue 6, targets 4 and 7).

    fleet = SimulatedFleet(FleetConfig(count=1000), bus=bus, state_dir=Path(".sim"))
    await fleet.start()   # HTTP content endpoint, one RPC subscription, spread heartbeats
    ...
    await fleet.stop()    # a "stopping" heartbeat per node: the requester drops them at once

or in a process of its own (what ``shoal devstack --simulated-nodes N`` starts, so the fleet's
heartbeats do not share the requester's event loop, as real nodes would not):

    python -m shoal_compute.simulated --nats-url nats://... --count 1000 --state-dir .sim

Each simulated node is a real participant on the real NATS server: it heartbeats its node info
(``shoal.node.heartbeat.<node>``), answers ``ask_bid`` / ``bid_accepted`` / ``bid_rejected`` /
``cancel`` / ``logs`` / ``approve`` addressed to it, and emits the events a real node emits
(``ResultProposed``, sealed to the verifier for deterministic jobs; ``ExecutionCancelled``) on
JetStream. What it leaves out is what makes a real node heavy: no store, no executors, no
per-node connection, subscription or HTTP server. The whole fleet shares one NATS connection,
one wildcard subscription (``shoal.compute.*.*``, messages for nodes not in the fleet are
ignored) and one content endpoint; heartbeats are spread evenly over the interval.

Every execution is a noop that succeeds at once with an empty result (empty stdout and stderr,
exit code 0; the same results folder, so one CID, for every job). Inputs are not fetched and
job settings beyond resources are not checked: a simulated node bids on any job that fits its
free capacity. State is kept in memory only (what a benchmark needs): a restarted fleet
forgets its executions; events are published with a fixed envelope id and retried until
JetStream has them, so a NATS hiccup does not lose a result.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import structlog
from fastapi import FastAPI
from nats.aio.msg import Msg
from pydantic import ValidationError

from shoal_common import event_loop
from shoal_common.bus import NatsBus
from shoal_common.cid import cid_of_path
from shoal_common.errors import ShoalError
from shoal_common.events import (
    Envelope,
    Event,
    ExecutionCancelled,
    ExecutionFailed,
    ResultProposed,
)
from shoal_common.httpapp import NO_FASTAPI_TELEMETRY
from shoal_common.protocol import (
    HEARTBEAT_INTERVAL_S,
    Ack,
    ApproveBid,
    AskBid,
    BidAnswer,
    BidDecision,
    CancelExecution,
    Capacity,
    LogsAnswer,
    LogsQuery,
    Message,
    NodeInfo,
    job_resources,
)
from shoal_common.quiet_server import QuietServer
from shoal_common.spec import (
    Deal,
    Engine,
    Job,
    PublisherSpec,
    PublisherType,
    RunOutput,
    StorageSourceType,
    VerifierType,
)
from shoal_common.subjects import COMPUTE_RPC_ANY, ComputeOp, heartbeat, parse_compute_rpc
from shoal_compute import __version__
from shoal_compute.adapters.content import ContentCache
from shoal_compute.adapters.sealing import ProposalSealer
from shoal_compute.api.content import router as content_router
from shoal_compute.executors.base import write_run_files

log = structlog.get_logger(__name__)

GIB = 1024**3
# Executions remembered after they ended, to answer late calls as a real node would.
_REMEMBER_DONE = 100_000
# Heartbeat slots per interval: 1,000 nodes at 1 s go out as 10 every 10 ms.
_HEARTBEAT_SLOTS = 100


@dataclass(frozen=True)
class FleetConfig:
    """How many simulated nodes, and what each offers."""

    count: int
    prefix: str = "sim"
    cpu: float = 4.0
    memory: int = 8 * GIB
    disk: int = 100 * GIB
    # Extra labels per node (cycled); every node is also labelled name=<id>, simulated=true.
    labels: tuple[dict[str, str], ...] = ()
    arch: str = "amd64"
    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S
    reservation_timeout_s: float = 30.0
    host: str = "127.0.0.1"
    verifier_key_wait_s: float = 60.0

    def node_ids(self) -> list[str]:
        width = max(4, len(str(max(0, self.count - 1))))
        return [f"{self.prefix}-{i:0{width}d}" for i in range(self.count)]


@dataclass
class SimulatedNode:
    """One node's books: what it has reserved or running, by execution."""

    node_id: str
    info: dict[str, Any]  # NodeInfo in wire form; only the volatile fields change
    total: Capacity
    used: Capacity = field(default_factory=Capacity)
    holds: dict[str, Capacity] = field(default_factory=dict)
    reservations: dict[str, tuple[Job, asyncio.TimerHandle]] = field(default_factory=dict)
    running: dict[str, bool] = field(default_factory=dict)  # execution -> cancel requested
    seq: int = 0
    _info_json: bytes = b""
    _encoded_for: tuple[Capacity, int] | None = None

    def hold(self, execution_id: str, resources: Capacity) -> bool:
        if not (self.used + resources).fits_in(self.total):
            return False
        self.holds[execution_id] = resources
        self.used = self.used + resources
        return True

    def release(self, execution_id: str) -> None:
        resources = self.holds.pop(execution_id, None)
        if resources is not None:
            self.used = self.used - resources

    def heartbeat(self, *, stopping: bool = False) -> bytes:
        """The Heartbeat message in wire form; the info is encoded again only if it changed."""
        self.seq += 1
        state = (self.used, len(self.running))
        if state != self._encoded_for:
            self.info["available"] = (self.total - self.used).model_dump(mode="json")
            self.info["running"] = len(self.running)
            self._info_json = orjson.dumps(self.info)
            self._encoded_for = state
        tail = orjson.dumps({"seq": self.seq, "sent_at": time.time(), "stopping": stopping})
        return b'{"info":' + self._info_json + b"," + tail[1:]


Handler = Callable[[SimulatedNode, bytes], Awaitable[Message]]


class SimulatedFleet:
    """N simulated compute nodes over one NATS connection. ``start()``, ``stop()``."""

    def __init__(self, config: FleetConfig, *, bus: NatsBus, state_dir: Path) -> None:
        self.config = config
        self._bus = bus
        self._state_dir = state_dir
        self.nodes: dict[str, SimulatedNode] = {}
        self._done: OrderedDict[str, str] = OrderedDict()  # execution -> final state
        self._sealer = ProposalSealer(bus, wait_s=config.verifier_key_wait_s)
        self._tasks: set[asyncio.Task[None]] = set()
        self._sub: Any = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._http: Any = None
        self._http_task: asyncio.Task[None] | None = None
        self._result_cid = ""
        self._result_url: str | None = None
        self._stopping = False
        self._handlers: dict[ComputeOp, Handler] = {
            ComputeOp.ASK_BID: self._ask_bid,
            ComputeOp.BID_ACCEPTED: self._bid_accepted,
            ComputeOp.BID_REJECTED: self._bid_rejected,
            ComputeOp.CANCEL: self._cancel,
            ComputeOp.LOGS: self._logs,
            ComputeOp.APPROVE: self._approve,
        }

    @property
    def node_ids(self) -> list[str]:
        return list(self.nodes)

    # --- lifecycle ---

    async def start(self) -> None:
        cfg = self.config
        results = self._state_dir / "results"
        await asyncio.to_thread(_write_empty_result, results)
        self._result_cid = await asyncio.to_thread(cid_of_path, results)
        cache = ContentCache(self._state_dir / "content", remember=1)
        cache.add_result(self._result_cid, results)
        content_url = await self._start_http(cache)
        self._result_url = f"{content_url}/content/{self._result_cid}"
        total = Capacity(cpu=cfg.cpu, memory=cfg.memory, disk=cfg.disk)
        for i, node_id in enumerate(cfg.node_ids()):
            labels = {"name": node_id, "simulated": "true"}
            if cfg.labels:
                labels.update(cfg.labels[i % len(cfg.labels)])
            info = NodeInfo(
                node_id=node_id,
                engines=sorted(Engine, key=lambda e: e.value),
                storage_sources=[
                    StorageSourceType.IPFS,
                    StorageSourceType.URL_DOWNLOAD,
                    StorageSourceType.INLINE,
                ],
                publishers=[PublisherType.NOOP, PublisherType.LOCAL, PublisherType.IPFS],
                verifiers=[VerifierType.NOOP, VerifierType.DETERMINISTIC],
                arch=cfg.arch,
                labels=labels,
                total=total,
                available=total,
                max_per_job=total,
                content_url=content_url,
                version=__version__,
            )
            wire = info.model_dump(mode="json", by_alias=True)
            self.nodes[node_id] = SimulatedNode(node_id=node_id, info=wire, total=total)
        self._sub = await self._bus.client.subscribe(COMPUTE_RPC_ANY, cb=self._on_request)
        self._heartbeat_task = asyncio.create_task(self._heartbeat_loop(), name="sim-heartbeats")
        log.info("simulated_fleet_started", nodes=len(self.nodes), content_url=content_url)

    async def stop(self) -> None:
        """Say goodbye (a stopping heartbeat per node), finish in-flight events, close."""
        if self._stopping:
            return
        self._stopping = True
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat_task
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        for node in self.nodes.values():
            for _, timer in node.reservations.values():
                timer.cancel()
            with contextlib.suppress(Exception):
                await self._bus.publish(heartbeat(node.node_id), node.heartbeat(stopping=True))
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)
        for task in list(self._tasks):
            task.cancel()
        await self._stop_http()
        log.info("simulated_fleet_stopped", nodes=len(self.nodes))

    # --- heartbeats ---

    async def _heartbeat_loop(self) -> None:
        """Every node once per interval, in evenly spaced slots (never all at once)."""
        loop = asyncio.get_running_loop()
        nodes = list(self.nodes.values())
        slots = max(1, min(len(nodes), _HEARTBEAT_SLOTS))
        per_slot = math.ceil(len(nodes) / slots)
        step = self.config.heartbeat_interval_s / slots
        started = loop.time()
        tick = 0
        while True:
            first = (tick % slots) * per_slot
            for node in nodes[first : first + per_slot]:
                try:
                    await self._bus.publish(heartbeat(node.node_id), node.heartbeat())
                except Exception as exc:  # NATS reconnecting: the next beat will do
                    log.warning("heartbeat_failed", node_id=node.node_id, error=str(exc))
            tick += 1
            await asyncio.sleep(max(0.0, started + tick * step - loop.time()))

    # --- request/reply ---

    async def _on_request(self, msg: Msg) -> None:
        """Every node-addressed call of the fleet; calls for other nodes are not ours."""
        parsed = parse_compute_rpc(msg.subject)
        node = self.nodes.get(parsed[0]) if parsed else None
        if parsed is None or node is None:
            return
        try:
            answer = (await self._handlers[parsed[1]](node, msg.data)).to_bytes()
        except (ValidationError, ValueError) as exc:
            answer = orjson.dumps({"error": f"malformed {parsed[1].value} request: {exc}"})
        except Exception as exc:  # a bug: answer like the real bus does, never go silent
            log.exception("simulated_request_failed", subject=msg.subject)
            answer = orjson.dumps({"error": repr(exc)})
        if msg.reply:
            with contextlib.suppress(Exception):
                await msg.respond(answer)

    async def _ask_bid(self, node: SimulatedNode, raw: bytes) -> Message:
        ask = AskBid.from_bytes(raw)
        eid = ask.execution_id
        if self._stopping:
            return BidAnswer(execution_id=eid, accepted=False, reason="node is shutting down")
        if eid in node.running:  # a retried ask: the same answer
            return BidAnswer(execution_id=eid, accepted=True, taken=ask.take)
        if eid in node.reservations:
            if ask.take:
                return self._take(node, eid)
            return BidAnswer(execution_id=eid, accepted=True)
        try:
            job = ask.job_model()
            resources = job_resources(job.spec)
        except (ValidationError, ValueError) as exc:
            return BidAnswer(execution_id=eid, accepted=False, reason=f"invalid job: {exc}")
        if not node.hold(eid, resources):
            return BidAnswer(execution_id=eid, accepted=False, reason="node is at capacity")
        timer = asyncio.get_running_loop().call_later(
            self.config.reservation_timeout_s, self._expire, node, eid
        )
        node.reservations[eid] = (job, timer)
        if ask.take:  # the requester takes a yes at once (ADR 0029), as a real node does
            return self._take(node, eid)
        return BidAnswer(execution_id=eid, accepted=True)

    def _take(self, node: SimulatedNode, execution_id: str) -> BidAnswer:
        self._accept(node, execution_id, "")
        return BidAnswer(execution_id=execution_id, accepted=True, taken=True)

    def _expire(self, node: SimulatedNode, execution_id: str) -> None:
        if node.reservations.pop(execution_id, None) is not None:
            node.release(execution_id)

    async def _bid_accepted(self, node: SimulatedNode, raw: bytes) -> Message:
        decision = BidDecision.from_bytes(raw)
        eid = decision.execution_id
        if eid not in node.reservations:
            if eid in node.running:
                return Ack()  # repeated accept: already ours
            return self._unknown(node, eid)
        self._accept(node, eid, decision.job_id)
        return Ack()

    def _accept(self, node: SimulatedNode, execution_id: str, job_id: str) -> None:
        """Run a reserved execution (the reservation must exist)."""
        job, timer = node.reservations.pop(execution_id)
        timer.cancel()
        node.running[execution_id] = False
        self._spawn(self._run(node, execution_id, job, job_id or job.metadata.id))

    async def _bid_rejected(self, node: SimulatedNode, raw: bytes) -> Message:
        eid = BidDecision.from_bytes(raw).execution_id
        reserved = node.reservations.pop(eid, None)
        if reserved is None:
            return self._unknown(node, eid)
        reserved[1].cancel()
        node.release(eid)
        return Ack()

    async def _cancel(self, node: SimulatedNode, raw: bytes) -> Message:
        eid = CancelExecution.from_bytes(raw).execution_id
        reserved = node.reservations.pop(eid, None)
        if reserved is not None:
            reserved[1].cancel()
            node.release(eid)
            return Ack()
        if eid in node.running:
            node.running[eid] = True  # seen before its outcome is recorded
            return Ack()
        state = self._done.get(eid)
        if state is None:
            return Ack(ok=False, code="not_found", error=f"execution {eid} is not on this node")
        if state == "cancelled":
            return Ack()
        return Ack(
            ok=False, code="already_terminal", error=f"execution {eid} already ended ({state})"
        )

    async def _logs(self, node: SimulatedNode, raw: bytes) -> Message:
        eid = LogsQuery.from_bytes(raw).execution_id
        if eid in node.running:
            return LogsAnswer(execution_id=eid)
        if eid in self._done:
            return LogsAnswer(execution_id=eid, finished=True)  # a noop prints nothing
        return LogsAnswer(execution_id=eid, error=f"execution {eid} is not on this node")

    async def _approve(self, node: SimulatedNode, raw: bytes) -> Message:
        eid = ApproveBid.from_bytes(raw).execution_id
        # Simulated nodes bid at once (approval policy "auto"): nothing is ever held.
        return Ack(ok=False, code="not_found", error=f"no held bid for execution {eid}")

    def _unknown(self, node: SimulatedNode, execution_id: str) -> Ack:
        state = self._done.get(execution_id)
        if state is None:
            error = f"no bid for execution {execution_id} on node {node.node_id}"
            return Ack(ok=False, code="not_found", error=error)
        return Ack(
            ok=False,
            code="invalid_transition",
            error=f"execution {execution_id} is already {state} on this node",
        )

    # --- executions ---

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, node: SimulatedNode, eid: str, job: Job, job_id: str) -> None:
        """The noop run: succeed at once with the empty result, then emit the outcome."""
        spec = job.spec
        event: Event
        try:
            proposal = ResultProposed(
                job_id=job_id,
                execution_id=eid,
                node_id=node.node_id,
                result_cid=self._result_cid,
                run_output=RunOutput(),
                verifier=spec.effective_verifier,
                deal=spec.deal or Deal(),
                publisher=spec.publisher_spec or PublisherSpec(type=spec.effective_publisher),
                result_url=self._result_url,
                size=1,  # the exitCode file: "0"
            )
            event = await self._sealer(proposal)
            state = "completed"
        except ShoalError as exc:  # no verifier to seal to: a real node fails it the same way
            event = ExecutionFailed(
                job_id=job_id,
                execution_id=eid,
                node_id=node.node_id,
                error=exc.detail,
                retryable=exc.retryable,
            )
            state = "failed"
        if node.running.get(eid):
            event = ExecutionCancelled(
                job_id=job_id, execution_id=eid, node_id=node.node_id, reason="cancelled"
            )
            state = "cancelled"
        node.running.pop(eid, None)
        node.release(eid)
        self._remember(eid, state)
        await self._publish(Envelope.wrap(event, trace={}))

    def _remember(self, execution_id: str, state: str) -> None:
        self._done[execution_id] = state
        while len(self._done) > _REMEMBER_DONE:
            self._done.popitem(last=False)

    async def _publish(self, envelope: Envelope) -> None:
        """Until JetStream has it: the envelope id makes a repeat a no-op (de-duplication)."""
        delay = 0.05
        while True:
            try:
                await self._bus.publish_event(envelope)
                return
            except ShoalError as exc:
                if self._stopping and delay >= 1.0:
                    log.warning("simulated_event_lost", type=envelope.type, error=exc.detail)
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    # --- HTTP: the one results folder, for the publisher ---

    async def _start_http(self, cache: ContentCache) -> str:
        import uvicorn

        app = FastAPI(
            telemetry=NO_FASTAPI_TELEMETRY,
            title="Shoal simulated compute nodes",
            docs_url=None,
            redoc_url=None,
        )
        app.state.content_cache = cache
        app.include_router(content_router)
        sock = socket.socket(socket.AF_INET6 if ":" in self.config.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.config.host, 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
        self._http = QuietServer(config)
        self._http_task = asyncio.create_task(self._http.serve(sockets=[sock]), name="sim-http")
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()
                raise RuntimeError("HTTP server stopped before it started")
            await asyncio.sleep(0.005)
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"http://{host}:{port}"

    async def _stop_http(self) -> None:
        if self._http is None or self._http_task is None:
            return
        self._http.should_exit = True
        with contextlib.suppress(Exception):
            await self._http_task


def _write_empty_result(results: Path) -> None:
    """What a noop run that printed nothing leaves: empty stdout/stderr, exit code 0."""
    write_run_files(results, b"", b"", 0)


# --- a process of its own: ``python -m shoal_compute.simulated`` (what the devstack starts) ---


def main(argv: list[str] | None = None) -> None:
    """Run a fleet until SIGTERM/SIGINT; prints ``ready`` once it is up."""
    import argparse
    import json
    import signal

    p = argparse.ArgumentParser(prog="python -m shoal_compute.simulated", description=__doc__)
    p.add_argument("--nats-url", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--prefix", default="sim")
    p.add_argument("--cpu", type=float, default=FleetConfig.cpu)
    p.add_argument("--memory", type=int, default=FleetConfig.memory, help="Bytes per node.")
    p.add_argument("--arch", default=FleetConfig.arch)
    p.add_argument("--labels", default="[]", help="JSON list of label maps, cycled.")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    from shoal_common.logging import configure_logging

    configure_logging(level=args.log_level)  # stderr: stdout carries only "ready"
    config = FleetConfig(
        count=args.count,
        prefix=args.prefix,
        cpu=args.cpu,
        memory=args.memory,
        arch=args.arch,
        labels=tuple(json.loads(args.labels)),
    )

    async def run() -> None:
        bus = await NatsBus.connect(args.nats_url, name="shoal-simulated-fleet")
        fleet = SimulatedFleet(config, bus=bus, state_dir=args.state_dir)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await fleet.start()
            print("ready", flush=True)
            await stop.wait()
        finally:
            await fleet.stop()
            await bus.close()

    event_loop.run(run())


if __name__ == "__main__":
    main()
