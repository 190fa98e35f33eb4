"""QuietServer: uvicorn with a 1 s idle tick that still stops at once (ADR 0013)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import httpx
import uvicorn
from fastapi import FastAPI

from shoal_common.natsserver import free_port
from shoal_common.quiet_server import QuietServer
from shoal_common.testing import wait_for


def started_probe(server: QuietServer) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        return bool(server.started)

    return probe


async def test_serves_and_stops_at_once() -> None:
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, str]:
        return {"ok": "yes"}

    port = free_port()
    server = QuietServer(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    await wait_for(started_probe(server), timeout=10)
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/ping")
    assert response.json() == {"ok": "yes"}
    assert response.headers["date"]
    await asyncio.sleep(1.2)  # a few idle ticks
    started = time.monotonic()
    server.should_exit = True
    await asyncio.wait_for(task, 5)
    assert time.monotonic() - started < 0.5  # not a whole tick
