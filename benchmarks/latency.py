"""Noop job latency at concurrency 1 on 3 compute nodes (issue 6, target 1).

    uv run python benchmarks/latency.py --jobs 500

One client submits a pre-signed noop job, waits for its terminal state (event stream), and
submits the next. Latency = submit sent -> Completed observed, the whole path: HTTP, signature
check, durable insert, placement (bid request/reply), execution, result proposal, verification,
publishing, each state change committed to SQLite (fsync) and each event through JetStream
(fsync always). Records p50/p99 (results/latency.jsonl).

Target: p50 <= 20 ms, p99 <= 100 ms (floors on this machine: a full noop job is about 3-7 ms).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import stress

if __name__ == "__main__":
    stress.main("latency", __doc__ or "", jobs=500, concurrency=1, warmup=50)
