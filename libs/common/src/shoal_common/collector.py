"""Cyclic garbage collector settings for long-running service processes (ADR 0018).

CPython's defaults (a young collection every 700 net allocations, a full one every tenth
middle one) suit short scripts. In a service the heap holds what start-up built (modules,
pydantic schemas, SQLAlchemy metadata, the app) plus a working set that grows with load (jobs
in flight, a backlog of waiting jobs), and every full collection walks all of it: under the
submit benchmark at 200 req/s the requester spent ~40% of its CPU in the collector (py-spy
``--gil``), and its latency grew with the backlog it was traversing.

``tune_for_service`` is called once the service has started: it moves everything alive then
into the permanent generation (never scanned again; still freed by reference counting) and
makes young collections rarer. Almost all of a service's garbage is freed by reference
counting anyway; the collector only finds cycles (asyncio tasks and exceptions, mostly),
which now wait somewhat longer. ``SHOAL_COLLECTOR=default`` leaves CPython's settings alone
(to compare, or to rule the tuning out).
"""

from __future__ import annotations

import gc
import os

# Objects allocated (net) before a young collection; middle and full collections follow after
# this many of the previous kind.
YOUNG_THRESHOLD = 20_000
MIDDLE_EVERY = 20
FULL_EVERY = 100


def tune_for_service() -> None:
    """Freeze what start-up built and collect young objects less often (process-wide)."""
    if os.environ.get("SHOAL_COLLECTOR") == "default":
        return
    gc.collect()  # what start-up left as cyclic garbage is freed, not frozen
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_EVERY, FULL_EVERY)
