"""The publisher's own metrics (``shoal_publisher_*``; never an id as a label)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

PUBLISHED = Counter("shoal_publisher_results_published_total", "Results published", ["publisher"])
FAILED = Counter(
    "shoal_publisher_publish_failures_total", "Results that could not be published", ["publisher"]
)
PUBLISH_SECONDS = Histogram(
    "shoal_publisher_publish_duration_seconds",
    "Time to publish one result (fetch, store, verify)",
    ["publisher"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
RESULT_BYTES = Counter(
    "shoal_publisher_result_bytes_total",
    "Bytes of results fetched from compute nodes to be published",
)
CONTENT_BYTES = Counter(
    "shoal_publisher_content_bytes_total", "Bytes through the content API", ["direction"]
)
