"""What the domain needs from the outside world, as Protocols (adapters implement them)."""

from __future__ import annotations

from typing import Protocol

from shoal_common.errors import ShoalError
from shoal_common.protocol import (
    Ack,
    ApproveBid,
    AskBid,
    BidAnswer,
    BidDecision,
    CancelExecution,
    LogsAnswer,
    LogsQuery,
)


class NodeCallFailed(ShoalError):
    """A node did not answer, or answered with an error instead of a reply."""

    code = "node_call_failed"
    http_status = 502
    retryable = True


class ComputeClient(Protocol):
    """Node-addressed calls to compute nodes (request/reply). Each raises NodeCallFailed."""

    async def ask_bid(self, node_id: str, ask: AskBid, *, timeout: float) -> BidAnswer: ...

    async def bid_accepted(self, node_id: str, decision: BidDecision) -> Ack: ...

    async def bid_rejected(self, node_id: str, decision: BidDecision) -> Ack: ...

    async def cancel(self, node_id: str, request: CancelExecution) -> Ack: ...

    async def logs(self, node_id: str, query: LogsQuery) -> LogsAnswer: ...

    async def approve(self, node_id: str, decision: ApproveBid) -> Ack: ...
