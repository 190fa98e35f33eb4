"""Envelope.to_bytes writes what pydantic's JSON dump would, straight through orjson."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import orjson
import pytest

from shoal_common.events import Envelope, ResultProposed
from shoal_common.spec import Deal, PublisherSpec, RunOutput, VerifierType


def _pydantic_bytes(envelope: Envelope) -> bytes:
    return orjson.dumps(envelope.model_dump(mode="json"))


def _proposal() -> Envelope:
    return Envelope.wrap(
        ResultProposed(
            job_id="j-1",
            execution_id="e-1",
            node_id="n-1",
            result_cid="QmRoKtHWjz1FRN4d6Dyz5sgpmPs4xbFk4TvFRiyxLdmgc1",
            run_output=RunOutput(stdout="1\n", exit_code=3),
            verifier=VerifierType.NOOP,
            deal=Deal(Concurrency=1),
            publisher=PublisherSpec(Type="Noop"),
            size=3,
        ),
        trace={"traceparent": "00-abc-def-01"},
    )


@pytest.mark.parametrize(
    "time",
    [
        datetime(2026, 12, 5, 7, 49, 51, 931615, tzinfo=UTC),
        datetime(2026, 1, 1, tzinfo=UTC),  # no microseconds: none written
        datetime(2026, 1, 1, 0, 0, 0, 5, tzinfo=UTC),
        datetime(2026, 1, 1, 2, 0, tzinfo=timezone(timedelta(hours=2))),
    ],
)
def test_the_bytes_are_the_ones_pydantic_writes(time: datetime) -> None:
    envelope = _proposal().model_copy(update={"time": time})
    assert envelope.to_bytes() == _pydantic_bytes(envelope)
    assert list(orjson.loads(envelope.to_bytes())) == list(Envelope.model_fields)
    assert Envelope.from_bytes(envelope.to_bytes()) == envelope


@pytest.mark.parametrize(
    "data",
    [
        {"size": Decimal("1.5")},  # orjson writes no Decimal: pydantic's dump does
        {"run_output": RunOutput(stdout="x")},  # a model in the data
        {"ids": {"a", "b"}},
    ],
    ids=["decimal", "model", "set"],
)
def test_data_orjson_cannot_write_goes_through_pydantic(data: dict[str, Any]) -> None:
    envelope = Envelope(type="custom", producer="compute", data={"job_id": "j", **data})
    raw = envelope.to_bytes()
    assert raw == _pydantic_bytes(envelope)
    assert orjson.loads(raw)["data"]["job_id"] == "j"
