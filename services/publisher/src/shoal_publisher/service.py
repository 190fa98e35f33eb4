"""The publisher service: publishes accepted results and serves the content store over HTTP."""

from __future__ import annotations

import contextlib

import structlog
from fastapi import FastAPI

from shoal_common import tracing
from shoal_common.bus import Bus, EventHandler, NatsBus
from shoal_common.content_store import ContentStore
from shoal_common.errors import Unavailable
from shoal_common.events import Envelope, ExecutionFailed, ResultAccepted, ResultProposed
from shoal_common.spec import PublisherType
from shoal_common.subjects import Producer
from shoal_publisher.adapters.content import AsyncContentStore
from shoal_publisher.adapters.fetch import HttpResultFetcher
from shoal_publisher.adapters.kubo import AioipfsKubo
from shoal_publisher.app import create_app
from shoal_publisher.domain.ports import KuboClient, ResultFetcher
from shoal_publisher.domain.publishers import (
    FailingPublisher,
    IpfsPublisher,
    LocalPublisher,
    NoopPublisher,
    Publisher,
)
from shoal_publisher.handlers.events import accepted_handler, failed_handler, proposed_handler
from shoal_publisher.publishing import Publishing
from shoal_publisher.settings import PublisherSettings
from shoal_publisher.store.base import PublisherStore, Relay
from shoal_publisher.store.sql import SqlPublisherStore

log = structlog.get_logger(__name__)


class PublisherService:
    """``PublisherService(settings, bus=...)``; ``await start()`` ... ``await stop()``.

    ``.app`` is the HTTP app (content store, kubo RPC subset) for the runner to serve on
    ``settings.port``. With ``bus=None`` it connects its own NATS; ``store``, ``fetcher``
    and ``kubo`` may be injected (tests); by default: SQL at ``settings.db_url("publisher")``,
    httpx downloads, and aioipfs on ``settings.kubo_rpc_url`` when set.
    """

    def __init__(
        self,
        settings: PublisherSettings,
        *,
        bus: Bus | None = None,
        store: PublisherStore | None = None,
        fetcher: ResultFetcher | None = None,
        kubo: KuboClient | None = None,
    ) -> None:
        self.settings = settings
        self._bus = bus
        self._own_bus = bus is None
        self.store: PublisherStore = store or SqlPublisherStore(settings.db_url("publisher"))
        self.content = ContentStore(settings.content_root)
        self._fetcher = fetcher
        self._own_fetcher: HttpResultFetcher | None = None
        self._kubo = kubo
        if kubo is None and settings.kubo_rpc_url:
            self._kubo = AioipfsKubo(settings.kubo_rpc_url)
        self._relay: Relay | None = None
        self.publishing: Publishing | None = None
        self._running = False
        self.app: FastAPI = create_app(self)

    @property
    def bus(self) -> Bus:
        if self._bus is None:
            raise RuntimeError("the publisher is not started")
        return self._bus

    async def ready(self) -> bool:
        return self._running

    def publishers(self, fetcher: ResultFetcher) -> dict[PublisherType, Publisher]:
        """The publishers this service offers, with the failure knobs applied."""
        s = self.settings
        local = AsyncContentStore(self.content)
        found: dict[PublisherType, Publisher] = {
            PublisherType.NOOP: NoopPublisher(),
            PublisherType.LOCAL: LocalPublisher(
                local, fetcher, staging=s.staging_dir, content_url=s.base_url
            ),
        }
        if self._kubo is not None:
            found[PublisherType.IPFS] = IpfsPublisher(
                self._kubo,
                fetcher,
                staging=s.staging_dir,
                content=local,
                kubo_url=s.kubo_rpc_url or "",
            )
        else:
            # Without a kubo node, "IPFS" (what Bacalhau's clients always ask for) publishes into
            # this content store: it gives the same CIDs and answers kubo's RPC API itself.
            found[PublisherType.IPFS] = found[PublisherType.LOCAL]
        failing = {PublisherType(name) for name in s.fail_publishers}
        nodes = frozenset(s.fail_nodes)
        if failing or nodes:
            found = {
                kind: FailingPublisher(
                    p, always=kind in failing, nodes=nodes, message=s.fail_message
                )
                for kind, p in found.items()
            }
        return found

    async def start(self) -> None:
        # Off (and free) unless OTEL_* asks for it; one tracer provider per service.
        tracing.configure_tracing("publisher")
        s = self.settings
        if self._bus is None:
            self._bus = await NatsBus.connect(
                s.nats_url, name="shoal-publisher", stream_replicas=s.nats_stream_replicas
            )
        await self.store.migrate()
        fetcher = self._fetcher
        if fetcher is None:
            self._own_fetcher = HttpResultFetcher(
                max_bytes=s.max_result_bytes, timeout=s.fetch_timeout
            )
            fetcher = self._own_fetcher
        self._relay = self.store.relay(self.bus.publish_event, poll_interval=s.relay_poll_interval)
        self._relay.start()
        self.publishing = Publishing(
            self.store,
            self.publishers(fetcher),
            attempts=s.publish_attempts,
            retry_delay=s.retry_delay,
            unreachable_wait=s.unreachable_wait,
            concurrency=s.max_concurrent_publishes,
            on_commit=self._relay.notify,
        )
        self._running = True
        await self.bus.consume_events(
            producer=Producer.VERIFIER,
            durable=s.durable_name,
            handler=tracing.traced_handler(
                "publisher", self._guard(accepted_handler(self.publishing))
            ),
            event_types=[ResultAccepted.type],
        )
        # Failed runs' partial results (behaviour 11): same durable name, on compute's stream.
        await self.bus.consume_events(
            producer=Producer.COMPUTE,
            durable=s.durable_name,
            handler=tracing.traced_handler(
                "publisher", self._guard(failed_handler(self.publishing))
            ),
            event_types=[ExecutionFailed.type],
        )
        # Noop-verified results, straight from the node (ADR 0017): a durable of their own, so
        # the partial-results consumer above keeps its filter across upgrades.
        await self.bus.consume_events(
            producer=Producer.COMPUTE,
            durable=f"{s.durable_name}-proposals",
            handler=tracing.traced_handler(
                "publisher", self._guard(proposed_handler(self.publishing))
            ),
            event_types=[ResultProposed.FOR_PUBLISHER],
        )
        log.info("publisher_started", content=str(s.content_root), url=s.base_url)

    def _guard(self, handler: EventHandler) -> EventHandler:
        """A shared bus keeps delivering after stop(): leave those messages for the next run."""

        async def guarded(envelope: Envelope) -> None:
            if not self._running:
                raise Unavailable("the publisher is stopping")
            await handler(envelope)

        return guarded

    async def stop(self) -> None:
        self._running = False
        if self._relay:
            await self._relay.stop()
        if self._own_fetcher is not None:
            await self._own_fetcher.close()
        if self._kubo is not None:
            with contextlib.suppress(Exception):
                await self._kubo.close()
        if self._own_bus and self._bus is not None:
            await self._bus.close()
            self._bus = None
        await self.store.close()
