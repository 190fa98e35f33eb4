"""Event consumption on a real nats-server (JetStream, fsync always): ADR 0013.

One long-lived pull request per consumer and cumulative (AckAll) acks sent at most every
``ACK_FLUSH_S``: fewer messages per event, nothing polled while idle, and still at least once:
an event whose handler had not finished when its consumer died is delivered again, even when
later events were handled (an AckAll must never cover it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shoal_common import bus as bus_module
from shoal_common.bus import NatsBus, Poison
from shoal_common.events import Envelope, ExecutionCancelled, ResultProposed
from shoal_common.natsserver import NatsServer, start_nats_server
from shoal_common.spec import PublisherSpec, PublisherType, RunOutput, VerifierType
from shoal_common.subjects import Producer, stream_name
from shoal_common.subjects import event as event_subject
from shoal_common.testing import publish_until_accepted, wait_for

pytestmark = pytest.mark.integration

STREAM = stream_name(Producer.COMPUTE)


async def until(condition: Callable[[], bool], *, timeout: float = 10.0) -> None:
    async def probe() -> bool:
        return condition()

    await wait_for(probe, timeout=timeout)


@contextlib.asynccontextmanager
async def producer_and_consumer(url: str) -> AsyncIterator[tuple[NatsBus, NatsBus]]:
    """Two clients of the server: one publishes events, the other consumes them."""
    producer = await NatsBus.connect(url, name="producer")
    consumer = await NatsBus.connect(url, name="consumer")
    try:
        yield producer, consumer
    finally:
        await consumer.close()  # acks what was handled on the way out
        await producer.close()


async def acked_through(url: str, durable: str, seq: int, *, timeout: float = 5.0) -> None:
    """Wait until the consumer's ack floor reaches ``seq`` with nothing left pending."""

    async def acked() -> bool:
        state = await consumer_state(url, durable)
        return bool(state.num_ack_pending == 0 and state.ack_floor.stream_seq >= seq)

    await wait_for(acked, timeout=timeout, interval=0.1)


def event(n: int) -> Envelope:
    return Envelope.wrap(ExecutionCancelled(job_id=f"job-{n}", execution_id=f"e{n}", node_id="n"))


