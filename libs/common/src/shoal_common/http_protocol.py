"""uvicorn's HTTP protocol, with a response's writes sent to the socket as one.

uvicorn (httptools) writes the status line and headers as soon as the app sends
``http.response.start``, and the body with ``http.response.body``: two ``send`` system calls
for every small JSON response, and one per chunk of a stream. Under the sustained load the
requester spent ~8% of its CPU in those writes (py-spy, ADR 0024). Here the connection's
transport holds what is written and sends it as one write when the response is complete
(uvicorn's ``on_response_complete``, in the same step as its last write before), or, for a
stream's chunks, once the event loop's current step is over: a small response is one system
call and waits no longer than before.

Everything else (closing, flow control, extra info) goes straight to uvicorn's transport; a
close sends what is held first.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingTransport:
    """A transport whose writes within one loop step reach the socket as one write."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._held is None:
            self._held = [data]
            self._loop.call_soon(self.flush)
        else:
            self._held.append(data)

    def flush(self) -> None:
        held, self._held = self._held, None
        if held and not self._transport.is_closing():
            self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """``uvicorn.Config(http=...)``: HttpToolsProtocol over a :class:`CoalescingTransport`."""

    _coalescing: CoalescingTransport | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._coalescing = CoalescingTransport(transport, self.loop)
        super().connection_made(self._coalescing)  # type: ignore[arg-type]

    def on_response_complete(self) -> None:
        # The whole response is written: send it now, not a loop step later.
        if self._coalescing is not None:
            self._coalescing.flush()
        super().on_response_complete()
