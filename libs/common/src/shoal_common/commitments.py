"""Sealed result proposals: how a compute node commits to a result no peer can read or copy.

Deterministic verification compares result CIDs across nodes. If a proposal carried its CID
(or its stdout, from which a small result folder can be rebuilt) in clear on the bus, a lazy
node could wait for a peer's proposal and echo it without running the job. So for
deterministic jobs a node *seals* its proposal to the verifier (ADR 0004):

* the verifier owns an X25519 key pair and answers its public key on ``subjects.VERIFIER_KEY``
  (:func:`fetch_verifier_key`);
* the node moves ``result_cid``, ``run_output``, ``result_url`` and ``size`` out of the
  ``ResultProposed`` event into ``commitment`` = ECIES(X25519 + HKDF-SHA256 +
  ChaCha20-Poly1305) of those fields, with ``(job_id, execution_id, node_id)`` as the AEAD
  associated data (:func:`seal_proposal`);
* only the verifier can open it (:func:`open_proposal`); a commitment copied into another
  execution's proposal fails authentication, so the copier is caught, and nothing a peer can
  read reveals the CID before the verifier has decided.

Compute nodes use :func:`fetch_verifier_key` and :func:`seal_proposal`; the verifier uses
:class:`VerifierKey` and :func:`open_proposal`. Nothing here imports a service.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import ValidationError

from shoal_common.bus import Bus
from shoal_common.errors import Unavailable
from shoal_common.events import ResultProposed
from shoal_common.protocol import Message
from shoal_common.spec import RunOutput
from shoal_common.subjects import VERIFIER_KEY

__all__ = [
    "SEAL_PREFIX",
    "SEAL_SCHEME",
    "CommitmentError",
    "VerifierKey",
    "VerifierKeyAnswer",
    "VerifierPublicKey",
    "fetch_verifier_key",
    "is_sealed",
    "open_proposal",
    "seal_proposal",
]

SEAL_SCHEME = "shoal-seal-v1"
SEAL_PREFIX = SEAL_SCHEME + ":"
_KEY_ID_LEN = 8
_PUB_LEN = 32
_NONCE_LEN = 12


class CommitmentError(ValueError):
    """A sealed proposal that cannot be opened or is not bound to the execution it came in."""


def _b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _key_id(public_raw: bytes) -> bytes:
    return hashlib.sha256(public_raw).digest()[:_KEY_ID_LEN]


def _binding(job_id: str, execution_id: str, node_id: str) -> bytes:
    """AEAD associated data: the box only opens inside the proposal it was made for."""
    return "\0".join((SEAL_SCHEME, job_id, execution_id, node_id)).encode()


def _derive(shared: bytes, ephemeral_pub: bytes, recipient_pub: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=ephemeral_pub + recipient_pub,
        info=SEAL_SCHEME.encode(),
    ).derive(shared)


@dataclass(frozen=True)
class VerifierPublicKey:
    """What a compute node needs to seal a proposal: the verifier's X25519 public key."""

    raw: bytes

    @property
    def key_id(self) -> str:
        return _key_id(self.raw).hex()

    def to_text(self) -> str:
        return _b64e(self.raw)

    @classmethod
    def from_text(cls, text: str) -> VerifierPublicKey:
        try:
            raw = _b64d(text)
        except (ValueError, binascii.Error) as exc:
            raise CommitmentError(f"not a verifier public key: {exc}") from exc
        if len(raw) != _PUB_LEN:
            raise CommitmentError("a verifier public key is 32 bytes (X25519)")
        return cls(raw)


