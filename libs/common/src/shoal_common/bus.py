"""The message bus: durable lifecycle events on JetStream, node-addressed calls on core NATS.

Services talk to :class:`Bus`, never to nats-py directly. :class:`NatsBus` is the real thing;
:class:`MemoryBus` is an in-process fake with the same semantics for unit tests (at-least-once
delivery, de-duplication by envelope id, request/reply with "no responders").

Event handler contract: return normally -> ack; raise :class:`Poison` -> the message is dropped
(term) and logged; raise anything else -> redelivered after a delay (nak), so a handler must be
idempotent on ``envelope.id``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import nats
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from shoal_common import telemetry, tracing
from shoal_common.errors import Unavailable
from shoal_common.events import Envelope
from shoal_common.subjects import Producer, stream_name, stream_subjects

log = structlog.get_logger(__name__)

EventHandler = Callable[[Envelope], Awaitable[None]]
RequestHandler = Callable[[bytes], Awaitable[bytes]]
MessageHandler = Callable[[str, bytes], Awaitable[None]]

# How long JetStream remembers message ids for de-duplication.
DEDUP_WINDOW_S = 120.0
REDELIVERY_DELAY_S = 1.0


class Poison(Exception):
    """A message that can never be handled (undecodable, unknown type): drop it, don't retry."""


class Bus(Protocol):
    """What services need from the broker."""

    async def publish_event(self, envelope: Envelope) -> None:
        """Durably publish; returns once the broker has stored it."""
        ...

    async def consume_events(
        self,
        *,
        producer: Producer,
        durable: str,
        handler: EventHandler,
        event_types: Sequence[str] | None = None,
    ) -> None:
        """Start delivering the producer's events (optionally only some types) to ``handler``."""
        ...

    async def request(self, subject: str, data: bytes, *, timeout: float) -> bytes:
        """Call one responder; raises :class:`Unavailable` on no responder or timeout."""
        ...

    async def serve(
        self, subject: str, handler: RequestHandler, *, queue: str | None = None
    ) -> None:
        """Answer requests on ``subject`` until the bus closes."""
        ...

    async def publish(self, subject: str, data: bytes) -> None:
        """Fire-and-forget core message (heartbeats, live log chunks)."""
        ...

    async def subscribe(
        self, subject: str, handler: MessageHandler
    ) -> Callable[[], Awaitable[None]]:
        """Receive core messages; returns an unsubscribe function."""
        ...

    async def close(self) -> None: ...


def _decode(raw: bytes) -> Envelope:
    try:
        return Envelope.from_bytes(raw)
    except (ValueError, ValidationError) as exc:
        raise Poison(f"undecodable envelope: {exc}") from exc


