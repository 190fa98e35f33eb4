"""The verifier's own metrics (``shoal_verifier_*``; never an id as a label)."""

from __future__ import annotations

from prometheus_client import Counter

RESULTS_ACCEPTED = Counter(
    "shoal_verifier_results_accepted_total", "Proposed results accepted", ["verifier"]
)
RESULTS_REJECTED = Counter(
    "shoal_verifier_results_rejected_total", "Proposed results rejected", ["verifier"]
)
ESCALATIONS = Counter(
    "shoal_verifier_escalations_total", "Jobs escalated to more executions after disagreement"
)
FAILURES = Counter(
    "shoal_verifier_failures_total", "Jobs whose verification failed after escalation"
)
