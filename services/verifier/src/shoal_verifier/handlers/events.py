"""Consumers of ``ResultProposed`` (compute stream) and ``ExecutionsPlanned`` (requester stream).

A handler that returns acks; :class:`~shoal_common.bus.Poison` drops an undecodable message;
any other exception (a lost compare-and-set, a database hiccup) makes the bus redeliver it,
which is safe because the coordinator is idempotent on the envelope id.
"""

from __future__ import annotations

from pydantic import ValidationError

from shoal_common.bus import EventHandler, Poison
from shoal_common.events import Envelope, Event, ExecutionsPlanned, ResultProposed
from shoal_verifier.coordinator import Coordinator


def _parse(envelope: Envelope) -> Event:
    try:
        return envelope.parse()
    except (KeyError, ValidationError) as exc:
        raise Poison(f"cannot read {envelope.type} event {envelope.id}: {exc}") from exc


def proposals_handler(coordinator: Coordinator) -> EventHandler:
    async def handle(envelope: Envelope) -> None:
        evt = _parse(envelope)
        if isinstance(evt, ResultProposed):
            await coordinator.on_proposed(envelope.id, evt)

    return handle


def plans_handler(coordinator: Coordinator) -> EventHandler:
    async def handle(envelope: Envelope) -> None:
        evt = _parse(envelope)
        if isinstance(evt, ExecutionsPlanned):
            await coordinator.on_planned(envelope.id, evt, sent_at=envelope.time.timestamp())

    return handle