class NatsBus:
    """:class:`Bus` over a real NATS server with JetStream."""

    def __init__(self, nc: NatsClient, *, fetch_batch: int = 256, stream_replicas: int = 1) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._fetch_batch = fetch_batch
        # Copies of each stream on a clustered JetStream (3 on the compose `cluster` profile): a
        # server lost then loses no acknowledged event. Must not exceed the cluster's size.
        self._stream_replicas = stream_replicas
        self._tasks: set[asyncio.Task[None]] = set()
        self._streams_ready: set[str] = set()
        self._pull_subs: list[Any] = []
        self._closing = False

    @classmethod
    async def connect(cls, url: str, *, name: str = "shoal", stream_replicas: int = 1) -> NatsBus:
        """Connect to ``url`` (a comma-separated list reaches any server of a cluster)."""

        async def on_error(exc: Exception) -> None:
            log.warning("nats_error", error=str(exc))

        try:
            nc = await nats.connect(
                [u.strip() for u in url.split(",") if u.strip()],
                name=name,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                error_cb=on_error,
                connect_timeout=5,
            )
        except Exception as exc:  # nats-py raises several unrelated types here
            raise Unavailable(f"cannot connect to NATS at {url}: {exc}") from exc
        return cls(nc, stream_replicas=stream_replicas)

    @property
    def client(self) -> NatsClient:
        return self._nc

    async def ensure_stream(self, producer: Producer) -> None:
        name = stream_name(producer)
        if name in self._streams_ready:
            return
        config = StreamConfig(
            name=name,
            subjects=stream_subjects(producer),
            storage=StorageType.FILE,
            duplicate_window=DEDUP_WINDOW_S,
            max_age=7 * 24 * 3600.0,
            num_replicas=self._stream_replicas,
        )
        try:
            await self._js.stream_info(name)
            await self._js.update_stream(config)
        except NotFoundError:
            await self._js.add_stream(config)
        self._streams_ready.add(name)

    async def publish_event(self, envelope: Envelope) -> None:
        await self.ensure_stream(Producer(envelope.producer))
        headers = {"Nats-Msg-Id": envelope.id}
        headers.update(envelope.trace)
        try:
            await self._js.publish(envelope.subject, envelope.to_bytes(), headers=headers)
        except Exception as exc:
            telemetry.NATS_ERRORS.labels(operation="publish").inc()
            raise Unavailable(f"publishing {envelope.type} failed: {exc}") from exc

    async def consume_events(
        self,
        *,
        producer: Producer,
        durable: str,
        handler: EventHandler,
        event_types: Sequence[str] | None = None,
    ) -> None:
        await self.ensure_stream(producer)
        subjects = [f"shoal.evt.{producer.value}.{t}" for t in event_types] if event_types else None
        config = ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=30.0,
            max_ack_pending=20_000,
            filter_subjects=subjects,
        )
        sub = await self._pull_subscribe(producer, durable, config)
        self._pull_subs.append(sub)
        task = asyncio.create_task(self._pump(sub, handler, durable))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pull_subscribe(
        self, producer: Producer, durable: str, config: ConsumerConfig
    ) -> Any:
        stream = stream_name(producer)
        try:
            await self._js.consumer_info(stream, durable)
        except NotFoundError:
            await self._js.add_consumer(stream, config)
        return await self._js.pull_subscribe_bind(durable=durable, stream=stream)

    async def _pump(self, sub: Any, handler: EventHandler, durable: str) -> None:
        while not self._closing:
            try:
                msgs: list[Msg] = await sub.fetch(self._fetch_batch, timeout=1.0)
            except (NatsTimeoutError, TimeoutError):
                # An empty long-poll: nothing arrived within the fetch window.
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closing:
                    return
                telemetry.NATS_ERRORS.labels(operation="fetch").inc()
                log.warning("nats_fetch_failed", consumer=durable, error=repr(exc))
                await asyncio.sleep(0.5)
                continue
            # Handle a batch concurrently; each handler is idempotent and does its own CAS.
            await asyncio.gather(*(self._handle(m, handler, durable) for m in msgs))

    async def _handle(self, msg: Msg, handler: EventHandler, durable: str) -> None:
        try:
            if msg.metadata.num_delivered > 1:
                telemetry.NATS_REDELIVERIES.labels(consumer=durable).inc()
            await handler(_decode(msg.data))
        except Poison as exc:
            telemetry.NATS_ERRORS.labels(operation="drop").inc()
            log.error("event_dropped", consumer=durable, error=str(exc))
            await msg.term()
        except Exception as exc:
            telemetry.NATS_ERRORS.labels(operation="handle").inc()
            log.warning("event_handler_failed", consumer=durable, error=repr(exc))
            with contextlib.suppress(Exception):
                await msg.nak(delay=REDELIVERY_DELAY_S)
        else:
            with contextlib.suppress(Exception):
                await msg.ack()

    async def request(self, subject: str, data: bytes, *, timeout: float) -> bytes:
        try:
            reply = await self._nc.request(
                subject, data, timeout=timeout, headers=tracing.inject({}) or None
            )
        except NoRespondersError as exc:
            raise Unavailable(f"nobody answers on {subject}") from exc
        except NatsTimeoutError as exc:
            raise Unavailable(f"no answer on {subject} within {timeout}s") from exc
        return bytes(reply.data)

    async def serve(
        self, subject: str, handler: RequestHandler, *, queue: str | None = None
    ) -> None:
        async def on_msg(msg: Msg) -> None:
            try:
                with tracing.continued_from(msg.headers):
                    answer = await handler(msg.data)
            except Exception as exc:
                log.exception("request_handler_failed", subject=msg.subject)
                answer = b'{"error": %s}' % _json_str(repr(exc))
            if msg.reply:
                with contextlib.suppress(Exception):
                    await msg.respond(answer)

        await self._nc.subscribe(subject, queue=queue or "", cb=_spawning(on_msg))

    async def publish(self, subject: str, data: bytes) -> None:
        try:
            await self._nc.publish(subject, data)
        except Exception as exc:
            telemetry.NATS_ERRORS.labels(operation="publish").inc()
            raise Unavailable(f"publish on {subject} failed: {exc}") from exc

    async def subscribe(
        self, subject: str, handler: MessageHandler
    ) -> Callable[[], Awaitable[None]]:
        async def on_msg(msg: Msg) -> None:
            try:
                await handler(msg.subject, msg.data)
            except Exception:
                log.exception("message_handler_failed", subject=msg.subject)

        sub = await self._nc.subscribe(subject, cb=on_msg)
        return sub.unsubscribe

    async def close(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # A pull subscription whose fetch was cancelled never drains: nc.drain() would wait
        # out its 30 s timeout. Nothing more will be fetched, so drop them first.
        for sub in self._pull_subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await self._nc.drain()


def _spawning(cb: Callable[[Msg], Awaitable[None]]) -> Callable[[Msg], Awaitable[None]]:
    """nats-py runs a subscription's callbacks one at a time; answer requests concurrently."""
    tasks: set[asyncio.Task[None]] = set()

    async def spawn(msg: Msg) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(cb(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    return spawn


def _json_str(text: str) -> bytes:
    import orjson

    return orjson.dumps(text)


# --- in-memory fake ------------------------------------------------------------------------------


@dataclass
class _Consumer:
    handler: EventHandler
    event_types: set[str] | None
    queue: asyncio.Queue[Envelope] = field(default_factory=asyncio.Queue)


class MemoryBus:
    """In-process :class:`Bus` for unit tests: same delivery rules, no sockets."""

    def __init__(self) -> None:
        self._log: dict[Producer, list[Envelope]] = {p: [] for p in Producer}
        self._seen_ids: set[str] = set()
        self._consumers: dict[tuple[Producer, str], _Consumer] = {}
        self._responders: dict[str, RequestHandler] = {}
        self._subscribers: list[tuple[str, MessageHandler]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.published: list[Envelope] = []

    async def publish_event(self, envelope: Envelope) -> None:
        if envelope.id in self._seen_ids:
            return
        self._seen_ids.add(envelope.id)
        producer = Producer(envelope.producer)
        self._log[producer].append(envelope)
        self.published.append(envelope)
        for (p, _), consumer in self._consumers.items():
            if p == producer and (
                consumer.event_types is None or envelope.type in consumer.event_types
            ):
                consumer.queue.put_nowait(envelope)

    async def consume_events(
        self,
        *,
        producer: Producer,
        durable: str,
        handler: EventHandler,
        event_types: Sequence[str] | None = None,
    ) -> None:
        types = set(event_types) if event_types else None
        consumer = _Consumer(handler, types)
        self._consumers[(producer, durable)] = consumer
        for env in self._log[producer]:  # a new durable consumer starts from the beginning
            if types is None or env.type in types:
                consumer.queue.put_nowait(env)
        task = asyncio.create_task(self._pump(consumer))
        self._tasks.add(task)

    async def _pump(self, consumer: _Consumer) -> None:
        while True:
            env = await consumer.queue.get()
            try:
                await consumer.handler(env)
            except Poison:
                continue
            except Exception:
                await asyncio.sleep(0.01)
                consumer.queue.put_nowait(env)

    async def request(self, subject: str, data: bytes, *, timeout: float) -> bytes:
        handler = self._responders.get(subject)
        if handler is None:
            raise Unavailable(f"nobody answers on {subject}")
        try:
            return await asyncio.wait_for(handler(data), timeout)
        except TimeoutError as exc:
            raise Unavailable(f"no answer on {subject} within {timeout}s") from exc

    async def serve(
        self, subject: str, handler: RequestHandler, *, queue: str | None = None
    ) -> None:
        self._responders[subject] = handler

    async def publish(self, subject: str, data: bytes) -> None:
        for pattern, handler in list(self._subscribers):
            if subject_matches(pattern, subject):
                await handler(subject, data)

    async def subscribe(
        self, subject: str, handler: MessageHandler
    ) -> Callable[[], Awaitable[None]]:
        entry = (subject, handler)
        self._subscribers.append(entry)

        async def unsubscribe() -> None:
            if entry in self._subscribers:
                self._subscribers.remove(entry)

        return unsubscribe

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: ``*`` is one token, ``>`` the rest."""
    p_tokens, s_tokens = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p_tokens):
        if tok == ">":
            return len(s_tokens) > i
        if i >= len(s_tokens) or (tok != "*" and tok != s_tokens[i]):
            return False
    return len(p_tokens) == len(s_tokens)
