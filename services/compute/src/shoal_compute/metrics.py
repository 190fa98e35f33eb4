"""The compute node's own metrics (``shoal_compute_<noun>_<unit>``; never an id as a label).

A devstack runs several nodes in one process: counters and gauges here are process-wide sums
(gauges move by inc/dec, never set), so they stay right however many nodes share them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING
from weakref import WeakSet

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from shoal_compute.domain.capacity import CapacityLedger

BIDS = Counter("shoal_compute_bids_total", "Bid answers given", ["answer"])
EXECUTIONS = Counter(
    "shoal_compute_executions_total",
    "Executions that ended, by engine and outcome",
    ["engine", "outcome"],
)
EXECUTION_DURATION = Histogram(
    "shoal_compute_execution_duration_seconds",
    "From start (capacity allocated) to the recorded outcome",
    ["engine"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
INPUT_FETCH_DURATION = Histogram(
    "shoal_compute_input_fetch_duration_seconds",
    "Time to make all of an execution's inputs available",
    buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300),
)
RUNNING = Gauge("shoal_compute_executions_running", "Executions holding capacity and running")
QUEUED = Gauge("shoal_compute_executions_queued", "Accepted executions waiting for capacity")

_LEDGERS: WeakSet[CapacityLedger] = WeakSet()
RESOURCES = ("cpu", "memory", "disk", "gpu")


class _Capacity(Collector):
    """``shoal_compute_capacity_{total,used}{resource}`` read from the nodes' books when scraped
    (cores, bytes, bytes, devices; used = held by running executions). Nothing on the hot path.
    """

    def collect(self) -> Iterator[GaugeMetricFamily]:
        total = GaugeMetricFamily(
            "shoal_compute_capacity_total", "Resources the node offers", labels=["resource"]
        )
        used = GaugeMetricFamily(
            "shoal_compute_capacity_used",
            "Resources held by running executions",
            labels=["resource"],
        )
        ledgers = list(_LEDGERS)
        for resource in RESOURCES:
            total.add_metric([resource], sum(getattr(b.total, resource) for b in ledgers))
            used.add_metric([resource], sum(getattr(b.in_use, resource) for b in ledgers))
        yield total
        yield used

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("shoal_compute_capacity_total", "", labels=["resource"])
        yield GaugeMetricFamily("shoal_compute_capacity_used", "", labels=["resource"])


REGISTRY.register(_Capacity())


def watch_capacity(ledger: CapacityLedger) -> None:
    """Report this node's capacity in ``shoal_compute_capacity_*`` (until it is collected)."""
    _LEDGERS.add(ledger)
