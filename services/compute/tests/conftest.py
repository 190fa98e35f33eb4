"""Fixtures of the compute node's tests: in-memory nodes, plus real NATS and databases."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shoal_common.bus import MemoryBus
from shoal_common.testing import database_url, nats_server, postgres_url
from shoal_compute.service import ComputeService
from shoal_compute.settings import ComputeSettings
from shoal_compute.store.memory import MemoryExecutionStore
from shoal_compute.testing import MakeNode, NodeHarness

__all__ = ["database_url", "nats_server", "postgres_url"]


@pytest.fixture
async def make_node(tmp_path: Path) -> AsyncIterator[MakeNode]:
    """Start compute nodes on one MemoryBus with a memory store (``sql=True``: SQLite)."""
    bus = MemoryBus()
    started: list[ComputeService] = []

    async def make(
        node_id: str = "node-0",
        *,
        sql: bool = False,
        hook: Any = None,
        executors: Any = None,
        **settings: Any,
    ) -> NodeHarness:
        values: dict[str, Any] = {
            "node_id": node_id,
            "state_dir": tmp_path / node_id,
            "cpu": 4.0,
            "memory": 8 * 1024**3,
            "disk": 100 * 1024**3,
            "gpus": 0,
            "serve_http": False,
            "engines": ["Noop"],  # real engines have their own tests
            **settings,
        }
        service = ComputeService(
            ComputeSettings(**values),
            bus=bus,
            store=None if sql else MemoryExecutionStore(),
            executors=executors,
            noop_hook=hook,
        )
        await service.start()
        started.append(service)
        return NodeHarness(service, bus)

    yield make
    for service in reversed(started):
        await service.stop()
    await bus.close()
