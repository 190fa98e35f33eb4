"""Root conftest: the shared test plugin is registered here, before any package's conftest
imports from it (so pytest can rewrite its asserts)."""

from __future__ import annotations

import os

import pytest

from shoal_common.natsserver import PORT_RANGE_ENV, worker_port_range

pytest_plugins = ["shoal_common.testing"]


def pytest_configure(config: pytest.Config) -> None:
    # Each xdist worker (and the devstacks it starts) picks ports from a slice of its own: the
    # workers are separate processes, so one cannot see the ports another picked but has not
    # bound yet (CI: two workers' services both tried 127.0.0.1:30802).
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and PORT_RANGE_ENV not in os.environ:
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        low, high = worker_port_range(int(worker[2:]), workers)
        os.environ[PORT_RANGE_ENV] = f"{low}-{high}"
