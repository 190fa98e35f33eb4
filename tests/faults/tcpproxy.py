"""A TCP proxy the test controls: put it between a service and NATS, Postgres or another
service's HTTP endpoint, then cut the link (every connection reset, new ones refused), bring
it back, cut responses after so many bytes (an upload cut off halfway), or delay what flows
to the service (a slow link: what is in flight when the link is cut is lost)."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

from shoal_common.natsserver import free_port

_CHUNK = 64 * 1024


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            writer.transport.abort()


@dataclass
class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target_host``:``target_port`` from a private thread."""

    target_port: int
    target_host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    delay_to_client: float = 0.0  # seconds each chunk from the target waits before it is sent on
    connections: int = 0  # accepted while up (counts reconnects)
    _cut: bool = False
    _truncate_after: int | None = None
    _truncate_times: int = 0
    truncated: int = 0  # responses cut off so far
    _links: set[_Link] = field(default_factory=set)
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _thread: threading.Thread | None = None
    _server: asyncio.Server | None = None

    @property
    def url_host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._call(self._listen())
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._thread = None
        self._loop.close()

    def cut(self) -> None:
        """Reset every open connection and refuse new ones until :meth:`restore`."""
        self._call(self._set_cut(True))

    def restore(self) -> None:
        self._call(self._set_cut(False))

    def truncate_responses(self, after_bytes: int, times: int) -> None:
        """The next ``times`` connections get their response (upstream to client) reset after
        ``after_bytes`` bytes, as a network failure halfway through a download would. Open
        (keep-alive) connections are reset first, so the next request opens a new one."""
        self._truncate_after, self._truncate_times = after_bytes, times
        self._call(self._set_cut(True))
        self._call(self._set_cut(False))

    # --- inside the proxy's loop ---

    def _call(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _close(self) -> None:
        await self._set_cut(True)
        if self._server is not None:
            self._server.close()

    async def _set_cut(self, cut: bool) -> None:
        self._cut = cut
        if cut:
            for link in list(self._links):
                link.abort()
            self._links.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            writer.transport.abort()
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.transport.abort()
            writer.close()
            return
        self.connections += 1
        limit: int | None = None
        if self._truncate_times > 0 and self._truncate_after is not None:
            self._truncate_times -= 1
            limit = self._truncate_after
        link = _Link(writer, up_writer)
        self._links.add(link)
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, None, link),
                self._pipe(up_reader, writer, limit, link, delay=self.delay_to_client),
            )
        finally:
            self._links.discard(link)
            for w in (writer, up_writer):
                w.close()

    async def _pipe(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        limit: int | None,
        link: _Link,
        *,
        delay: float = 0.0,
    ) -> None:
        sent = 0
        try:
            while data := await source.read(_CHUNK):
                if delay:
                    await asyncio.sleep(delay)
                    if link not in self._links:
                        return  # cut meanwhile: what was on the slow link is lost
                if limit is not None and sent + len(data) >= limit:
                    sink.write(data[: max(0, limit - sent)])
                    await sink.drain()
                    self.truncated += 1
                    link.abort()
                    return
                sent += len(data)
                sink.write(data)
                await sink.drain()
            if sink.can_write_eof():
                sink.write_eof()  # pass the half-close on, keep the other direction going
        except (ConnectionError, OSError, RuntimeError):
            link.abort()
