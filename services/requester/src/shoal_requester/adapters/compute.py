"""ComputeClient over the bus: core NATS request/reply on per-node subjects."""

from __future__ import annotations

from typing import Protocol, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from shoal_common.bus import Bus
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
    Message,
)
from shoal_common.subjects import ComputeOp, compute_rpc
from shoal_requester.domain.ports import NodeCallFailed

M = TypeVar("M", bound=BaseModel)


class Requests(Protocol):
    """The part of :class:`shoal_common.bus.Bus` this client uses."""

    async def request(self, subject: str, data: bytes, *, timeout: float) -> bytes: ...


class BusComputeClient:
    """:class:`~shoal_requester.domain.ports.ComputeClient` on a :class:`Bus`."""

    def __init__(self, bus: Requests | Bus, *, timeout: float) -> None:
        self._bus = bus
        self._timeout = timeout

    async def _call(
        self,
        node_id: str,
        op: ComputeOp,
        message: Message,
        answer: type[M],
        *,
        timeout: float | None = None,
    ) -> M:
        try:
            raw = await self._bus.request(
                compute_rpc(node_id, op), message.to_bytes(), timeout=timeout or self._timeout
            )
        except ShoalError as exc:
            raise NodeCallFailed(exc.detail) from exc
        except ValueError as exc:  # a node id that cannot be a subject
            raise NodeCallFailed(str(exc)) from exc
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise NodeCallFailed(f"{node_id} answered {op.value} with invalid JSON") from exc
        # A handler that raised answers {"error": ...} (shoal_common.bus.NatsBus.serve).
        if isinstance(data, dict) and set(data) == {"error"}:
            raise NodeCallFailed(f"{node_id}: {data['error']}")
        try:
            return answer.model_validate(data)
        except ValidationError as exc:
            raise NodeCallFailed(f"{node_id} answered {op.value} with {data!r}") from exc

    async def ask_bid(self, node_id: str, ask: AskBid, *, timeout: float) -> BidAnswer:
        return await self._call(node_id, ComputeOp.ASK_BID, ask, BidAnswer, timeout=timeout)

    async def bid_accepted(self, node_id: str, decision: BidDecision) -> Ack:
        return await self._call(node_id, ComputeOp.BID_ACCEPTED, decision, Ack)

    async def bid_rejected(self, node_id: str, decision: BidDecision) -> Ack:
        return await self._call(node_id, ComputeOp.BID_REJECTED, decision, Ack)

    async def cancel(self, node_id: str, request: CancelExecution) -> Ack:
        return await self._call(node_id, ComputeOp.CANCEL, request, Ack)

    async def logs(self, node_id: str, query: LogsQuery) -> LogsAnswer:
        return await self._call(node_id, ComputeOp.LOGS, query, LogsAnswer)

    async def approve(self, node_id: str, decision: ApproveBid) -> Ack:
        return await self._call(node_id, ComputeOp.APPROVE, decision, Ack)
