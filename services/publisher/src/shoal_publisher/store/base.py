"""What the publisher needs from its datastore.

A publication record, the processed-event mark and the ``ResultPublished``/``PublishFailed``
event commit in one :class:`PublisherTx`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from shoal_common.events import Envelope, Event
from shoal_publisher.domain.models import Publication

Publish = Callable[[Envelope], Awaitable[None]]


class Relay(Protocol):
    """Publishes committed outbox events; :meth:`notify` after a commit for low latency."""

    def start(self) -> None: ...

    async def stop(self) -> None: ...

    def notify(self) -> None: ...


class PublisherTx(Protocol):
    """One transaction: leaving the context commits, an exception rolls back."""

    async def mark_processed(self, event_id: str) -> bool:
        """Record a consumed event id; False if it was already applied."""
        ...

    async def find_publication(self, execution_id: str) -> Publication | None: ...

    async def save_publication(self, publication: Publication) -> None:
        """Insert or replace the execution's publication record."""
        ...

    async def add_events(self, *events: Event) -> list[Envelope]:
        """Stage events for the relay; they go out only if the transaction commits."""
        ...


class PublisherStore(Protocol):
    """The publisher's datastore."""

    async def migrate(self) -> None: ...

    async def close(self) -> None: ...

    def transaction(self) -> AbstractAsyncContextManager[PublisherTx]: ...

    def relay(self, publish: Publish, *, poll_interval: float = 1.0) -> Relay: ...

    async def is_processed(self, event_id: str) -> bool:
        """Whether an event was applied (a cheap check before slow work)."""
        ...

    async def find_publication(self, execution_id: str) -> Publication | None: ...

    async def list_publications(self, job_id: str) -> list[Publication]:
        """A job's publications, oldest first."""
        ...

    async def outbox_size(self) -> int: ...
