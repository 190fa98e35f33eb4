"""The requester service: API, job store, scheduler, node inventory, housekeeping.

Consumes (JetStream, durable):
    compute   requester-compute    result_proposed, execution_failed, execution_cancelled
    verifier  requester-verifier   result_accepted, result_rejected, verification_escalated,
                                   verification_failed
    publisher requester-publisher  result_published, publish_failed
Emits (outbox -> JetStream): executions_planned (for non-noop verifiers).
Core NATS: subscribes shoal.node.heartbeat.*; requests shoal.compute.<node>.{ask_bid,
bid_accepted, bid_rejected, cancel, logs}.

HTTP: ``.app`` (served by the owner, e.g. ``shoal serve`` or the devstack, with uvicorn).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httpx
import structlog

from shoal_common import tracing
from shoal_common.bus import Bus, NatsBus
from shoal_requester import metrics
from shoal_requester.adapters.compute import BusComputeClient
from shoal_requester.app import create_app
from shoal_requester.domain.housekeeping import Housekeeper
from shoal_requester.domain.hub import HistoryHub
from shoal_requester.domain.inventory import Inventory
from shoal_requester.domain.jobs import JobService
from shoal_requester.domain.orchestrator import Orchestrator
from shoal_requester.domain.ports import ComputeClient
from shoal_requester.handlers import events as event_handlers
from shoal_requester.settings import RequesterSettings
from shoal_requester.store.base import RequesterStore
from shoal_requester.store.sql import SqlRequesterStore

log = structlog.get_logger(__name__)

# How long /readyz waits for the database before saying NOT READY.
READY_PROBE_TIMEOUT = 2.0


class _LateBoundBus:
    """Lets the compute client exist before start() has connected the bus."""

    def __init__(self, service: RequesterService) -> None:
        self._service = service

    async def request(self, subject: str, data: bytes, *, timeout: float) -> bytes:
        return await self._service.bus.request(subject, data, timeout=timeout)


class RequesterService:
    """One requester. ``bus=None`` connects its own NATS client to ``settings.nats_url``."""

    def __init__(
        self,
        settings: RequesterSettings,
        *,
        bus: Bus | None = None,
        store: RequesterStore | None = None,
        compute: ComputeClient | None = None,
    ) -> None:
        self.settings = settings
        self.node_id = settings.node_id or "requester"
        self._bus = bus
        self._owns_bus = bus is None
        self.store: RequesterStore = store or SqlRequesterStore(
            settings.db_url("requester"), commit_spacing_s=settings.commit_spacing_ms / 1000
        )
        self.inventory = Inventory(lost_after=settings.node_lost_after)
        metrics.watch_nodes(self.inventory)
        self.hub = HistoryHub()
        self.compute: ComputeClient = compute or BusComputeClient(
            _LateBoundBus(self), timeout=settings.rpc_timeout
        )
        self.orchestrator = Orchestrator(
            store=self.store, inventory=self.inventory, compute=self.compute, settings=settings
        )
        self.jobs = JobService(
            store=self.store,
            inventory=self.inventory,
            orchestrator=self.orchestrator,
            compute=self.compute,
            settings=settings,
        )
        self.housekeeper = Housekeeper(
            store=self.store,
            inventory=self.inventory,
            orchestrator=self.orchestrator,
            settings=settings,
        )
        self.http_client = httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=None))
        self._running = False
        self._unsubscribers: list[Callable[[], Awaitable[None]]] = []
        self._unhook_history: Callable[[], None] | None = None
        self.app = create_app(self)

    @property
    def bus(self) -> Bus:
        if self._bus is None:
            raise RuntimeError("the requester is not started")
        return self._bus

    async def start(self) -> None:
        # Off (and free) unless OTEL_* asks for it; one tracer provider per service.
        tracing.configure_tracing("requester")
        """Open the store (migrating it), connect, and start consuming and housekeeping."""
        if self._bus is None:
            self._bus = await NatsBus.connect(
                self.settings.nats_url,
                name=f"shoal-requester-{self.node_id}",
                stream_replicas=self.settings.nats_stream_replicas,
            )
        await self.store.open()
        self._unhook_history = self.store.subscribe_history(self.hub.publish)
        self.inventory.load(await self.store.list_nodes())
        await self.store.start_outbox(self.bus.publish_event)
        self.orchestrator.start()
        self._running = True
        self._unsubscribers.append(
            await event_handlers.follow_heartbeats(self.bus, self.housekeeper)
        )
        await event_handlers.consume(self.bus, self.orchestrator, running=lambda: self._running)
        self.housekeeper.start()
        log.info("requester_started", node_id=self.node_id)

    async def stop(self) -> None:
        self._running = False
        for unsubscribe in self._unsubscribers:
            try:
                await unsubscribe()
            except Exception as exc:
                log.warning("unsubscribe_failed", error=repr(exc))
        self._unsubscribers.clear()
        await self.housekeeper.stop()
        await self.orchestrator.stop()
        self.hub.close_all()
        if self._unhook_history is not None:
            self._unhook_history()
        await self.store.close()
        await self.http_client.aclose()
        if self._owns_bus and self._bus is not None:
            await self._bus.close()
            self._bus = None
        log.info("requester_stopped", node_id=self.node_id)

    async def ready(self) -> bool:
        """Running, and its database answers: a load balancer should not send submits that
        could only be refused with 503."""
        if not self._running:
            return False
        try:
            await asyncio.wait_for(self.store.ping(), READY_PROBE_TIMEOUT)
        except Exception as exc:  # any failure to reach the database means not ready
            log.warning("requester_not_ready", reason=repr(exc))
            return False
        return True

    def live_node_count(self) -> int:
        """Compute nodes currently sending heartbeats (the devstack waits on this)."""
        return self.inventory.live_count()
