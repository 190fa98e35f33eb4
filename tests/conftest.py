"""Fixtures for cross-service tests: real NATS, SQLite, and a devstack per test or module."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shoal_cli.devstack import DevstackConfig
from tests.support import DevstackThread

StackFactory = Callable[..., DevstackThread]


@pytest.fixture
def make_devstack(tmp_path: Path) -> Iterator[StackFactory]:
    """Start devstacks with the given DevstackConfig fields; all are stopped after the test."""
    stacks: list[DevstackThread] = []

    def factory(**fields: Any) -> DevstackThread:
        fields.setdefault("noop", True)
        fields.setdefault("compute_nodes", 3)
        config = DevstackConfig(state_dir=tmp_path / f"stack{len(stacks)}", **fields)
        stack = DevstackThread(config).start()
        stacks.append(stack)
        return stack

    yield factory
    for stack in stacks:
        stack.stop()


@pytest.fixture(autouse=True, scope="session")
def _logs_to_stderr() -> None:
    """In-process services log to stderr, so CLI tests read only the CLI's own stdout."""
    from shoal_common.logging import configure_logging

    configure_logging(level="WARNING")
