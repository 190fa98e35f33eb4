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
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import nats
import orjson
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
from shoal_common.events import EVENT_TYPES, Envelope
from shoal_common.subjects import Producer, event_filter, stream_name, stream_subjects

log = structlog.get_logger(__name__)

EventHandler = Callable[[Envelope], Awaitable[None]]
RequestHandler = Callable[[bytes], Awaitable[bytes]]
MessageHandler = Callable[[str, bytes], Awaitable[None]]

# How long JetStream remembers message ids for de-duplication.
DEDUP_WINDOW_S = 120.0
# First retry of a failed handler, doubling up to MAX_RETRY_DELAY_S.
REDELIVERY_DELAY_S = 1.0
MAX_RETRY_DELAY_S = 10.0
# A message delivered and not acked within this is delivered again (after a consumer's crash).
# It bounds recovery after a consumer's crash (B20: 30 s before); a handler still running then
# just sees its message again and acks the latest delivery. Existing consumers keep theirs.
ACK_WAIT_S = 10.0
MAX_ACK_PENDING = 20_000
# Consumption (ADR 0013): one pull request stays open this long; while it waits idle the server
# sends a heartbeat this often (3 missed: the request is renewed); acks are cumulative (AckAll)
# and sent at most this often, or at once when this many handled messages wait for one.
PULL_EXPIRES_S = 30.0
PULL_HEARTBEAT_S = 2.5
ACK_FLUSH_S = 1.0
ACK_FLUSH_COUNT = 1000


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

    def __init__(
        self,
        nc: NatsClient,
        *,
        fetch_batch: int = 256,
        stream_replicas: int = 1,
        ack_wait: float = ACK_WAIT_S,
    ) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._fetch_batch = fetch_batch
        self._ack_wait = ack_wait
        # Copies of each stream on a clustered JetStream (3 on the compose `cluster` profile): a
        # server lost then loses no acknowledged event. Must not exceed the cluster's size.
        self._stream_replicas = stream_replicas
        self._streams_ready: set[str] = set()
        self._consumers: dict[tuple[str, str], EventConsumer] = {}
        self._closing = False

    @classmethod
    async def connect(cls, url: str, *, name: str = "shoal", stream_replicas: int = 1) -> NatsBus:
        """Connect to ``url`` (a comma-separated list reaches any server of a cluster)."""

        async def on_error(exc: Exception) -> None:
            log.warning("nats_error", error=str(exc))

        buses: list[NatsBus] = []

        async def on_reconnected() -> None:
            for bus in buses:
                await bus._on_reconnected()

        try:
            nc = await nats.connect(
                [u.strip() for u in url.split(",") if u.strip()],
                name=name,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                error_cb=on_error,
                reconnected_cb=on_reconnected,
                connect_timeout=5,
            )
        except Exception as exc:  # nats-py raises several unrelated types here
            raise Unavailable(f"cannot connect to NATS at {url}: {exc}") from exc
        bus = cls(nc, stream_replicas=stream_replicas)
        buses.append(bus)
        return bus

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
        stream = stream_name(producer)
        existing = self._consumers.get((stream, durable))
        if existing is not None:
            # The same service started again on this bus (stop/start): the new handler takes
            # over, including what the old one was still retrying (ADR 0013).
            existing.handler = handler
            return
        subjects = event_subjects(producer, event_types) if event_types else None
        config = ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.ALL,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self._ack_wait,
            max_ack_pending=MAX_ACK_PENDING,
            filter_subjects=subjects,
        )
        consumer = EventConsumer(
            self._nc,
            self._js,
            stream=stream,
            durable=durable,
            config=config,
            handler=handler,
            batch=self._fetch_batch,
        )
        await consumer.start()
        self._consumers[(stream, durable)] = consumer

    async def _on_reconnected(self) -> None:
        """Pull requests do not survive a lost connection: ask again at once."""
        for consumer in list(self._consumers.values()):
            consumer.reconnected()

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
        # Acks of what was handled go out first; what was not is redelivered to the next run.
        await asyncio.gather(*(c.stop() for c in self._consumers.values()), return_exceptions=True)
        self._consumers.clear()
        with contextlib.suppress(Exception):
            await self._nc.drain()


