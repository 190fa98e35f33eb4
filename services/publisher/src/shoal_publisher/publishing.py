"""Handles ``ResultAccepted``: publish the result, record the outcome, emit the event.

Also ``ExecutionFailed`` carrying a partial result (what a run wrote before it timed out or
broke): it is published the same way, and the events say ``partial`` so the requester only
records where it is (the execution stays failed). Behaviour 11.

The slow part (fetching and storing) runs outside any transaction; the outcome, the
processed-event mark and the ``ResultPublished``/``PublishFailed`` event commit together.
A redelivery after a crash publishes again, which is harmless: content addressing makes
every publisher idempotent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from shoal_common.events import (
    ExecutionFailed,
    PublishFailed,
    ResultAccepted,
    ResultProposed,
    ResultPublished,
)
from shoal_common.spec import PublisherSpec, PublisherType, RunOutput, StorageSpec
from shoal_publisher import metrics
from shoal_publisher.domain.models import (
    NodeUnreachableError,
    Publication,
    PublicationStatus,
    PublishError,
    PublishRequest,
    TransientPublishError,
)
from shoal_publisher.domain.publishers import Publisher
from shoal_publisher.store.base import PublisherStore

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class _Result:
    """A result to publish: an accepted one, or the partial one of a failed run."""

    job_id: str
    execution_id: str
    node_id: str
    result_cid: str
    result_url: str | None
    publisher: PublisherSpec
    partial: bool = False
    run_output: RunOutput | None = None
    unverified: bool = False  # straight from a noop-verified proposal (ADR 0017)

    @classmethod
    def of(
        cls,
        evt: ResultAccepted | ExecutionFailed | ResultProposed,
        *,
        partial: bool,
        unverified: bool = False,
    ) -> _Result:
        return cls(
            evt.job_id,
            evt.execution_id,
            evt.node_id,
            evt.result_cid or "",
            evt.result_url,
            evt.publisher,
            partial,
            evt.run_output,
            unverified,
        )


class Publishing:
    """Turns accepted results into publications."""

    def __init__(
        self,
        store: PublisherStore,
        publishers: dict[PublisherType, Publisher],
        *,
        attempts: int = 3,
        retry_delay: float = 0.5,
        max_retry_delay: float = 5.0,
        unreachable_wait: float = 60.0,
        concurrency: int = 8,
        on_commit: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._publishers = publishers
        self._attempts = attempts
        self._retry_delay = retry_delay
        self._max_retry_delay = max_retry_delay
        self._unreachable_wait = unreachable_wait
        self._slots = asyncio.Semaphore(concurrency)
        self._on_commit = on_commit
        self._clock = clock
        self._busy: dict[str, tuple[asyncio.Lock, int]] = {}

    async def on_accepted(self, event_id: str, evt: ResultAccepted) -> None:
        """Publish one accepted result (idempotent on ``event_id`` and on the execution)."""
        await self._handle(event_id, _Result.of(evt, partial=False))

    async def on_proposed(self, event_id: str, evt: ResultProposed) -> None:
        """Publish a noop-verified result straight from its proposal (ADR 0017): there is no
        decision to wait for, and the requester counts it only for a noop-verified job."""
        await self._handle(event_id, _Result.of(evt, partial=False, unverified=True))

    async def on_failed(self, event_id: str, evt: ExecutionFailed) -> None:
        """Publish what a failed run wrote, if the node addressed it (else nothing to do)."""
        if not evt.result_cid:
            return
        await self._handle(event_id, _Result.of(evt, partial=True))

    async def _handle(self, event_id: str, evt: _Result) -> None:
        # No is_processed() read first: an applied event always left a publication, which
        # _publish looks up anyway, so a redelivery is caught there (one read per event saved).
        # One publish per execution at a time (a redelivery racing the first delivery waits,
        # then finds the publication); the lock is dropped when nobody holds or awaits it.
        key = evt.execution_id
        lock, users = self._busy.get(key, (asyncio.Lock(), 0))
        self._busy[key] = (lock, users + 1)
        try:
            async with lock:
                await self._publish(event_id, evt)
        finally:
            lock, users = self._busy[key]
            if users <= 1:
                del self._busy[key]
            else:
                self._busy[key] = (lock, users - 1)

    async def _publish(self, event_id: str, evt: _Result) -> None:
        if await self._store.find_publication(evt.execution_id) is not None:
            # Published (or failed) already, under this envelope (a redelivery) or another:
            # just remember this one.
            async with self._store.transaction() as tx:
                await tx.mark_processed(event_id)
            return
        kind = evt.publisher.type or PublisherType.LOCAL
        request = PublishRequest(
            job_id=evt.job_id,
            execution_id=evt.execution_id,
            node_id=evt.node_id,
            result_cid=evt.result_cid,
            result_url=evt.result_url,
            params=dict(evt.publisher.params or {}),
            run_output=evt.run_output,
        )
        started = time.perf_counter()
        attempts, spec, error = await self._attempt(kind, request)
        metrics.PUBLISH_SECONDS.labels(kind.value).observe(time.perf_counter() - started)
        now = self._clock()
        publication = Publication(
            execution_id=evt.execution_id,
            job_id=evt.job_id,
            node_id=evt.node_id,
            result_cid=evt.result_cid,
            publisher=kind.value,
            status=PublicationStatus.PUBLISHED if spec else PublicationStatus.FAILED,
            result=spec.model_dump(mode="json", by_alias=True, exclude_none=True) if spec else None,
            error=error,
            attempts=attempts,
            created=now,
            updated=now,
        )
        async with self._store.transaction() as tx:
            if not await tx.mark_processed(event_id):
                return
            if await tx.find_publication(evt.execution_id) is not None:
                return
            await tx.save_publication(publication)
            if spec is not None:
                await tx.add_events(
                    ResultPublished(
                        job_id=evt.job_id,
                        execution_id=evt.execution_id,
                        node_id=evt.node_id,
                        result=spec,
                        partial=evt.partial,
                        unverified=evt.unverified,
                    )
                )
            else:
                await tx.add_events(
                    PublishFailed(
                        job_id=evt.job_id,
                        execution_id=evt.execution_id,
                        node_id=evt.node_id,
                        error=error,
                        partial=evt.partial,
                        unverified=evt.unverified,
                    )
                )
        self._on_commit()
        if spec is not None:
            metrics.PUBLISHED.labels(kind.value).inc()
            log.info(
                "result_published", publisher=kind.value, cid=evt.result_cid, partial=evt.partial
            )
        else:
            metrics.FAILED.labels(kind.value).inc()
            log.warning("result_publish_failed", publisher=kind.value, error=error)

    async def _attempt(
        self, kind: PublisherType, request: PublishRequest
    ) -> tuple[int, StorageSpec | None, str]:
        publisher = self._publishers.get(kind)
        if publisher is None:
            available = ", ".join(sorted(p.value for p in self._publishers))
            return 0, None, f"the {kind.value} publisher is not available here ({available} are)"
        attempt = failed = 0
        unreachable_since: float | None = None
        while True:
            attempt += 1
            try:
                # A slot per attempt, not per result: waiting for a node that is down must not
                # hold up results of the nodes that are up.
                async with self._slots:
                    return attempt, await publisher.publish(request), ""
            except NodeUnreachableError as exc:
                # The node is down, perhaps restarting (its results survive that): wait for it
                # a while, however many attempts that takes, before failing the result (B17).
                now = time.monotonic()
                unreachable_since = unreachable_since or now
                if now - unreachable_since >= self._unreachable_wait:
                    return (
                        attempt,
                        None,
                        f"{exc.detail} (node {request.node_id} unreachable for "
                        f"{now - unreachable_since:.0f} s, gave up after {attempt} attempts)",
                    )
                log.info("publish_waits_for_node", node=request.node_id, attempt=attempt)
            except TransientPublishError as exc:
                failed += 1
                if failed >= self._attempts:
                    return attempt, None, f"{exc.detail} (gave up after {attempt} attempts)"
                log.info("publish_retry", publisher=kind.value, error=exc.detail, attempt=attempt)
            except PublishError as exc:
                return attempt, None, exc.detail
            except Exception as exc:
                # A bug, not a verdict on the result: say so, and don't redeliver forever.
                log.exception("publisher_crashed", publisher=kind.value)
                return attempt, None, f"the {kind.value} publisher crashed: {exc!r}"
            await asyncio.sleep(min(self._max_retry_delay, self._retry_delay * 2 ** (attempt - 1)))