class VerifierKey:
    """The verifier's private X25519 key (kept in the verifier's store)."""

    def __init__(self, private: X25519PrivateKey) -> None:
        self._private = private
        self.public = VerifierPublicKey(
            private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        )

    @classmethod
    def generate(cls) -> VerifierKey:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> VerifierKey:
        return cls(X25519PrivateKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        return self._private.private_bytes_raw()

    def _exchange(self, ephemeral_pub: bytes) -> bytes:
        return self._private.exchange(X25519PublicKey.from_public_bytes(ephemeral_pub))


class VerifierKeyAnswer(Message):
    """Reply on ``subjects.VERIFIER_KEY``: the key compute nodes seal proposals to."""

    public_key: str
    key_id: str
    scheme: str = SEAL_SCHEME


async def fetch_verifier_key(bus: Bus, *, timeout: float = 2.0) -> VerifierPublicKey:
    """Ask a verifier for its public key; raises :class:`Unavailable` if none answers.

    Callers may cache the answer; a verifier keeps its key across restarts.
    """
    raw = await bus.request(VERIFIER_KEY, b"{}", timeout=timeout)
    try:
        answer = VerifierKeyAnswer.from_bytes(raw)
    except (ValueError, ValidationError) as exc:
        raise Unavailable(f"the verifier answered something that is not a key: {exc}") from exc
    key = VerifierPublicKey.from_text(answer.public_key)
    if key.key_id != answer.key_id:
        raise Unavailable("the verifier's key id does not match its key")
    return key


def is_sealed(proposal: ResultProposed) -> bool:
    """Whether the proposal's result travels sealed in ``commitment``."""
    return bool(proposal.commitment and proposal.commitment.startswith(SEAL_PREFIX))


def seal_proposal(proposal: ResultProposed, key: VerifierPublicKey) -> ResultProposed:
    """The same proposal with its result sealed to the verifier.

    ``result_cid``, ``run_output``, ``result_url`` and ``size`` move into ``commitment``;
    the event keeps ``result_cid=""`` and an empty run output until the verifier decides
    (``ResultAccepted`` / ``ResultRejected`` then carry them).
    """
    secret: dict[str, Any] = {
        "scheme": SEAL_SCHEME,
        "job_id": proposal.job_id,
        "execution_id": proposal.execution_id,
        "node_id": proposal.node_id,
        "result_cid": proposal.result_cid,
        "run_output": proposal.run_output.model_dump(mode="json", by_alias=True),
        "result_url": proposal.result_url,
        "size": proposal.size,
    }
    ephemeral = X25519PrivateKey.generate()
    ephemeral_pub = ephemeral.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(key.raw))
    nonce = os.urandom(_NONCE_LEN)
    box = ChaCha20Poly1305(_derive(shared, ephemeral_pub, key.raw)).encrypt(
        nonce,
        orjson.dumps(secret),
        _binding(proposal.job_id, proposal.execution_id, proposal.node_id),
    )
    blob = _key_id(key.raw) + ephemeral_pub + nonce + box
    return proposal.model_copy(
        update={
            "result_cid": "",
            "run_output": RunOutput(),
            "result_url": None,
            "size": 0,
            "commitment": SEAL_PREFIX + _b64e(blob),
        }
    )


def open_proposal(proposal: ResultProposed, key: VerifierKey) -> ResultProposed:
    """The proposal with its sealed result restored; raises :class:`CommitmentError`.

    Fails if the commitment is not sealed to ``key``, was tampered with, or was made for
    another (job, execution, node): the last is how a copied proposal is caught.
    """
    if not is_sealed(proposal):
        raise CommitmentError("the proposal is not sealed")
    assert proposal.commitment is not None
    try:
        blob = _b64d(proposal.commitment[len(SEAL_PREFIX) :])
    except (ValueError, binascii.Error) as exc:
        raise CommitmentError(f"malformed sealed proposal: {exc}") from exc
    head = _KEY_ID_LEN + _PUB_LEN + _NONCE_LEN
    if len(blob) <= head:
        raise CommitmentError("malformed sealed proposal: too short")
    key_id = blob[:_KEY_ID_LEN]
    ephemeral_pub = blob[_KEY_ID_LEN : _KEY_ID_LEN + _PUB_LEN]
    nonce = blob[_KEY_ID_LEN + _PUB_LEN : head]
    if key_id != _key_id(key.public.raw):
        raise CommitmentError(
            f"sealed to an unknown verifier key {key_id.hex()} (this verifier's is "
            f"{key.public.key_id})"
        )
    try:
        shared = key._exchange(ephemeral_pub)
        plain = ChaCha20Poly1305(_derive(shared, ephemeral_pub, key.public.raw)).decrypt(
            nonce,
            blob[head:],
            _binding(proposal.job_id, proposal.execution_id, proposal.node_id),
        )
    except (InvalidTag, ValueError) as exc:
        raise CommitmentError(
            "the sealed result is not bound to this job/execution/node: copied from another "
            "proposal, or tampered with"
        ) from exc
    try:
        secret = orjson.loads(plain)
        run_output = RunOutput.model_validate(secret.get("run_output") or {})
        result_cid = str(secret["result_cid"])
    except (ValueError, KeyError, TypeError, ValidationError) as exc:
        raise CommitmentError(f"malformed sealed result: {exc}") from exc
    if not result_cid:
        raise CommitmentError("the sealed result has no result CID")
    return proposal.model_copy(
        update={
            "result_cid": result_cid,
            "run_output": run_output,
            "result_url": secret.get("result_url"),
            "size": int(secret.get("size") or 0),
        }
    )
