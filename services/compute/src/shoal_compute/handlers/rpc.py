"""Request/reply handlers of ``shoal.compute.<node>.<op>``: decode -> domain -> encode."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from pydantic import ValidationError

from shoal_common import tracing
from shoal_common.errors import InvalidInput
from shoal_common.protocol import (
    ApproveBid,
    AskBid,
    BidDecision,
    CancelExecution,
    LogsQuery,
    Message,
)
from shoal_common.subjects import ComputeOp
from shoal_compute.domain.node import ComputeNode

RequestHandler = Callable[[bytes], Awaitable[bytes]]
M = TypeVar("M", bound=Message)


def _decode(model: type[M], raw: bytes) -> M:
    try:
        return model.from_bytes(raw)
    except (ValidationError, ValueError) as exc:
        # The bus answers {"error": ...}; the caller learns what was malformed.
        raise InvalidInput(f"malformed {model.__name__}: {exc}") from exc


def rpc_handlers(node: ComputeNode) -> dict[ComputeOp, RequestHandler]:
    """One handler per operation, ready for ``bus.serve``."""

    async def ask_bid(raw: bytes) -> bytes:
        return (await node.ask_bid(_decode(AskBid, raw))).to_bytes()

    async def bid_accepted(raw: bytes) -> bytes:
        return (await node.bid_accepted(_decode(BidDecision, raw))).to_bytes()

    async def bid_rejected(raw: bytes) -> bytes:
        return (await node.bid_rejected(_decode(BidDecision, raw))).to_bytes()

    async def cancel(raw: bytes) -> bytes:
        return (await node.cancel(_decode(CancelExecution, raw))).to_bytes()

    async def logs(raw: bytes) -> bytes:
        return (await node.logs(_decode(LogsQuery, raw))).to_bytes()

    async def approve(raw: bytes) -> bytes:
        return (await node.approve(_decode(ApproveBid, raw))).to_bytes()

    def traced(op: ComputeOp, handler: RequestHandler) -> RequestHandler:
        async def handle(raw: bytes) -> bytes:
            with tracing.start_span(
                f"compute {op.value}", service="compute", kind=tracing.SpanKind.SERVER
            ):
                return await handler(raw)

        return handle

    handlers = {
        ComputeOp.ASK_BID: ask_bid,
        ComputeOp.BID_ACCEPTED: bid_accepted,
        ComputeOp.BID_REJECTED: bid_rejected,
        ComputeOp.CANCEL: cancel,
        ComputeOp.LOGS: logs,
        ComputeOp.APPROVE: approve,
    }
    return {op: traced(op, h) for op, h in handlers.items()}
