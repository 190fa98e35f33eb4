"""The verifier service: consumes proposals and plans, decides, emits decisions via its outbox."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time

import structlog
from fastapi import FastAPI

from shoal_common import tracing
from shoal_common.bus import Bus, EventHandler, NatsBus
from shoal_common.commitments import VerifierKey, VerifierKeyAnswer
from shoal_common.errors import Unavailable
from shoal_common.events import Envelope, ExecutionsPlanned, ResultProposed
from shoal_common.subjects import VERIFIER_KEY, Producer
from shoal_verifier.app import create_app
from shoal_verifier.coordinator import Coordinator
from shoal_verifier.domain.decide import Policy
from shoal_verifier.handlers.events import plans_handler, proposals_handler
from shoal_verifier.settings import VerifierSettings
from shoal_verifier.store.base import Relay, VerifierStore
from shoal_verifier.store.sql import SqlVerifierStore

log = structlog.get_logger(__name__)

_PAST_DEADLINE_S = 0.01
_RETRY_S = 1.0  # a failed sweep (database unreachable) is tried again this soon


class VerifierService:
    """``VerifierService(settings, bus=...)``; ``await start()`` ... ``await stop()``.

    With ``bus=None`` it connects its own :class:`NatsBus` to ``settings.nats_url``; with
    ``store=None`` it opens its SQL store at ``settings.db_url("verifier")`` (SQLite under
    ``state_dir`` unless ``database_url`` is set) and migrates it.
    """

    def __init__(
        self,
        settings: VerifierSettings,
        *,
        bus: Bus | None = None,
        store: VerifierStore | None = None,
    ) -> None:
        self.settings = settings
        self._bus = bus
        self._own_bus = bus is None
        self.store: VerifierStore = store or SqlVerifierStore(settings.db_url("verifier"))
        self._relay: Relay | None = None
        self._sweeper: asyncio.Task[None] | None = None
        # The sweeper sleeps until the next round deadline (clock time) or a sooner one is set.
        self._sweep_at = math.inf
        self._sooner = asyncio.Event()
        self._key: VerifierKey | None = None
        self.coordinator: Coordinator | None = None
        self._running = False
        self.app: FastAPI = create_app(self)

    @property
    def bus(self) -> Bus:
        if self._bus is None:
            raise RuntimeError("the verifier is not started")
        return self._bus

    @property
    def public_key(self) -> VerifierKey:
        if self._key is None:
            raise RuntimeError("the verifier is not started")
        return self._key

    async def ready(self) -> bool:
        return self._running

    async def start(self) -> None:
        # Off (and free) unless OTEL_* asks for it; one tracer provider per service.
        tracing.configure_tracing("verifier")
        s = self.settings
        if self._bus is None:
            self._bus = await NatsBus.connect(
                s.nats_url, name="shoal-verifier", stream_replicas=s.nats_stream_replicas
            )
        await self.store.migrate()
        self._key = VerifierKey.from_private_bytes(
            await self.store.load_or_create_key(VerifierKey.generate().private_bytes())
        )
        self._relay = self.store.relay(self.bus.publish_event, poll_interval=s.relay_poll_interval)
        self._relay.start()
        self.coordinator = Coordinator(
            self.store,
            self._key,
            policy=Policy(
                max_escalations=s.max_escalations,
                max_extra_executions=s.max_extra_executions,
                require_sealed=s.require_sealed,
            ),
            decision_timeout=s.decision_timeout,
            on_commit=self._relay.notify,
            on_deadline=self._deadline_set,
        )
        answer = VerifierKeyAnswer(
            public_key=self._key.public.to_text(), key_id=self._key.public.key_id
        ).to_bytes()

        async def key_request(_: bytes) -> bytes:
            return answer

        await self.bus.serve(VERIFIER_KEY, key_request, queue="verifier")
        self._running = True
        await self.bus.consume_events(
            producer=Producer.COMPUTE,
            durable=s.durable_name,
            handler=tracing.traced_handler(
                "verifier", self._guard(proposals_handler(self.coordinator))
            ),
            event_types=[ResultProposed.FOR_VERIFIER],
        )
        await self.bus.consume_events(
            producer=Producer.REQUESTER,
            durable=s.durable_name,
            handler=tracing.traced_handler(
                "verifier", self._guard(plans_handler(self.coordinator))
            ),
            event_types=[ExecutionsPlanned.type],
        )
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="verifier-sweep")
        log.info("verifier_started", key_id=self._key.public.key_id)

    def _guard(self, handler: EventHandler) -> EventHandler:
        """A shared bus keeps delivering after stop(): leave those messages for the next run."""

        async def guarded(envelope: Envelope) -> None:
            if not self._running:
                raise Unavailable("the verifier is stopping")
            await handler(envelope)

        return guarded

    def _deadline_set(self, deadline: float) -> None:
        if deadline < self._sweep_at:
            self._sooner.set()

    async def _sweep_forever(self) -> None:
        """Decide rounds at their deadline: a sweep at start (what passed while the verifier was
        down), then one at each next deadline the store holds, woken early when this verifier
        opens a sooner round, and at least every ``sweep_interval`` (rounds opened by another
        replica sharing the database)."""
        assert self.coordinator is not None
        clock = time.time
        while True:
            self._sooner.clear()
            self._sweep_at = math.inf  # a round opened during this pass is looked at again
            wait = self.settings.sweep_interval
            try:
                await self.coordinator.sweep()
                deadline = await self.coordinator.next_deadline()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("verifier_sweep_failed", error=repr(exc))
                deadline = None
                wait = min(wait, _RETRY_S)
            now = clock()
            if deadline is not None:
                # Just past it: the sweep takes rounds that started strictly before now - timeout.
                wait = min(wait, max(0.0, deadline - now) + _PAST_DEADLINE_S)
            self._sweep_at = now + wait
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sooner.wait(), wait)
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise asyncio.CancelledError  # (3.11's wait_for can drop a racing cancel)

    async def stop(self) -> None:
        self._running = False
        if self._sweeper:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._relay:
            await self._relay.stop()
        if self._own_bus and self._bus is not None:
            await self._bus.close()
            self._bus = None
        await self.store.close()
