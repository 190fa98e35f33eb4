"""Ids: unique across calls, threads and forked processes, and ordered by creation time."""

from __future__ import annotations

import os
import threading
import time
import uuid

from shoal_common.events import new_id


def test_ids_are_uuid7_shaped_and_sort_by_creation_time() -> None:
    first = new_id()
    time.sleep(0.002)
    second = new_id()
    assert uuid.UUID(first).version == 7
    assert first < second


def test_ids_never_repeat_within_or_across_threads() -> None:
    seen: list[str] = []
    lock = threading.Lock()

    def make() -> None:
        ids = [new_id() for _ in range(3000)]  # several batches of randomness each
        with lock:
            seen.extend(ids)

    threads = [threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == len(seen) == 12_000


def test_a_forked_child_does_not_reuse_the_parents_randomness() -> None:
    new_id()  # the parent holds a part-used batch
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report its next ids and leave at once
        os.close(read)
        os.write(write, ",".join(new_id() for _ in range(5)).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 10_000).decode().split(",")
    os.close(read)
    os.waitpid(pid, 0)
    parent = [new_id() for _ in range(5)]
    # Same millisecond or not, the random parts differ.
    assert {c[-17:] for c in child}.isdisjoint({p[-17:] for p in parent})
