"""Sealed result proposals (ADR 0004): only the verifier opens them, copies are caught."""

from __future__ import annotations

import pytest

from shoal_common.bus import MemoryBus
from shoal_common.commitments import (
    SEAL_PREFIX,
    CommitmentError,
    VerifierKey,
    VerifierKeyAnswer,
    VerifierPublicKey,
    fetch_verifier_key,
    is_sealed,
    open_proposal,
    seal_proposal,
)
from shoal_common.errors import Unavailable
from shoal_common.events import ResultProposed
from shoal_common.spec import RunOutput
from shoal_common.subjects import VERIFIER_KEY

CID = "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"


def _proposal(execution_id: str = "e1", node_id: str = "n1") -> ResultProposed:
    return ResultProposed(
        job_id="j",
        execution_id=execution_id,
        node_id=node_id,
        result_cid=CID,
        run_output=RunOutput(stdout="secret output", exitCode=3),
        result_url="http://n1/content/" + CID,
        size=12,
    )


def test_round_trip_hides_everything_a_peer_could_copy() -> None:
    key = VerifierKey.generate()
    sealed = seal_proposal(_proposal(), key.public)
    assert is_sealed(sealed)
    assert sealed.commitment is not None
    assert sealed.commitment.startswith(SEAL_PREFIX)
    assert (sealed.result_cid, sealed.result_url, sealed.size) == ("", None, 0)
    assert sealed.run_output == RunOutput()
    assert CID not in sealed.model_dump_json()
    assert "secret output" not in sealed.model_dump_json()
    opened = open_proposal(sealed, key)
    assert opened.model_copy(update={"commitment": None}) == _proposal()


def test_sealing_twice_gives_different_commitments() -> None:
    key = VerifierKey.generate()
    assert seal_proposal(_proposal(), key.public).commitment != (
        seal_proposal(_proposal(), key.public).commitment
    )


@pytest.mark.parametrize("update", [{"execution_id": "e2"}, {"node_id": "n2"}, {"job_id": "other"}])
def test_a_copied_commitment_does_not_open(update: dict[str, str]) -> None:
    key = VerifierKey.generate()
    sealed = seal_proposal(_proposal(), key.public)
    with pytest.raises(CommitmentError, match="copied from another proposal"):
        open_proposal(sealed.model_copy(update=update), key)


def test_tampering_and_wrong_keys_are_refused() -> None:
    key = VerifierKey.generate()
    sealed = seal_proposal(_proposal(), key.public)
    assert sealed.commitment is not None
    with pytest.raises(CommitmentError, match="unknown verifier key"):
        open_proposal(sealed, VerifierKey.generate())
    body = sealed.commitment[len(SEAL_PREFIX) :]
    flipped = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1]
    with pytest.raises(CommitmentError):
        open_proposal(sealed.model_copy(update={"commitment": SEAL_PREFIX + flipped}), key)
    with pytest.raises(CommitmentError, match="too short"):
        open_proposal(sealed.model_copy(update={"commitment": SEAL_PREFIX + "AAAA"}), key)
    with pytest.raises(CommitmentError, match="not sealed"):
        open_proposal(_proposal(), key)


def test_keys_survive_serialisation() -> None:
    key = VerifierKey.generate()
    again = VerifierKey.from_private_bytes(key.private_bytes())
    assert again.public == key.public
    assert VerifierPublicKey.from_text(key.public.to_text()) == key.public
    with pytest.raises(CommitmentError):
        VerifierPublicKey.from_text("c2hvcnQ")


async def test_fetch_verifier_key_over_the_bus() -> None:
    bus = MemoryBus()
    key = VerifierKey.generate()
    with pytest.raises(Unavailable):
        await fetch_verifier_key(bus)
    answer = VerifierKeyAnswer(public_key=key.public.to_text(), key_id=key.public.key_id)

    async def respond(_: bytes) -> bytes:
        return answer.to_bytes()

    await bus.serve(VERIFIER_KEY, respond)
    assert await fetch_verifier_key(bus) == key.public

    async def lie(_: bytes) -> bytes:
        return answer.model_copy(update={"key_id": "0" * 16}).to_bytes()

    await bus.serve(VERIFIER_KEY, lie)
    with pytest.raises(Unavailable, match="key id"):
        await fetch_verifier_key(bus)
