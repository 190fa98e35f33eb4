"""CoalescingHttpToolsProtocol: a response reaches the socket in one write (ADR 0024)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from uvicorn.server import ServerState

from shoal_common import http_protocol
from shoal_common.http_protocol import CoalescingHttpToolsProtocol, CoalescingTransport
from shoal_common.natsserver import free_port
from shoal_common.quiet_server import QuietServer
from shoal_common.testing import wait_for


class _Recording:
    """The part of a transport CoalescingTransport uses, recording each write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str) -> object:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8000)}.get(name)


def _coalescing() -> tuple[CoalescingTransport, _Recording]:
    inner = _Recording()
    return CoalescingTransport(inner, asyncio.get_running_loop()), inner  # type: ignore[arg-type]


async def test_a_response_head_goes_out_with_its_body_in_one_write() -> None:
    transport, inner = _coalescing()
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    transport.write(b"")
    assert inner.writes == []  # the head waits for the body
    transport.write(b'{"ok": true}')
    assert inner.writes == [b'HTTP/1.1 200 OK\r\n\r\n{"ok": true}']  # at once, joined
    transport.write(b"data: 1\n\n")  # a stream's later chunks are not held
    assert inner.writes[1:] == [b"data: 1\n\n"]
    await asyncio.sleep(0)  # the scheduled flush finds nothing
    assert len(inner.writes) == 2
    transport.response_complete()  # the next response's head is held again
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert len(inner.writes) == 2


async def test_a_head_with_no_body_yet_goes_out_when_the_loop_step_ends() -> None:
    transport, inner = _coalescing()
    transport.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    assert inner.writes == []
    await asyncio.sleep(0)
    assert inner.writes == [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"]


async def test_close_sends_what_is_held_and_abort_drops_it() -> None:
    transport, inner = _coalescing()
    transport.write(b"last words")
    transport.close()
    assert inner.writes == [b"last words"]
    assert inner.closed
    await asyncio.sleep(0)  # the scheduled flush finds nothing more to send
    assert inner.writes == [b"last words"]

    transport, inner = _coalescing()
    transport.write(b"never sent")
    transport.abort()
    await asyncio.sleep(0)
    assert inner.writes == []
    assert inner.aborted


async def test_the_rest_of_the_transport_is_passed_through() -> None:
    transport, _inner = _coalescing()
    assert transport.get_extra_info("peername") == ("127.0.0.1", 40000)
    assert not transport.is_closing()


async def test_a_complete_response_is_sent_at_once_not_a_loop_step_later() -> None:
    config = uvicorn.Config(FastAPI(), lifespan="off", http=CoalescingHttpToolsProtocol)
    config.load()
    protocol = CoalescingHttpToolsProtocol(
        config=config, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop()
    )
    inner = _Recording()
    protocol.connection_made(inner)  # type: ignore[arg-type]
    protocol.transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert inner.writes == []  # held while the response may go on
    protocol.on_response_complete()  # uvicorn: the last body message went out
    assert inner.writes == [b"HTTP/1.1 204 No Content\r\n\r\n"]
    if protocol.timeout_keep_alive_task is not None:
        protocol.timeout_keep_alive_task.cancel()


@pytest.fixture
async def server(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[str, list[int]]]:
    """A uvicorn server on the coalescing protocol; yields its URL and the size of every write
    its connections made to their sockets."""
    writes: list[int] = []
    real_init = CoalescingTransport.__init__

    class Counting:
        """uvicorn's socket transport, with the size of every write recorded."""

        def __init__(self, transport: asyncio.Transport) -> None:
            self._transport = transport

        def write(self, data: bytes) -> None:
            writes.append(len(data))
            self._transport.write(data)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._transport, name)

    def counted_init(
        self: CoalescingTransport, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop
    ) -> None:
        real_init(self, Counting(transport), loop)  # type: ignore[arg-type]

    monkeypatch.setattr(http_protocol.CoalescingTransport, "__init__", counted_init)
    app = FastAPI()

    @app.get("/small")
    async def small() -> dict[str, Any]:
        return {"ok": True}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"data: {i}\n\n".encode()
                await asyncio.sleep(0.01)  # each chunk in a loop step of its own

        return StreamingResponse(chunks(), media_type="text/event-stream")

    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="off",
        http=CoalescingHttpToolsProtocol,
    )
    srv = QuietServer(config)
    task = asyncio.create_task(srv.serve())

    async def started() -> bool:
        return bool(srv.started)

    await wait_for(started, timeout=10)
    try:
        yield f"http://127.0.0.1:{port}", writes
    finally:
        srv.should_exit = True
        await asyncio.wait_for(task, 5)


async def test_a_small_response_is_one_write_and_keep_alive_still_works(
    server: tuple[str, list[int]],
) -> None:
    url, writes = server
    async with httpx.AsyncClient() as client:  # one connection, several requests on it
        for _ in range(3):
            response = await client.get(f"{url}/small")
            assert response.status_code == 200
            assert response.json() == {"ok": True}
    assert len(writes) == 3  # status line, headers and body together, once per response


async def test_a_stream_still_goes_out_chunk_by_chunk(server: tuple[str, list[int]]) -> None:
    url, writes = server
    seen = []
    async with httpx.AsyncClient() as client, client.stream("GET", f"{url}/stream") as response:
        async for line in response.aiter_lines():
            if line:
                seen.append(line)
    assert seen == ["data: 0", "data: 1", "data: 2"]
    # Head and first chunk together, then each chunk as it comes, then the end of the stream.
    assert len(writes) == 4
