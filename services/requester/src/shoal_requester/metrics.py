"""The requester's own metrics (``shoal_requester_<noun>_<unit>``; never an id as a label)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from weakref import WeakSet

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from shoal_requester.domain.inventory import Inventory


@functools.cache
def labelled(metric: Any, *values: str) -> Any:
    """``metric.labels(*values)``, looked up once: ``labels`` takes a lock and builds its key on
    every call, and the hot paths label every event, stage and finished job. Label values here
    come from small fixed sets (event types, states, stages, answers), never ids."""
    return metric.labels(*values)


JOBS_SUBMITTED = Counter("shoal_requester_jobs_submitted_total", "Jobs accepted at submit")
SUBMITS_REFUSED = Counter(
    "shoal_requester_submits_refused_total", "Submits refused, by reason", ["reason"]
)
JOBS_FINISHED = Counter(
    "shoal_requester_jobs_finished_total", "Jobs that reached a terminal state", ["state"]
)
BIDS = Counter("shoal_requester_bids_total", "Bid answers from compute nodes", ["answer"])
PLACEMENT_LATENCY = Histogram(
    "shoal_requester_placement_duration_seconds",
    "From the start of a placement round to bids accepted",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
JOB_DURATION = Histogram(
    "shoal_requester_job_duration_seconds",
    "From submit to a terminal state",
    buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
)
JOB_STAGE = Histogram(
    "shoal_requester_job_stage_seconds",
    "Time spent in one stage of a job (queued, bidding, running, verifying, publishing)",
    ["stage"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
QUEUED_JOBS = Gauge("shoal_requester_queued_jobs", "Jobs waiting for capacity")
PLACEMENTS_WAITING = Gauge(
    "shoal_requester_placements_waiting",
    "Placements waiting for a lane or for a congested event loop (a backlog of New jobs)",
)
LIVE_NODES = Gauge("shoal_requester_live_nodes", "Compute nodes sending heartbeats")
NODES_LOST = Counter("shoal_requester_nodes_lost_total", "Compute nodes declared lost")
NODE_OUTCOMES = Counter(
    "shoal_requester_node_outcomes_total",
    "Executions counted in node reputations: completed, failed, rejected (wrong result)",
    ["outcome"],
)
EVENTS_HANDLED = Counter(
    "shoal_requester_events_handled_total", "Lifecycle events handled, by type", ["type"]
)

_INVENTORIES: WeakSet[Inventory] = WeakSet()
NODE_STATES = ("live", "presumed", "stopping", "lost")


class _NodesByState(Collector):
    """``shoal_requester_nodes{state}``, counted when scraped: nothing on the heartbeat path."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "shoal_requester_nodes", "Compute nodes known, by state", labels=["state"]
        )
        counts = dict.fromkeys(NODE_STATES, 0)
        for inventory in list(_INVENTORIES):
            for state, n in inventory.count_by_state().items():
                counts[state] = counts.get(state, 0) + n
        for state, n in counts.items():
            family.add_metric([state], n)
        yield family

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Known names without a scrape, so a clash with another metric fails at registration.
        yield GaugeMetricFamily("shoal_requester_nodes", "", labels=["state"])


REGISTRY.register(_NodesByState())


def watch_nodes(inventory: Inventory) -> None:
    """Count this inventory's nodes in ``shoal_requester_nodes`` (until it is collected)."""
    _INVENTORIES.add(inventory)
