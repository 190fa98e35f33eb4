"""Deterministic results are sealed to the verifier before they go on the bus (ADR 0004)."""

from __future__ import annotations

from typing import Any

from shoal_common.commitments import VerifierKey, VerifierKeyAnswer, is_sealed, open_proposal
from shoal_common.events import ExecutionFailed, ResultProposed
from shoal_common.spec import VerifierType
from shoal_common.subjects import VERIFIER_KEY
from shoal_compute.testing import MakeNode, noop_job


def deterministic_job(*words: str) -> Any:
    job = noop_job(*words)
    job.spec.verifier = VerifierType.DETERMINISTIC
    return job


async def test_deterministic_proposals_are_sealed(make_node: MakeNode) -> None:
    key = VerifierKey.generate()
    asked = 0

    async def answer(raw: bytes) -> bytes:
        nonlocal asked
        asked += 1
        return VerifierKeyAnswer(
            public_key=key.public.to_text(), key_id=key.public.key_id
        ).to_bytes()

    node = await make_node()
    await node.bus.serve(VERIFIER_KEY, answer)
    for _ in range(2):
        event = await node.outcome(await node.run(deterministic_job("echo", "secret")))
        assert isinstance(event, ResultProposed)
        assert is_sealed(event)
        assert event.result_cid == ""
        assert event.run_output.stdout == ""
        opened = open_proposal(event, key)
        assert opened.run_output.stdout == "secret\n"
        assert opened.result_cid.startswith("Qm")
    assert asked == 1  # the key is cached

    plain = await node.outcome(await node.run(noop_job("echo", "public")))
    assert isinstance(plain, ResultProposed)
    assert not is_sealed(plain)
    assert plain.run_output.stdout == "public\n"


async def test_no_verifier_fails_the_execution_retryably(make_node: MakeNode) -> None:
    node = await make_node(verifier_key_wait_s=0.2)
    event = await node.outcome(await node.run(deterministic_job()))
    assert isinstance(event, ExecutionFailed)
    assert event.retryable
    assert "verifier" in event.error