class EventConsumer:
    """One durable JetStream consumer: long-lived pull requests in, batched cumulative acks out.

    Instead of a fetch request per batch and an ack per message (about 11 NATS messages per
    noop job over five deliveries), it keeps one pull request for up to ``batch`` messages open
    for ``PULL_EXPIRES_S`` (renewed when used up, expired or after a reconnect) and acknowledges
    with ``AckAll`` at most every ``ACK_FLUSH_S``: one ack covers every message up to it. An ack
    is only sent for a stream sequence below every message still being handled (or retried), and
    only while every message the server counts as pending is one this consumer holds; after a
    gap in the delivery sequence (deliveries lost with a connection) or when binding to a
    consumer with pending messages (a previous process died holding them), acks wait until the
    server's pending count matches again (the lost ones come back after ``ack_wait``). A handler
    that raises is retried here (backoff up to ``MAX_RETRY_DELAY_S``) rather than nak'ed: the
    ack floor cannot pass it, so a crash meanwhile means redelivery. See ADR 0013.
    """

    def __init__(
        self,
        nc: NatsClient,
        js: Any,
        *,
        stream: str,
        durable: str,
        config: ConsumerConfig,
        handler: EventHandler,
        batch: int,
    ) -> None:
        self.handler = handler
        self._nc = nc
        self._js = js
        self._stream = stream
        self._durable = durable
        self._config = config
        self._batch = batch
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._inbox = ""
        self._sub: Any = None
        self._request_id = 0
        self._waiting = 0  # messages the current pull request may still deliver
        self._last_activity = 0.0
        self._active: dict[int, Msg] = {}  # stream seq -> being handled (or retried)
        self._done: dict[int, Msg] = {}  # stream seq -> handled, not acked yet
        self._done_since_flush = 0
        self._acked_seq = 0  # stream seq of the last ack sent
        self._last_dseq = 0  # consumer (delivery) sequence of the last delivery seen
        self._verified = True  # every message pending at the server is in _active/_done
        self._tasks: set[asyncio.Task[None]] = set()
        self._flush_handle: asyncio.TimerHandle | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._stopping = False

    # --- life cycle ---

    async def start(self) -> None:
        info = await self._bind()
        self._last_dseq = info.delivered.consumer_seq if info.delivered else 0
        self._acked_seq = info.ack_floor.stream_seq if info.ack_floor else 0
        # Messages delivered to a previous run and never acked: they come back after ack_wait;
        # no ack may pass them before they are handled.
        self._verified = not info.num_ack_pending
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_msg)
        self._last_activity = asyncio.get_running_loop().time()
        self._maybe_pull()
        self._arm_watchdog()

    async def _bind(self) -> Any:
        """The durable consumer, created (or converted from an explicit-ack one) if need be."""
        try:
            info = await self._js.consumer_info(self._stream, self._durable)
        except NotFoundError:
            return await self._js.add_consumer(self._stream, self._config)
        if info.config.ack_policy == AckPolicy.ALL and not info.config.deliver_subject:
            if _filters(info.config) == _filters(self._config):
                return info
            # Another build read other subjects (events gained routes, ADR 0027): the filter
            # is updated in place, keeping the consumer's position and its unacked messages.
            log.info("consumer_filter_updated", consumer=self._durable, stream=self._stream)
            return await self._js.add_consumer(self._stream, self._config)
        # An older explicit-ack consumer: an ack policy cannot be updated, so it is replaced by
        # one starting right after its ack floor (anything above it is delivered again; the
        # handlers are idempotent on the envelope id).
        start = (info.ack_floor.stream_seq if info.ack_floor else 0) + 1
        log.info("consumer_converted", consumer=self._durable, stream=self._stream, start=start)
        await self._js.delete_consumer(self._stream, self._durable)
        config = self._config
        if start > 1:
            config = dataclasses.replace(
                config, deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start
            )
        return await self._js.add_consumer(self._stream, config)

    async def stop(self) -> None:
        self._stopping = True
        for handle in (self._flush_handle, self._watchdog):
            if handle is not None:
                handle.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._flush_acks()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    def reconnected(self) -> None:
        self._maybe_pull(force=True)

    # --- pull requests ---

    def _maybe_pull(self, *, force: bool = False) -> None:
        """One pull request at a time, for as many messages as fit beside those in hand."""
        if self._stopping or (self._waiting > 0 and not force):
            return
        want = self._batch - len(self._active)
        if want < max(1, self._batch // 2):
            return  # asked again as handlers finish
        self._request_id += 1
        self._waiting = want
        self._spawn(self._send_pull(self._request_id, want))

    async def _send_pull(self, request_id: int, want: int) -> None:
        request = orjson.dumps(
            {
                "batch": want,
                "expires": int(PULL_EXPIRES_S * 1e9),
                "idle_heartbeat": int(PULL_HEARTBEAT_S * 1e9),
            }
        )
        try:
            await self._nc.publish(self._next_subject, request, reply=f"{self._inbox}.{request_id}")
        except Exception as exc:
            telemetry.NATS_ERRORS.labels(operation="fetch").inc()
            log.warning("nats_pull_failed", consumer=self._durable, error=repr(exc))
            if request_id == self._request_id:
                self._waiting = 0  # the watchdog asks again

    def _arm_watchdog(self) -> None:
        """A pull request lost with its connection or server ends in silence: ask again."""
        loop = asyncio.get_running_loop()
        silent = loop.time() - self._last_activity
        limit = PULL_HEARTBEAT_S * 3
        if silent >= limit and not self._stopping:
            log.info("nats_pull_renewed", consumer=self._durable, silent_s=round(silent, 1))
            self._last_activity = loop.time()
            self._maybe_pull(force=True)
            silent = 0.0
        self._watchdog = loop.call_later(limit - silent, self._arm_watchdog)

    # --- deliveries ---

    async def _on_msg(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status is not None and not msg.data:
            # Status messages come on the request's own reply subject (messages keep theirs).
            current = msg.subject.rsplit(".", 1)[-1] == str(self._request_id)
            if current:
                self._last_activity = asyncio.get_running_loop().time()
            if status == "100":  # idle heartbeat
                return
            if current:
                self._waiting = 0
                if status in ("404", "408"):  # the request expired
                    self._maybe_pull()
                else:  # e.g. 409 leadership change, consumer deleted: ask again shortly
                    log.info(
                        "nats_pull_ended",
                        consumer=self._durable,
                        status=status,
                        description=msg.headers.get("Description") if msg.headers else None,
                    )
                    asyncio.get_running_loop().call_later(0.5, self._maybe_pull)
            return
        self._last_activity = asyncio.get_running_loop().time()
        self._waiting -= 1  # (a late one of an older request makes the next request early)
        try:
            meta = msg.metadata
        except Exception:
            log.warning("nats_unexpected_message", consumer=self._durable, subject=msg.subject)
            return
        dseq, sseq = meta.sequence.consumer, meta.sequence.stream
        if dseq != self._last_dseq + 1:
            # Deliveries went missing (a connection lost with them in flight): the server holds
            # them as pending until ack_wait, so no ack may pass them until they are back.
            self._verified = False
        self._last_dseq = max(self._last_dseq, dseq)
        if meta.num_delivered > 1:
            telemetry.NATS_REDELIVERIES.labels(consumer=self._durable).inc()
        if sseq in self._active:
            self._active[sseq] = msg  # redelivered while still handled here: ack the latest
        elif sseq in self._done or sseq <= self._acked_seq:
            self._done[sseq] = msg  # handled already: its ack was late or lost
            self._schedule_flush()
        else:
            self._active[sseq] = msg
            self._spawn(self._handle(sseq, msg))
        self._maybe_pull()

    async def _handle(self, sseq: int, msg: Msg) -> None:
        delay = REDELIVERY_DELAY_S
        while True:
            try:
                await self.handler(_decode(msg.data))
            except Poison as exc:
                telemetry.NATS_ERRORS.labels(operation="drop").inc()
                log.error("event_dropped", consumer=self._durable, error=str(exc))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                telemetry.NATS_ERRORS.labels(operation="handle").inc()
                log.warning("event_handler_failed", consumer=self._durable, error=repr(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY_S)
                # Handled again (in place of the server's redelivery after a nak).
                telemetry.NATS_REDELIVERIES.labels(consumer=self._durable).inc()
                continue
            break
        latest = self._active.pop(sseq, msg)
        self._done[sseq] = latest
        self._schedule_flush()
        self._maybe_pull()

    # --- acks ---

    def _schedule_flush(self) -> None:
        if self._stopping:
            return
        self._done_since_flush += 1
        if self._done_since_flush >= ACK_FLUSH_COUNT and self._verified:
            if self._flush_handle is not None:
                self._flush_handle.cancel()
                self._flush_handle = None
            self._spawn(self._flush_acks())
        elif self._flush_handle is None:
            loop = asyncio.get_running_loop()
            self._flush_handle = loop.call_later(
                ACK_FLUSH_S, lambda: self._spawn(self._flush_acks())
            )

    async def _flush_acks(self) -> None:
        self._flush_handle = None
        self._done_since_flush = 0
        if not self._done:
            return
        if not self._verified and not await self._reverify():
            self._schedule_flush()
            return
        below = min(self._active) if self._active else None
        ackable = [s for s in self._done if below is None or s < below]
        if not ackable:
            return
        top = max(ackable)
        msg = self._done[top]
        for s in ackable:
            del self._done[s]
        self._acked_seq = max(self._acked_seq, top)
        try:
            await self._nc.publish(msg.reply, b"+ACK")
        except Exception as exc:  # not acked: delivered again after ack_wait, recognised here
            telemetry.NATS_ERRORS.labels(operation="ack").inc()
            log.warning("nats_ack_failed", consumer=self._durable, error=repr(exc))
        if self._done:
            self._schedule_flush()

    async def _reverify(self) -> bool:
        """True once every message the server counts as pending is one held here."""
        try:
            info = await self._js.consumer_info(self._stream, self._durable)
        except Exception as exc:
            log.warning("nats_consumer_info_failed", consumer=self._durable, error=repr(exc))
            return False
        delivered = info.delivered.consumer_seq if info.delivered else 0
        pending = info.num_ack_pending or 0
        if delivered == self._last_dseq and pending == len(self._active) + len(self._done):
            self._verified = True
        return self._verified

    def _spawn(self, work: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _spawning(cb: Callable[[Msg], Awaitable[None]]) -> Callable[[Msg], Awaitable[None]]:
    """nats-py runs a subscription's callbacks one at a time; answer requests concurrently."""
    tasks: set[asyncio.Task[None]] = set()

    async def spawn(msg: Msg) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(cb(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    return spawn


def _json_str(text: str) -> bytes:
    return orjson.dumps(text)


# --- in-memory fake ------------------------------------------------------------------------------


@dataclass
class _Consumer:
    handler: EventHandler
    subjects: list[str] | None  # None: every event of the producer
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
        subject = envelope.subject
        for (p, _), consumer in self._consumers.items():
            if p == producer and _reads(consumer.subjects, subject):
                consumer.queue.put_nowait(envelope)

    async def consume_events(
        self,
        *,
        producer: Producer,
        durable: str,
        handler: EventHandler,
        event_types: Sequence[str] | None = None,
    ) -> None:
        subjects = event_subjects(producer, event_types) if event_types else None
        consumer = _Consumer(handler, subjects)
        self._consumers[(producer, durable)] = consumer
        for env in self._log[producer]:  # a new durable consumer starts from the beginning
            if _reads(subjects, env.subject):
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


def event_subjects(producer: Producer, selectors: Sequence[str]) -> list[str]:
    """A consumer's filter subjects: event types, or ``<type>.<route>`` (subjects.event_filter)."""
    subjects: list[str] = []
    for selector in selectors:
        kind = EVENT_TYPES.get(selector.partition(".")[0])
        routed = kind is not None and kind.routed
        subjects.extend(
            s for s in event_filter(producer, selector, routed=routed) if s not in subjects
        )
    return subjects


def _filters(config: ConsumerConfig) -> frozenset[str]:
    """A consumer's filter subjects, however they were given (one, several or none)."""
    found = set(config.filter_subjects or ())
    if config.filter_subject:
        found.add(config.filter_subject)
    return frozenset(found)


def _reads(subjects: list[str] | None, subject: str) -> bool:
    return subjects is None or any(subject_matches(p, subject) for p in subjects)


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: ``*`` is one token, ``>`` the rest."""
    p_tokens, s_tokens = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p_tokens):
        if tok == ">":
            return len(s_tokens) > i
        if i >= len(s_tokens) or (tok != "*" and tok != s_tokens[i]):
            return False
    return len(p_tokens) == len(s_tokens)
