"""Consumers of ``ResultAccepted`` (verifier stream), ``ExecutionFailed`` (compute stream, for
partial results) and ``ResultProposed`` (compute stream: noop-verified results, published with
no verifier decision to wait for, ADR 0017). An accepted result for the noop publisher is the
requester's to record (ADR 0017): it is acked and left alone.

Returning acks; :class:`~shoal_common.bus.Poison` drops an unreadable message; any other
exception (a database hiccup) makes the bus redeliver it, which is safe: publishing is
idempotent on the envelope id and on the execution.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from pydantic import ValidationError

from shoal_common.bus import EventHandler, Poison
from shoal_common.events import (
    Envelope,
    ExecutionFailed,
    ResultAccepted,
    ResultProposed,
    publisher_takes_proposal,
    requester_publishes,
)
from shoal_publisher.publishing import Publishing

E = TypeVar("E", ResultAccepted, ExecutionFailed, ResultProposed)


def _handler(kind: type[E], apply: Callable[[str, E], Awaitable[None]]) -> EventHandler:
    async def handle(envelope: Envelope) -> None:
        try:
            evt = envelope.parse()
        except (KeyError, ValidationError) as exc:
            raise Poison(f"cannot read {envelope.type} event {envelope.id}: {exc}") from exc
        if isinstance(evt, kind):
            await apply(envelope.id, evt)

    return handle


def accepted_handler(publishing: Publishing) -> EventHandler:
    async def publish(event_id: str, evt: ResultAccepted) -> None:
        if not requester_publishes(evt.publisher.type):
            await publishing.on_accepted(event_id, evt)

    return _handler(ResultAccepted, publish)


def failed_handler(publishing: Publishing) -> EventHandler:
    """``ExecutionFailed`` with a partial result: publish what the run wrote (behaviour 11)."""
    return _handler(ExecutionFailed, publishing.on_failed)


def proposed_handler(publishing: Publishing) -> EventHandler:
    """``ResultProposed`` of a noop-verified job with a real publisher: publish it now."""

    async def publish(event_id: str, evt: ResultProposed) -> None:
        if publisher_takes_proposal(evt.verifier, evt.publisher.type) and evt.result_cid:
            await publishing.on_proposed(event_id, evt)

    return _handler(ResultProposed, publish)
