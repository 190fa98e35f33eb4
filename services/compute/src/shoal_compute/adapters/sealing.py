"""Sealing deterministic results to the verifier before they go on the bus (ADR 0004).

A proposal whose CID travelled in clear could be copied by a lazy node that never ran the
job; sealed, only the verifier can read it, and a copy fails authentication.
"""

from __future__ import annotations

import asyncio
import time

from shoal_common.bus import Bus
from shoal_common.commitments import VerifierPublicKey, fetch_verifier_key, seal_proposal
from shoal_common.errors import Unavailable
from shoal_common.events import ResultProposed
from shoal_common.spec import VerifierType


class ProposalSealer:
    """Seals proposals of deterministic jobs; others pass through untouched."""

    def __init__(self, bus: Bus, *, key_ttl_s: float = 60.0, wait_s: float = 60.0) -> None:
        self._bus = bus
        self._ttl = key_ttl_s
        self._wait = wait_s
        self._key: VerifierPublicKey | None = None
        self._fetched = 0.0
        self._lock = asyncio.Lock()

    async def __call__(self, proposal: ResultProposed) -> ResultProposed:
        if proposal.verifier is not VerifierType.DETERMINISTIC:
            return proposal
        return seal_proposal(proposal, await self.key())

    async def key(self) -> VerifierPublicKey:
        """The verifier's key, cached for a while (a verifier keeps it across restarts)."""
        if self._key is not None and time.monotonic() - self._fetched < self._ttl:
            return self._key
        async with self._lock:
            if self._key is not None and time.monotonic() - self._fetched < self._ttl:
                return self._key
            # ADR 0004: never fall back to an unsealed proposal; wait for a verifier (it may be
            # restarting), then give up on this execution (retryable) rather than hang.
            deadline = time.monotonic() + self._wait
            delay = 0.1
            while True:
                try:
                    self._key = await fetch_verifier_key(self._bus)
                    self._fetched = time.monotonic()
                    return self._key
                except Unavailable as exc:
                    if self._key is not None:  # a stale key beats failing the execution
                        return self._key
                    if time.monotonic() + delay > deadline:
                        raise Unavailable(
                            f"cannot seal the result: no verifier answered ({exc.detail})"
                        ) from exc
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
