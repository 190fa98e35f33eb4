"""Bus consumers: decode -> domain -> ack (return) / retry (raise) / drop (Poison)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
from pydantic import ValidationError

from shoal_common import tracing
from shoal_common.bus import Bus, Poison
from shoal_common.events import (
    BidAnswered,
    Envelope,
    ExecutionCancelled,
    ExecutionFailed,
    PublishFailed,
    ResultAccepted,
    ResultProposed,
    ResultPublished,
    ResultRejected,
    VerificationEscalated,
    VerificationFailed,
)
from shoal_common.protocol import Heartbeat
from shoal_common.subjects import HEARTBEAT_ALL, Producer
from shoal_requester.domain.housekeeping import Housekeeper
from shoal_requester.domain.orchestrator import Orchestrator

log = structlog.get_logger(__name__)

# (producer, durable consumer name, event types the requester reacts to)
SUBSCRIPTIONS: tuple[tuple[Producer, str, tuple[str, ...]], ...] = (
    (
        Producer.COMPUTE,
        "requester-compute",
        (
            ResultProposed.type,
            ExecutionFailed.type,
            ExecutionCancelled.type,
            BidAnswered.type,
        ),
    ),
    (
        Producer.VERIFIER,
        "requester-verifier",
        (
            ResultAccepted.type,
            ResultRejected.type,
            VerificationEscalated.type,
            VerificationFailed.type,
        ),
    ),
    (Producer.PUBLISHER, "requester-publisher", (ResultPublished.type, PublishFailed.type)),
)


def event_handler(
    orchestrator: Orchestrator, *, running: Callable[[], bool]
) -> Callable[[Envelope], Awaitable[None]]:
    async def handle(envelope: Envelope) -> None:
        if not running():
            # Stopped while the (shared) bus still delivers: leave it for the next start.
            raise RuntimeError("requester is stopped")
        try:
            event = envelope.parse()
        except (KeyError, ValidationError) as exc:
            raise Poison(f"cannot read {envelope.type} event {envelope.id}: {exc}") from exc
        await orchestrator.handle_event(event, event_id=envelope.id)

    return handle


async def consume(bus: Bus, orchestrator: Orchestrator, *, running: Callable[[], bool]) -> None:
    handler = tracing.traced_handler("requester", event_handler(orchestrator, running=running))
    for producer, durable, types in SUBSCRIPTIONS:
        await bus.consume_events(
            producer=producer, durable=durable, handler=handler, event_types=list(types)
        )


async def follow_heartbeats(bus: Bus, housekeeper: Housekeeper) -> Callable[[], Awaitable[None]]:
    """Feed every node heartbeat to the inventory; returns the unsubscribe function."""

    async def on_heartbeat(subject: str, data: bytes) -> None:
        try:
            beat = Heartbeat.from_bytes(data)
        except (ValueError, ValidationError) as exc:
            log.warning("heartbeat_unreadable", subject=subject, error=str(exc))
            return
        housekeeper.observe(beat)

    return await bus.subscribe(HEARTBEAT_ALL, on_heartbeat)
