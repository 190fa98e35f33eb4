"""Metrics shared by every service (prometheus-client) and tracing set-up.

Metric names follow ``shoal_<service>_<noun>_<unit>``; never an id as a label. Service-specific
metrics live in each service; these are the ones the shared libraries record.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

# operation: publish, fetch (consuming), handle (a handler failed: redelivered), drop (poison)
NATS_ERRORS = Counter("shoal_bus_errors_total", "NATS publish/consume failures", ["operation"])
NATS_REDELIVERIES = Counter(
    "shoal_bus_redeliveries_total", "JetStream messages delivered more than once", ["consumer"]
)
OUTBOX_LAG = Histogram(
    "shoal_outbox_lag_seconds",
    "Time from an event's commit to its publication on the bus",
    ["service"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
HTTP_REQUESTS = Counter(
    "shoal_http_requests_total", "HTTP requests served", ["service", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "shoal_http_request_duration_seconds",
    "HTTP request latency",
    ["service", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
