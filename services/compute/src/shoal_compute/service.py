"""The compute node service: wires settings, store, bus, executors and the node's logic.

    node = ComputeService(ComputeSettings(node_id="compute-0", nats_url=...))
    await node.start()   # migrate, report interrupted runs, serve RPCs, heartbeat, relay
    ...
    await node.stop()    # stopping heartbeat, interrupt runs (reported failed), flush events

HTTP: ``.app`` serves ``GET /content/{cid}`` (the results the publisher fetches) and health.
With ``port`` set, whoever hosts the service (``shoal serve``, the devstack) serves ``.app``
there; with ``port=0`` the service serves it itself on a free port (``serve_http`` forces
either way), kept in the state dir and bound again after a restart, so the URLs of results
proposed before it still answer (B19).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import time
from pathlib import Path
from typing import Any

import structlog
from fastapi import FastAPI

from shoal_common import tracing
from shoal_common.bus import Bus, NatsBus
from shoal_common.events import Envelope
from shoal_common.protocol import HEARTBEAT_INTERVAL_S, Heartbeat, LogChunk, NodeInfo
from shoal_common.quiet_server import QuietServer
from shoal_common.spec import Engine, StorageSourceType
from shoal_common.subjects import compute_rpc, heartbeat, log_stream
from shoal_compute import __version__
from shoal_compute.adapters.content import ContentCache
from shoal_compute.adapters.sealing import ProposalSealer
from shoal_compute.app import create_app
from shoal_compute.domain.bidding import (
    AllOf,
    Approval,
    BidStrategy,
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
)
from shoal_compute.domain.capacity import CapacityLedger
from shoal_compute.domain.execution import LocalState
from shoal_compute.domain.node import ComputeNode
from shoal_compute.domain.results import ExecutionPaths, results_folder
from shoal_compute.domain.runner import ExecutionRunner, RunnerConfig
from shoal_compute.executors.base import Executor
from shoal_compute.executors.noop import NoopBehaviour, NoopExecutor, NoopHook
from shoal_compute.handlers.rpc import rpc_handlers
from shoal_compute.inputs.fetcher import InputConfig, InputFetcher
from shoal_compute.inputs.url import DownloadPolicy
from shoal_compute.settings import ComputeSettings
from shoal_compute.store.base import ExecutionStore, Relay
from shoal_compute.store.sql import SqlExecutionStore

log = structlog.get_logger(__name__)


class ComputeService:
    """One compute node. Construct, ``await start()``, ``await stop()``."""

    def __init__(
        self,
        settings: ComputeSettings,
        *,
        bus: Bus | None = None,
        store: ExecutionStore | None = None,
        executors: dict[Engine, Executor] | None = None,
        noop_hook: NoopHook | None = None,
    ) -> None:
        """``store`` and ``executors`` replace the defaults in tests (memory store, fakes)."""
        self.settings = settings
        self.node_id = settings.resolved_node_id()
        self._bus = bus
        self._own_bus = bus is None
        self.store: ExecutionStore = store or SqlExecutionStore(settings.node_db_url(self.node_id))
        self.cache = ContentCache(
            settings.content_dir,
            remember=max(1, settings.advertised_cids, settings.results_index_size),
        )
        self.fetcher = InputFetcher(
            InputConfig(
                download=DownloadPolicy(
                    max_bytes=settings.url_max_bytes,
                    retries=settings.url_retries,
                    backoff_s=settings.url_backoff_s,
                    timeout_s=settings.url_timeout_s,
                ),
                max_inline_bytes=settings.max_inline_bytes,
                parallel=settings.url_parallel,
                local_dirs_allowed=tuple(settings.local_dirs_allowed),
                content_store_url=settings.content_store_url,
                kubo_rpc_url=settings.kubo_rpc_url,
            ),
            self.cache,
            scratch=settings.state_dir / "tmp",
            modules_dir=settings.state_dir / "modules",
        )
        self.noop = NoopExecutor(
            NoopBehaviour(
                delay_s=settings.noop_delay_s,
                exit_code=settings.noop_exit_code,
                stdout=settings.noop_stdout,
                stderr=settings.noop_stderr,
                fail=settings.fail_executions,
                bad_results=settings.bad_results,
            ),
            hook=noop_hook,
            node_id=self.node_id,
        )
        self._given_executors = executors
        self.executors: dict[Engine, Executor] = {}
        self.app: FastAPI = create_app(self)
        self._content_url: str | None = None
        self._node: ComputeNode | None = None
        self._relay: Relay | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._http: Any = None
        self._http_task: asyncio.Task[None] | None = None
        self._seq = 0
        self._gpu_ids: tuple[str, ...] = ()
        self._gpu_devices = False
        self._prepare_task: asyncio.Task[None] | None = None
        self._extra_executors: list[Executor] = []  # started but not (yet) serving an engine
        self._started = False
        self._stopping = False

    # --- accessors ---

    @property
    def bus(self) -> Bus:
        if self._bus is None:
            raise RuntimeError("compute service not started")
        return self._bus

    @property
    def node(self) -> ComputeNode:
        if self._node is None:
            raise RuntimeError("compute service not started")
        return self._node

    @property
    def ready(self) -> bool:
        return self._started and not self._stopping

    @property
    def content_url(self) -> str | None:
        """Base URL of this node's content endpoint (``{content_url}/content/{cid}``)."""
        return self._content_url

    # --- lifecycle ---

    async def start(self) -> None:
        # Off (and free) unless OTEL_* asks for it; one tracer provider per service.
        tracing.configure_tracing("compute")
        s = self.settings
        if self._bus is None:
            self._bus = await NatsBus.connect(
                s.nats_url,
                name=f"shoal-compute-{self.node_id}",
                stream_replicas=s.nats_stream_replicas,
            )
        await self.store.start()
        await self._index_results()
        self._relay = self.store.relay(self._publish_event, service="compute")
        self._relay.start()
        await self._start_http()

        detected = await self._detect_gpus()
        gpu_ids = s.resolved_gpu_ids() or detected
        # Device requests only for GPUs nvidia-smi sees; declared-only GPUs are bookkeeping.
        self._gpu_devices = bool(detected)
        self._gpu_ids = gpu_ids  # the Docker executor maps executions' shares onto these
        self.executors = await self._build_executors()
        total = s.total_capacity(gpu_ids)
        ledger = CapacityLedger(total, gpu_ids, queue_factor=s.queue_factor)
        relay = self._relay
        runner = ExecutionRunner(
            RunnerConfig(
                node_id=self.node_id,
                executions_dir=s.executions_dir,
                default_timeout=s.default_timeout,
                allow_networking=s.allow_networking,
                max_run_output_bytes=s.max_run_output_bytes,
            ),
            store=self.store,
            executors=self.executors,
            fetcher=self.fetcher,
            cache=self.cache,
            committed=relay.notify,
            publish_log=self._publish_log if s.live_log_chunks else _no_live_log,
            seal=ProposalSealer(self.bus, wait_s=s.verifier_key_wait_s),
            content_url=lambda: self._content_url,
            finished=lambda eid: self.node.finished(eid),
            row_written=lambda eid: self.node.row_written(eid),
        )
        self._node = ComputeNode(
            node_id=self.node_id,
            ledger=ledger,
            strategy=self._strategy(ledger),
            store=self.store,
            runner=runner,
            committed=relay.notify,
            default_timeout=s.default_timeout,
            reservation_timeout_s=s.bid_reservation_timeout_s,
        )
        await self._node.recover()
        for op, handler in rpc_handlers(self._node).items():
            await self.bus.serve(compute_rpc(self.node_id, op), handler)
        self._started = True
        await self._send_heartbeat()
        self._heartbeat_task = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")
        log.info(
            "compute_node_started",
            node_id=self.node_id,
            engines=[e.value for e in self.engines()],
            cpu=total.cpu,
            memory=total.memory,
            gpus=list(gpu_ids),
            content_url=self._content_url,
        )

    async def stop(self) -> None:
        """Clean stop: tell the requester at once, interrupt runs (reported failed,
        retryable), flush their events, release everything."""
        if self._stopping:
            return
        self._stopping = True
        if self._node is not None:
            self._node.stopping = True
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat_task
        if self._started:
            with contextlib.suppress(Exception):
                await self._send_heartbeat(stopping=True)
        if self._node is not None:
            await self._node.runner.shutdown()
        if self._prepare_task is not None:
            self._prepare_task.cancel()
            with contextlib.suppress(BaseException):
                await self._prepare_task
        everything = [*self.executors.values(), *self._extra_executors]
        for executor in {id(e): e for e in everything}.values():
            with contextlib.suppress(Exception):
                await executor.close()
        if self._relay is not None:
            await self._relay.stop()
            with contextlib.suppress(Exception):
                await self._relay.relay_once()  # what the interrupted runs just recorded
        await self._stop_http()
        await self.fetcher.close()
        await self.store.close()
        if self._own_bus and self._bus is not None:
            await self._bus.close()
        self._started = False
        log.info("compute_node_stopped", node_id=self.node_id)

    async def _index_results(self) -> None:
        """Recent results into the in-memory CID index; older ones are found in the store."""
        recent = await self.store.list_executions(
            states=[LocalState.COMPLETED, LocalState.FAILED],
            limit=self.settings.results_index_size,
            newest_first=True,
        )
        for record in reversed(recent):
            if record.result_cid:
                self.cache.add_result(record.result_cid, self.node_paths(record.id).results)

        async def lookup(cid: str) -> Path | None:
            record = await self.store.find_by_result(cid)
            if record is None:
                return None
            return await results_folder(record, self.node_paths(record.id).results)

        self.cache.set_result_lookup(lookup)

    def node_paths(self, execution_id: str) -> ExecutionPaths:
        return ExecutionPaths.under(self.settings.executions_dir, execution_id)

    # --- executors and strategies ---

    async def _build_executors(self) -> dict[Engine, Executor]:
        s = self.settings
        if self._given_executors is not None:
            found = dict(self._given_executors)
            found.setdefault(Engine.NOOP, self.noop)
        elif s.noop_all_engines:
            found = {engine: self.noop for engine in Engine}
        else:
            found = {Engine.NOOP: self.noop}
            for candidate in (self._docker(), self._wasm()):
                if candidate is None:
                    continue
                if await candidate.is_available():
                    found[candidate.engine] = candidate
                    await self._remove_leftovers(candidate)
                else:
                    await candidate.close()
            await self._start_python_wasm(found)
        if s.engines is not None:
            wanted = set(s.engines)
            for engine, executor in list(found.items()):
                if engine not in wanted:
                    del found[engine]
                    if executor is not self.noop and executor not in found.values():
                        await executor.close()
        return found

    def _docker(self) -> Executor | None:
        s = self.settings
        if s.engines is not None and Engine.DOCKER not in s.engines:
            return None
        try:
            from shoal_compute.executors.docker import DockerExecutor
        except ImportError as exc:  # the docker package is optional at run time
            log.info("docker_executor_unavailable", error=str(exc))
            return None
        return DockerExecutor(
            s.arch,
            allow_networking=s.allow_networking,
            gpus=self._gpu_ids,
            node_id=self.node_id,
            node_home=hashlib.sha256(str(s.state_dir.resolve()).encode()).hexdigest()[:16],
            gpu_devices=self._gpu_devices,
        )

    def _wasm(self) -> Executor | None:
        s = self.settings
        if s.engines is not None and Engine.WASM not in s.engines:
            return None
        try:
            from shoal_compute.executors.wasm import WasmExecutor
        except ImportError as exc:
            log.info("wasm_executor_unavailable", error=str(exc))
            return None
        workers = self._workers()
        return WasmExecutor(
            self.fetcher.resolve_module,
            max_workers=workers,
            cache_dir=s.state_dir / "wasm-cache",
            scratch_dir=s.state_dir / "wasm-scratch",
        )

    async def _remove_leftovers(self, executor: Executor) -> None:
        """Containers a previous process of this node left behind (kill -9) go now."""
        remove = getattr(executor, "remove_leftovers", None)
        if remove is None:
            return
        try:
            removed = await remove()
        except Exception as exc:  # best effort: the engine still works
            log.warning("leftovers_not_removed", engine=executor.engine.value, error=str(exc))
            return
        if removed:
            log.info("leftovers_removed", engine=executor.engine.value, count=removed)

    async def _start_python_wasm(self, executors: dict[Engine, Executor]) -> None:
        """Python jobs. ``Language`` goes to a router registered at once when Docker is there
        (non-deterministic Python runs in ``settings.python_image``); deterministic Python joins
        it once its runtime is compiled (minutes the first time on a machine, so in the
        background)."""
        s = self.settings
        engines = (Engine.PYTHON_WASM, Engine.LANGUAGE)
        if s.engines is not None and not set(engines) & set(s.engines):
            return
        try:
            from shoal_compute.executors.python_wasm import (
                LanguageExecutor,
                PythonRuntimeUnavailable,
                PythonWasmExecutor,
            )
        except ImportError as exc:
            log.info("python_wasm_executor_unavailable", error=str(exc))
            return
        language = LanguageExecutor(None, executors.get(Engine.DOCKER), image=s.python_image)
        if language.docker is not None and (s.engines is None or Engine.LANGUAGE in s.engines):
            executors[Engine.LANGUAGE] = language
        executor = PythonWasmExecutor(
            s.python_wasm_artifacts_dir,
            max_workers=self._workers(),
            scratch_dir=s.state_dir / "python-scratch",
        )
        if not executor.snapshot.is_file():
            log.info("python_wasm_runtime_missing", path=str(executor.snapshot))
            await executor.close()
            return

        async def prepare() -> None:
            try:
                await executor.prepare()
            except PythonRuntimeUnavailable:
                return  # logged by the executor; the node offers only Python in Docker
            language.python_wasm = executor
            for engine in engines:
                if s.engines is None or engine in s.engines:
                    executors[engine] = language if engine is Engine.LANGUAGE else executor
            log.info("engine_ready", engines=[e.value for e in engines])

        self._prepare_task = asyncio.create_task(prepare(), name="python-wasm-prepare")
        self._extra_executors.append(executor)

    def _workers(self) -> int:
        """Threads for engines that run jobs on threads: one per core the node offers."""
        return max(1, int(self.settings.cpu or os.cpu_count() or 4))

    async def _detect_gpus(self) -> tuple[str, ...]:
        if self.settings.gpus is not None:  # explicitly declared (0 = none)
            return ()
        try:
            from shoal_compute.gpus import detect_gpus
        except ImportError:
            return ()
        found = await asyncio.to_thread(detect_gpus)
        return tuple(g.uuid or str(g.index) for g in found)

    def _strategy(self, ledger: CapacityLedger) -> BidStrategy:
        s = self.settings
        strategies: list[BidStrategy] = [
            Misbehaviour(bad_bids=s.bad_bids, reject_bids=s.reject_bids),
            EngineSupported(self.executors),  # live: engines that get ready later count
            StorageSupported(self.storage_sources()),
            PublisherSupported(s.publishers),
            VerifierSupported(s.verifiers),
            ResourcesWithinLimits(s.per_job_max(ledger.total)),
            TimeoutWithinBounds(s.timeout_min, s.timeout_max, s.timeout_bypass_clients),
            NetworkingAllowed(s.allow_networking),
            DataLocality(s.locality, s.reject_stateless, self.cache.has),
            # Last but one: may inspect an image or fetch a module.
            ExecutorAccepts(self.executors),
            Approval(s.approval),
        ]
        return AllOf(strategies)

    def engines(self) -> list[Engine]:
        return sorted(self.executors, key=lambda e: e.value)

    def storage_sources(self) -> list[StorageSourceType]:
        if self.settings.storage_sources is not None:
            return list(self.settings.storage_sources)
        return self.fetcher.supported_sources()

    # --- bus ---

    async def _publish_event(self, envelope: Envelope) -> None:
        await self.bus.publish_event(envelope)

    async def _publish_log(self, chunk: LogChunk) -> None:
        await self.bus.publish(log_stream(chunk.execution_id), chunk.to_bytes())

    def node_info(self) -> NodeInfo:
        s = self.settings
        node = self._node
        ledger = node.ledger if node is not None else None
        return NodeInfo(
            node_id=self.node_id,
            engines=self.engines(),
            storage_sources=self.storage_sources(),
            publishers=list(s.publishers),
            verifiers=list(s.verifiers),
            arch=s.arch,
            labels=dict(s.labels),
            total=ledger.total if ledger else s.total_capacity(),
            available=ledger.available() if ledger else s.total_capacity(),
            max_per_job=s.per_job_max(ledger.total if ledger else s.total_capacity()),
            timeout_min=s.timeout_min,
            timeout_max=s.timeout_max,
            bypass_clients=list(s.timeout_bypass_clients),
            running=node.running_count if node else 0,
            queued=node.queued_count if node else 0,
            allow_networking=s.allow_networking,
            local_cids=self.cache.recent(s.advertised_cids),
            content_url=self._content_url,
            version=__version__,
        )

    async def _send_heartbeat(self, *, stopping: bool = False) -> None:
        self._seq += 1
        beat = Heartbeat(
            info=self.node_info(), seq=self._seq, sent_at=time.time(), stopping=stopping
        )
        await self.bus.publish(heartbeat(self.node_id), beat.to_bytes())

    async def _heartbeat_loop(self) -> None:
        interval = self.settings.heartbeat_interval_s or HEARTBEAT_INTERVAL_S
        while True:
            await asyncio.sleep(interval)
            try:
                await self._send_heartbeat()
            except Exception as exc:  # NATS reconnecting: the next beat will do
                log.warning("heartbeat_failed", error=str(exc))

    # --- HTTP ---

    def _wants_own_http(self) -> bool:
        s = self.settings
        return s.serve_http if s.serve_http is not None else s.port == 0

    async def _start_http(self) -> None:
        s = self.settings
        if not self._wants_own_http():
            self._content_url = s.public_url or (_base_url(s.host, s.port) if s.port else None)
            return
        import uvicorn

        sock = self._http_socket()
        port = sock.getsockname()[1]
        if not s.port:
            s.remember_http_port(self.node_id, port)
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", access_log=False)
        self._http = QuietServer(config)
        self._http_task = asyncio.create_task(self._http.serve(sockets=[sock]), name="http")
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()  # raises what went wrong
                raise RuntimeError("HTTP server stopped before it started")
            await asyncio.sleep(0.005)
        self._content_url = s.public_url or _base_url(s.host, port)

    def _http_socket(self) -> socket.socket:
        """The content endpoint's socket: bound to ``port`` if set, else to the port this node
        chose before a restart (results it proposed carry URLs with it, B19), else, the first
        time or if that port is taken now, to a free one."""
        s = self.settings
        if s.port:
            return _bound_socket(s.host, s.port)
        remembered = s.remembered_http_port(self.node_id)
        if remembered is not None:
            try:
                return _bound_socket(s.host, remembered)
            except OSError as exc:
                log.warning(
                    "http_port_taken",
                    port=remembered,
                    error=str(exc),
                    detail="serving on a new port: results proposed before the restart "
                    "cannot be fetched at their old URLs",
                )
        return _bound_socket(s.host, 0)

    async def _stop_http(self) -> None:
        if self._http is None or self._http_task is None:
            return
        self._http.should_exit = True
        with contextlib.suppress(Exception):
            await self._http_task
        self._http = None
        self._http_task = None


def _bound_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _base_url(host: str, port: int) -> str:
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()  # something others can reach; override with public_url
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


async def _no_live_log(chunk: LogChunk) -> None:
    """Live log chunks not published (ComputeSettings.live_log_chunks is off)."""
