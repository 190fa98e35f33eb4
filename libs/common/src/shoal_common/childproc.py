"""Child processes that do not outlive their parent (the devstack's nats-server and services).

``die_with_parent()`` is a ``preexec_fn``: on Linux it asks the kernel to send the child SIGTERM
when its parent dies, however it dies (SIGKILL included), so a killed devstack leaves no orphan
holding its ports and state files. The kernel's "parent" is the *thread* that forked: fork from a
thread that lives as long as the process (the event loop's), not from a short-lived worker.
Elsewhere it does nothing (the parent's clean stop still stops its children).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable
from functools import cache

PR_SET_PDEATHSIG = 1


@cache
def _prctl() -> Callable[..., int] | None:
    # Looked up in the parent: dlopen after fork, in a process with threads, could deadlock.
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
        return prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn``: the child gets ``sig`` when this process dies (None: unsupported)."""
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request was made
            os._exit(1)

    return preexec
