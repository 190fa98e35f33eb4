"""uvicorn's HTTP protocol, with a response's head and body sent to the socket as one write.

uvicorn (httptools) writes the status line and headers as soon as the app sends
``http.response.start``, and the body with ``http.response.body``: two ``send`` system calls
for every small JSON response. Under the sustained load the requester spent ~8% of its CPU in
those writes (py-spy, ADR 0024). Here the connection's transport holds a response's first
write (its head) and sends it joined with the next one, so a small response is one system
call, sent when the body is, as before. Nothing else waits: a stream's chunks after the first
go straight out (server-sent events must not lag), and a head with no body yet (a stream that
has nothing to say, ``100 Continue``) goes out once the current loop step is over.

Everything else (closing, flow control, extra info) goes straight to uvicorn's transport; a
close sends what is held first, an abort drops it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingTransport:
    """A transport that holds a response's first write until its second (or the step's end)."""

    __slots__ = ("_held", "_hold_next", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._hold_next = True  # the next write starts a response

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._held is not None:
            held, self._held = self._held, None
            self._transport.write(held + data)
        elif self._hold_next:
            self._hold_next = False
            self._held = data
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def response_complete(self) -> None:
        """The response is written: send what is held, and hold the next one's head."""
        self.flush()
        self._hold_next = True

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
        if self._coalescing is not None:
            self._coalescing.response_complete()
        super().on_response_complete()
