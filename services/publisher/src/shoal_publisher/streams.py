"""Bridges between async byte streams (HTTP bodies) and blocking code in worker threads.

Tar extraction, multipart parsing and disk writes are blocking; running them on a worker
thread that reads from a bounded queue the event loop fills keeps memory flat (a few chunks
in flight, whatever the size of the stream) and the loop free.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import queue
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from typing import IO, TypeVar

T = TypeVar("T")

_QUEUE_CHUNKS = 16
_END = object()


class _Abandoned(Exception):
    """The reading side stopped early; the feeder stops too."""


class StreamBridge(io.RawIOBase):
    """A blocking, read-only file object over chunks that an async task feeds."""

    def __init__(self, max_chunks: int = _QUEUE_CHUNKS) -> None:
        super().__init__()
        self._queue: queue.Queue[object] = queue.Queue(max_chunks)
        self._buf = memoryview(b"")
        self._eof = False
        self._abandoned = False
        self._cancelled = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buf:
            if self._eof:
                return 0
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                # The feeding task may have died with its request: don't wait forever.
                if self._cancelled:
                    self._eof = True
                    raise ConnectionError("the stream was cancelled") from None
                continue
            if item is _END:
                self._eof = True
                return 0
            if isinstance(item, BaseException):
                self._eof = True
                raise item
            assert isinstance(item, bytes | bytearray | memoryview)
            self._buf = memoryview(item).cast("B")
        view = memoryview(buffer).cast("B")
        n = min(len(view), len(self._buf))
        view[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def cancel(self) -> None:
        """Called when the feeding side is gone without finishing the stream."""
        self._cancelled = True

    def abandon(self) -> None:
        """Called by the reader when it is done: unblocks and stops the feeder."""
        self._abandoned = True
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()

    async def _put(self, item: object) -> None:
        while True:
            if self._abandoned:
                raise _Abandoned
            try:
                self._queue.put_nowait(item)
                return
            except queue.Full:
                pass
            # Back-pressure: wait in a thread for the reader to make room.
            with contextlib.suppress(queue.Full):
                await asyncio.to_thread(self._queue.put, item, True, 0.2)
                return

    async def feed(self, chunks: AsyncIterable[bytes]) -> None:
        """Push every chunk, then end-of-stream (or the error the stream raised)."""
        try:
            async for chunk in chunks:
                if chunk:
                    await self._put(chunk)
        except _Abandoned:
            return
        except Exception as exc:
            with contextlib.suppress(_Abandoned):
                await self._put(exc)
            return
        with contextlib.suppress(_Abandoned):
            await self._put(_END)


async def consume_in_thread(chunks: AsyncIterable[bytes], work: Callable[[IO[bytes]], T]) -> T:
    """Run ``work(reader)`` on a worker thread while ``chunks`` stream into ``reader``."""
    bridge = StreamBridge()
    reader = io.BufferedReader(bridge, buffer_size=1 << 20)

    def run() -> T:
        try:
            return work(reader)
        finally:
            bridge.abandon()

    feeder = asyncio.create_task(bridge.feed(chunks))
    try:
        return await asyncio.to_thread(run)
    finally:
        if not feeder.done():
            feeder.cancel()
            bridge.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeder


async def iterate_in_thread(produce: Callable[[], Iterator[bytes]]) -> AsyncIterator[bytes]:
    """Pull from a blocking generator on a worker thread, a chunk per hop."""
    iterator = produce()
    sentinel = object()
    try:
        while True:
            chunk = await asyncio.to_thread(next, iterator, sentinel)
            if chunk is sentinel:
                return
            assert isinstance(chunk, bytes)
            yield chunk
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            await asyncio.to_thread(close)
