"""The compute node's own metrics (``shoal_compute_<noun>_<unit>``; never an id as a label).

A devstack runs several nodes in one process: counters and gauges here are process-wide sums
(gauges move by inc/dec, never set), so they stay right however many nodes share them.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

BIDS = Counter("shoal_compute_bids_total", "Bid answers given", ["answer"])
EXECUTIONS = Counter(
    "shoal_compute_executions_total", "Executions that ended, by outcome", ["outcome"]
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
