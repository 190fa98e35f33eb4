"""The collector settings a service process runs with (ADR 0018)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from shoal_common import collector


def test_tuning_freezes_what_is_alive_frees_cyclic_garbage_and_raises_thresholds() -> None:
    # In a child: freezing is process-wide and cannot be undone for what it froze.
    script = textwrap.dedent(
        """
        import gc, json, weakref
        from shoal_common import collector

        class Node:
            pass

        kept = Node()
        garbage = Node()
        garbage.self = garbage  # a cycle only the collector can free
        dead = weakref.ref(garbage)
        del garbage
        before = gc.get_freeze_count()
        collector.tune_for_service()
        print(json.dumps({
            "threshold": gc.get_threshold(),
            "frozen_before": before,
            "frozen_after": gc.get_freeze_count(),
            "garbage_freed": dead() is None,
            "kept_tracked": gc.is_tracked(kept),
        }))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    seen = json.loads(done.stdout)
    assert seen["threshold"] == [
        collector.YOUNG_THRESHOLD,
        collector.MIDDLE_EVERY,
        collector.FULL_EVERY,
    ]
    assert seen["frozen_before"] == 0
    assert seen["frozen_after"] > 1000  # modules, classes, the objects start-up built
    assert seen["garbage_freed"]
    assert seen["kept_tracked"]


def test_shoal_collector_default_leaves_cpython_settings_alone() -> None:
    script = (
        "import gc, json; from shoal_common import collector; t = gc.get_threshold(); "
        "collector.tune_for_service(); "
        "print(json.dumps([gc.get_threshold() == t, gc.get_freeze_count()]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={**os.environ, "SHOAL_COLLECTOR": "default"},
    )
    assert json.loads(done.stdout) == [True, 0]