class Tap:
    """Counts what clients publish into the server by kind (a '>' subscriber)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.subjects: list[str] = []
        self.nc: Any = None

    async def start(self, url: str) -> Tap:
        self.nc = await nats.connect(url, name="tap")

        async def on(msg: Any) -> None:
            s = msg.subject
            self.subjects.append(s)
            if s.startswith("$JS.ACK."):
                self.counts["ack"] += 1
            elif s.startswith("$JS.API.CONSUMER.MSG.NEXT."):
                self.counts["pull"] += 1
            elif s.startswith("$JS.API."):
                self.counts["api"] += 1
            elif s.startswith("shoal.evt.") and not (msg.reply or "").startswith("$JS.ACK."):
                self.counts["event"] += 1

        await self.nc.subscribe(">", cb=on)
        await self.nc.flush()
        return self

    async def settle(self) -> None:
        await self.nc.flush()
        await asyncio.sleep(0.1)


@pytest.fixture
async def tap(nats_server: NatsServer) -> AsyncIterator[Tap]:
    t = await Tap().start(nats_server.url)
    yield t
    await t.nc.close()


async def consumer_state(url: str, durable: str) -> Any:
    nc = await nats.connect(url)
    try:
        return await nc.jetstream().consumer_info(STREAM, durable)
    finally:
        await nc.close()


async def test_each_event_once_acks_batched_and_idle_is_silent(
    nats_server: NatsServer, tap: Tap
) -> None:
    async with producer_and_consumer(nats_server.url) as (producer, consumer):
        seen: list[str] = []

        async def handler(env: Envelope) -> None:
            seen.append(env.id)

        await consumer.consume_events(producer=Producer.COMPUTE, durable="c1", handler=handler)
        sent = [event(n) for n in range(200)]
        for env in sent:
            await producer.publish_event(env)
        await until(lambda: len(seen) >= 200, timeout=10)
        await acked_through(nats_server.url, "c1", 200)
        await tap.settle()
        assert sorted(seen) == sorted(e.id for e in sent)
        state = await consumer_state(nats_server.url, "c1")
        assert state.config.ack_policy == AckPolicy.ALL
        assert state.num_ack_pending == 0
        assert state.ack_floor.stream_seq == state.delivered.stream_seq
        # 200 events: one pull request (batch 256) and a handful of cumulative acks, not 200.
        assert tap.counts["event"] == 200
        assert tap.counts["pull"] <= 2
        assert tap.counts["ack"] <= 10, tap.counts
        # Idle: the open pull request waits; nothing is polled.
        await tap.settle()  # (the consumer_info request above)
        before = tap.counts.copy()
        await asyncio.sleep(3)
        await tap.settle()
        assert tap.counts - before == Counter(), (tap.counts - before, tap.subjects[-5:])


async def test_acks_go_at_once_after_many_handled(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bus_module, "ACK_FLUSH_S", 60.0)  # only the count triggers an ack
    monkeypatch.setattr(bus_module, "ACK_FLUSH_COUNT", 10)
    async with producer_and_consumer(nats_server.url) as (producer, consumer):
        seen: list[str] = []

        async def handler(env: Envelope) -> None:
            seen.append(env.id)

        await consumer.consume_events(producer=Producer.COMPUTE, durable="c7", handler=handler)
        for n in range(95):
            await producer.publish_event(event(n))
        await until(lambda: len(seen) == 95)

        async def mostly_acked() -> bool:
            state = await consumer_state(nats_server.url, "c7")
            return bool(state.ack_floor.stream_seq >= 90)

        await wait_for(mostly_acked, timeout=5)
        state = await consumer_state(nats_server.url, "c7")
        assert state.num_ack_pending == 95 - state.ack_floor.stream_seq
    state = await consumer_state(nats_server.url, "c7")
    assert state.num_ack_pending == 0


async def test_failed_handler_is_retried_and_holds_the_ack_floor(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bus_module, "REDELIVERY_DELAY_S", 1.5)
    async with producer_and_consumer(nats_server.url) as (producer, consumer):
        attempts: Counter[str] = Counter()
        handled: set[str] = set()
        first, poison = event(0), event(5)

        async def handler(env: Envelope) -> None:
            attempts[env.id] += 1
            if env.id == first.id and attempts[env.id] < 3:
                raise RuntimeError("database busy")
            if env.id == poison.id:
                raise Poison("cannot be read")
            handled.add(env.id)

        await consumer.consume_events(producer=Producer.COMPUTE, durable="c2", handler=handler)
        others = [event(n) for n in range(1, 20) if n != 5]
        for env in [first, *others[:4], poison, *others[4:]]:
            await producer.publish_event(env)
        await until(lambda: all(e.id in handled for e in others), timeout=10)
        await asyncio.sleep(bus_module.ACK_FLUSH_S + 0.2)
        # The later events are handled, but no ack may cover the one still being retried.
        assert first.id not in handled
        state = await consumer_state(nats_server.url, "c2")
        assert state.ack_floor.stream_seq == 0
        assert state.num_ack_pending == 20
        await until(lambda: first.id in handled, timeout=10)
        await acked_through(nats_server.url, "c2", 20)
        state = await consumer_state(nats_server.url, "c2")
        assert state.num_ack_pending == 0
        assert state.ack_floor.stream_seq == 20
        assert attempts[first.id] == 3
        assert attempts[poison.id] == 1
        assert all(attempts[e.id] == 1 for e in others)


async def test_event_redelivered_after_consumer_died_before_storing_it(
    nats_server: NatsServer,
) -> None:
    """The first consumer handles event 2 but dies while still storing event 1 (its handler
    never returns). The next run must get event 1 again although event 2, after it in the
    stream, was handled and acked: an AckAll floor must never pass an unhandled event."""
    producer = await NatsBus.connect(nats_server.url, name="producer")
    first_run = await NatsBus.connect(nats_server.url, name="first-run")
    first_run._ack_wait = 4.0  # redelivery after 4 s instead of 30
    e1, e2, e3 = event(1), event(2), event(3)
    stored: list[str] = []
    started = asyncio.Event()

    async def dies_while_storing(env: Envelope) -> None:
        if env.id == e1.id:
            started.set()
            await asyncio.Event().wait()  # the process dies before the write commits
        stored.append(env.id)

    await first_run.consume_events(
        producer=Producer.COMPUTE, durable="c3", handler=dies_while_storing
    )
    await producer.publish_event(e1)
    await producer.publish_event(e2)
    await until(lambda: e2.id in stored and started.is_set(), timeout=10)
    await asyncio.sleep(bus_module.ACK_FLUSH_S + 0.3)  # would have acked e2 (and e1) if unsafe
    state = await consumer_state(nats_server.url, "c3")
    assert state.ack_floor.stream_seq == 0
    assert state.num_ack_pending == 2
    # Crash: the connection goes without a goodbye, nothing more is acked.
    await first_run.client.close()
    await first_run.close()  # (only ends this test's leftover tasks)

    second_run = await NatsBus.connect(nats_server.url, name="second-run")
    redelivered: list[str] = []

    async def stores(env: Envelope) -> None:
        redelivered.append(env.id)

    try:
        await second_run.consume_events(producer=Producer.COMPUTE, durable="c3", handler=stores)
        # A new event arrives (and is handled) before the lost ones come back after ack_wait:
        # acking it must not cover e1.
        await producer.publish_event(e3)
        await until(lambda: e3.id in redelivered, timeout=5)
        await asyncio.sleep(bus_module.ACK_FLUSH_S + 0.3)
        state = await consumer_state(nats_server.url, "c3")
        assert state.ack_floor.stream_seq < 1
        await until(lambda: e1.id in redelivered, timeout=15)
        await acked_through(nats_server.url, "c3", 3)
        state = await consumer_state(nats_server.url, "c3")
        assert state.num_ack_pending == 0
        assert state.ack_floor.stream_seq == 3
        assert redelivered.count(e1.id) == 1
        assert redelivered.count(e3.id) == 1
    finally:
        await second_run.close()
        await producer.close()


async def test_restarted_service_on_the_same_bus_takes_over(nats_server: NatsServer) -> None:
    """stop()/start() of a service on a shared bus: the new handler gets what the old refused."""
    async with producer_and_consumer(nats_server.url) as (producer, consumer):
        got: list[str] = []
        refused: list[str] = []

        async def stopped(env: Envelope) -> None:
            refused.append(env.id)
            raise RuntimeError("service is stopping")

        async def running(env: Envelope) -> None:
            got.append(env.id)

        await consumer.consume_events(producer=Producer.COMPUTE, durable="c4", handler=stopped)
        env = event(1)
        await producer.publish_event(env)
        await until(lambda: env.id in refused, timeout=5)
        await consumer.consume_events(producer=Producer.COMPUTE, durable="c4", handler=running)
        await until(lambda: env.id in got, timeout=5)


async def test_explicit_ack_consumer_is_converted_after_its_ack_floor(
    nats_server: NatsServer,
) -> None:
    producer = await NatsBus.connect(nats_server.url, name="producer")
    sent = [event(n) for n in range(6)]
    for env in sent:
        await producer.publish_event(env)
    # The consumer as an earlier release created it: explicit acks, 3 events acked.
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.add_consumer(
        STREAM,
        ConsumerConfig(
            durable_name="c5", ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL
        ),
    )
    sub = await js.pull_subscribe_bind(durable="c5", stream=STREAM)
    for msg in await sub.fetch(3, timeout=5):
        await msg.ack_sync()
    await nc.close()

    consumer = await NatsBus.connect(nats_server.url, name="consumer")
    got: list[str] = []

    async def handler(env: Envelope) -> None:
        got.append(env.id)

    try:
        await consumer.consume_events(producer=Producer.COMPUTE, durable="c5", handler=handler)
        await until(lambda: len(got) >= 3, timeout=5)
        await asyncio.sleep(0.5)
        assert got == [e.id for e in sent[3:]]
        state = await consumer_state(nats_server.url, "c5")
        assert state.config.ack_policy == AckPolicy.ALL
    finally:
        await consumer.close()
        await producer.close()


def proposal(n: int, verifier: VerifierType, publisher: PublisherType) -> Envelope:
    return Envelope.wrap(
        ResultProposed(
            job_id=f"job-{n}",
            execution_id=f"e{n}",
            node_id="n",
            result_cid="bafy",
            run_output=RunOutput(),
            verifier=verifier,
            publisher=PublisherSpec(Type=publisher),
        )
    )


async def collect(bus: NatsBus, durable: str, selectors: list[str] | None) -> list[str]:
    """Start a consumer of ``selectors``; the list fills with the job ids it handles."""
    got: list[str] = []

    async def handler(env: Envelope) -> None:
        got.append(env.data["job_id"])

    await bus.consume_events(
        producer=Producer.COMPUTE, durable=durable, handler=handler, event_types=selectors
    )
    return got


async def test_routed_proposals_reach_only_the_consumers_of_their_route(
    nats_server: NatsServer,
) -> None:
    """ADR 0027: the verifier and the publisher are never sent proposals they do not act on;
    a proposal on the bare subject (a node of an older build) still reaches every one."""
    async with producer_and_consumer(nats_server.url) as (producer, consumer):
        everything = await collect(consumer, "requester", [ResultProposed.type])
        verifier = await collect(consumer, "verifier", [ResultProposed.FOR_VERIFIER])
        publisher = await collect(consumer, "publisher", [ResultProposed.FOR_PUBLISHER])
        noop, det = VerifierType.NOOP, VerifierType.DETERMINISTIC
        for n, (v, p) in enumerate(
            [(noop, PublisherType.NOOP), (noop, PublisherType.LOCAL), (det, PublisherType.NOOP)]
        ):
            await producer.publish_event(proposal(n, v, p))
        bare = proposal(3, noop, PublisherType.NOOP)
        nc = await nats.connect(nats_server.url)
        try:
            bare_subject = event_subject(Producer.COMPUTE, ResultProposed.type)
            await nc.jetstream().publish(bare_subject, bare.to_bytes())
        finally:
            await nc.close()
        # job-3, on the bare subject, was sent last and every consumer reads it: a consumer
        # that has it has everything it will be sent (each gets the stream in order).
        await until(
            lambda: all(seen[-1:] == ["job-3"] for seen in (everything, verifier, publisher))
        )
        assert everything == ["job-0", "job-1", "job-2", "job-3"]
        assert verifier == ["job-2", "job-3"]
        assert publisher == ["job-1", "job-3"]


async def test_a_consumer_of_an_older_build_reads_the_routes_after_an_upgrade(
    nats_server: NatsServer,
) -> None:
    """Its durable, made with the bare subject as filter, is updated in place: it keeps its
    position (nothing handled is delivered again) and is sent the routed events."""
    bare_subject = event_subject(Producer.COMPUTE, ResultProposed.type)
    async with producer_and_consumer(nats_server.url) as (producer, consumer):
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            await producer.ensure_stream(Producer.COMPUTE)
            await js.publish(
                bare_subject, proposal(0, VerifierType.NOOP, PublisherType.NOOP).to_bytes()
            )
            await js.add_consumer(
                STREAM,
                ConsumerConfig(
                    durable_name="c6",
                    ack_policy=AckPolicy.ALL,
                    deliver_policy=DeliverPolicy.ALL,
                    filter_subject=bare_subject,
                ),
            )
            sub = await js.pull_subscribe_bind(durable="c6", stream=STREAM)
            (handled,) = await sub.fetch(1, timeout=5)
            await handled.ack_sync()
        finally:
            await nc.close()

        got = await collect(consumer, "c6", [ResultProposed.type])
        await producer.publish_event(proposal(1, VerifierType.NOOP, PublisherType.NOOP))
        # job-1 was sent last: job-0 again (a moved position) would have come before it.
        await until(lambda: got[-1:] == ["job-1"])
        assert got == ["job-1"]
        state = await consumer_state(nats_server.url, "c6")
        assert set(state.config.filter_subjects or [state.config.filter_subject]) == {
            bare_subject,
            f"{bare_subject}.>",
        }


async def test_consumption_resumes_after_a_nats_restart(tmp_path: Path) -> None:
    server = start_nats_server(tmp_path / "nats")
    port = server.port
    try:
        async with producer_and_consumer(server.url) as (producer, consumer):
            got: list[str] = []

            async def handler(env: Envelope) -> None:
                got.append(env.id)

            await consumer.consume_events(producer=Producer.COMPUTE, durable="c6", handler=handler)
            await producer.publish_event(event(1))
            await until(lambda: len(got) == 1, timeout=5)
            await acked_through(server.url, "c6", 1)
            server.kill()
            server = start_nats_server(tmp_path / "nats", port=port)
            env = event(2)
            await publish_until_accepted(producer, env, timeout=15, interval=0.3)
            # The pull request died with the server; the reconnect renews it at once.
            await until(lambda: env.id in got, timeout=5)
            assert got.count(got[0]) == 1
    finally:
        server.stop()
