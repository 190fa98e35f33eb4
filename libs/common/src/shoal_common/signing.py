"""Client identity and request signing, wire-compatible with Bacalhau's legacy clients.

A client is an RSA key pair. Its id is the SHA-256 hex of the public modulus; it proves itself by
signing the exact bytes of the ``payload`` member of a JSON envelope::

    {"client_public_key": <b64 PKCS#1 DER>, "payload": {...}, "signature": <b64 PKCS#1 v1.5>}

The key file (``user_id.pem``), the envelope and the verification order are the ones the official
Python SDK (``bacalhau-sdk`` 0.3.x-1.3.x) and the Go CLI/server use, so keys and requests move
freely between them and Shoal (reference/bacalhau-legacy-api.md, sections 2 and 3).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NoReturn

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

__all__ = [
    "KEY_BITS",
    "KEY_FILE_NAME",
    "LEGACY_PAYLOAD_KEY",
    "MSG_BAD_ENVELOPE",
    "MSG_BAD_PAYLOAD",
    "MSG_BAD_SIGNATURE",
    "MSG_CLIENT_ID_MISMATCH",
    "MSG_NO_CLIENT_ID",
    "MSG_NO_PAYLOAD",
    "PAYLOAD_KEY",
    "PUBLIC_EXPONENT",
    "ClientKey",
    "ClientKeyError",
    "SignatureError",
    "SignedEnvelopeError",
    "VerifiedEnvelope",
    "client_id_of_public_key",
    "raw_members",
    "sign_envelope",
    "verify_signed_envelope",
]

KEY_FILE_NAME = "user_id.pem"
KEY_BITS = 2048
PUBLIC_EXPONENT = 65537
PAYLOAD_KEY = "payload"
# bacalhau-sdk 0.1.x-0.3.25 named the envelope member this instead of "payload".
LEGACY_PAYLOAD_KEY = "job_create_payload"

# The messages the Go requester answered with (publicapi.UnmarshalSigned, v1.0.3). The two
# "error validating request: " ones are wrapped exactly as Go wrapped them and as the recorded
# responses show. Clients never parse them, but operators and tests compare them.
MSG_BAD_ENVELOPE = "error unmarshalling envelope"
MSG_NO_PAYLOAD = "no payload contained in signed message"
MSG_BAD_SIGNATURE = "error verifying request signature: client's signature is invalid"
MSG_BAD_PAYLOAD = "error unmarshalling payload"
MSG_NO_CLIENT_ID = "error validating request: payload must contain a client ID"
MSG_CLIENT_ID_MISMATCH = "error validating request: client's public key does not match client ID"

_ENVELOPE_PUBLIC_KEY = "client_public_key"
_ENVELOPE_SIGNATURE = "signature"
_PAYLOAD_CLIENT_ID = "ClientID"
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)
_WHITESPACE = re.compile(r"[ \t\n\r]*")


class SignedEnvelopeError(ValueError):
    """The text is not a well-formed JSON object (or repeats a key)."""


class SignatureError(ValueError):
    """A signed request failed verification.

    ``str(error)`` is the message the Go requester answered with; ``detail`` says what exactly
    was wrong, for logs only.
    """

    http_status: ClassVar[int] = 400

    def __init__(self, message: str, *, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class ClientKeyError(ValueError):
    """A private key file or a public key string could not be used."""


# ---------------------------------------------------------------------------------------------
# Keys


class ClientKey:
    """A client's RSA private key, with the identity derived from it."""

    __slots__ = ("_client_id", "_private_key", "_public_key_b64")

    def __init__(self, private_key: rsa.RSAPrivateKey) -> None:
        self._private_key = private_key
        public_key = private_key.public_key()
        self._client_id = _client_id_of(public_key)
        self._public_key_b64 = base64.b64encode(
            public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
        ).decode("ascii")

    @classmethod
    def generate(cls) -> ClientKey:
        """A fresh RSA-2048 key, e = 65537, as the SDK and the Go CLI generate."""
        return cls(rsa.generate_private_key(public_exponent=PUBLIC_EXPONENT, key_size=KEY_BITS))

    @classmethod
    def from_pem(cls, data: bytes) -> ClientKey:
        """Load the first PEM block of ``data``: PKCS#1 or PKCS#8, unencrypted, RSA."""
        match = _PEM_BLOCK.search(data)
        if match is None:
            raise ClientKeyError("no PEM block found")
        try:
            key = serialization.load_pem_private_key(match.group(0), password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            # TypeError: the key is encrypted. The SDK and the Go CLI never encrypt it.
            raise ClientKeyError(f"cannot load private key: {exc}") from exc
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ClientKeyError(f"expected an RSA private key, got {type(key).__name__}")
        return cls(key)

    @classmethod
    def load(cls, path: Path) -> ClientKey:
        """Load a key file written by us, the SDK or the Go CLI."""
        return cls.from_pem(path.read_bytes())

    @classmethod
    def load_or_create(cls, dir: Path) -> ClientKey:
        """Load ``<dir>/user_id.pem``, generating it first if it does not exist.

        A new directory is created 0700 and a new key file 0600, PKCS#1 PEM, like the SDK does.
        Two processes racing here end up with the same key: the file appears atomically and the
        loser loads the winner's.
        """
        _ensure_private_dir(dir)
        path = dir / KEY_FILE_NAME
        if not path.exists():
            _write_new_file(path, cls.generate().to_pem())
        return cls.load(path)

    def to_pem(self) -> bytes:
        """PKCS#1 PEM (``BEGIN RSA PRIVATE KEY``), the format of ``user_id.pem``."""
        return self._private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )

    @property
    def private_key(self) -> rsa.RSAPrivateKey:
        return self._private_key

    @property
    def client_id(self) -> str:
        """Lowercase hex SHA-256 of the modulus, big-endian (64 characters)."""
        return self._client_id

    @property
    def public_key_b64(self) -> str:
        """Standard base64 of the PKCS#1 ``RSAPublicKey`` DER (not SubjectPublicKeyInfo)."""
        return self._public_key_b64

    def sign(self, payload: bytes) -> str:
        """Base64 RSASSA-PKCS1-v1_5 / SHA-256 signature of ``payload``."""
        signature = self._private_key.sign(payload, padding.PKCS1v15(), hashes.SHA256())
        return base64.b64encode(signature).decode("ascii")

    def __repr__(self) -> str:
        return f"ClientKey(client_id={self._client_id!r})"


def client_id_of_public_key(public_key_b64: str) -> str:
    """The client id belonging to a ``client_public_key`` string.

    Raises ClientKeyError if the string is not base64 of a PKCS#1 RSA public key.
    """
    return _parse_public_key(public_key_b64).client_id


@dataclass(frozen=True, slots=True)
class _PublicKey:
    key: rsa.RSAPublicKey
    client_id: str


def public_key_of(public_key_b64: str) -> _PublicKey:
    """The RSA key and client id of a ``client_public_key`` string (PKCS#1 DER, base64).

    Raises ClientKeyError like :func:`client_id_of_public_key`.
    """
    return _parse_public_key(public_key_b64)


# Every signed request carries its key, and most come from a few clients: parsing it (base64,
# DER, OpenSSL object) costs more than a dict lookup. Failures are not cached.
@functools.lru_cache(maxsize=4096)
def _parse_public_key(public_key_b64: str) -> _PublicKey:
    try:
        der = _b64decode(public_key_b64)
        key = serialization.load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ClientKeyError(f"cannot parse client public key: {exc}") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise ClientKeyError("client public key is not an RSA key")
    # cryptography also accepts SubjectPublicKeyInfo; Go's x509.ParsePKCS1PublicKey does not.
    # Round-tripping keeps us exactly as strict (PKCS#1 only, DER only, no trailing bytes).
    if key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1) != der:
        raise ClientKeyError("client public key is not a PKCS#1 RSAPublicKey in DER")
    return _PublicKey(key=key, client_id=_client_id_of(key))


def _client_id_of(public_key: rsa.RSAPublicKey) -> str:
    n = public_key.public_numbers().n
    # Same bytes as Go's N.Bytes() and the SDK's n.to_bytes(size_in_bytes, "big").
    return hashlib.sha256(n.to_bytes((n.bit_length() + 7) // 8, "big")).hexdigest()


def _b64decode(text: str) -> bytes:
    # Go's base64.StdEncoding skips CR and LF and is otherwise strict about padding and alphabet.
    return binascii.a2b_base64(text.replace("\r", "").replace("\n", ""), strict_mode=True)


def _ensure_private_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        if not path.is_dir():
            raise
    else:
        # mkdir's mode is filtered by the umask; say exactly what we mean.
        path.chmod(0o700)


def _write_new_file(path: Path, data: bytes) -> None:
    """Publish ``data`` at ``path`` with mode 0600, unless the file already exists.

    The bytes go to a private temporary file first and are then hard-linked into place, so a
    concurrent reader never sees a half-written key and an existing key is never replaced.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError:
            # No hard links on this filesystem: exclusive create still never clobbers a key.
            _write_exclusive(path, data)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _write_exclusive(path: Path, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data)


# ---------------------------------------------------------------------------------------------
# Raw JSON members


def _reject_constant(name: str) -> NoReturn:
    raise SignedEnvelopeError(f"{name} is not valid JSON")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise SignedEnvelopeError(f"duplicate key {key!r} in JSON object")
            seen.add(key)
    return obj


# Strict JSON: no NaN/Infinity, no control characters in strings, no repeated keys at any
# depth (a repeated key is read differently by different parsers).
_DECODER = json.JSONDecoder(object_pairs_hook=_unique_object, parse_constant=_reject_constant)


def _skip_whitespace(text: str, pos: int) -> int:
    match = _WHITESPACE.match(text, pos)
    return match.end() if match is not None else pos


def _decode_at(text: str, pos: int) -> tuple[Any, int]:
    try:
        return _DECODER.raw_decode(text, pos)
    except SignedEnvelopeError:
        raise
    except RecursionError as exc:
        raise SignedEnvelopeError(f"JSON nested too deeply at position {pos}") from exc
    except ValueError as exc:
        # JSONDecodeError, or int() refusing a number with too many digits.
        raise SignedEnvelopeError(f"invalid JSON value at position {pos}: {exc}") from exc


def _scan_object(body: bytes | str) -> list[tuple[str, str, Any]]:
    """(key, raw text, decoded value) of each member of the top-level object, in order."""
    if isinstance(body, str):
        text = body
    else:
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SignedEnvelopeError(f"body is not valid UTF-8: {exc}") from exc
    end = len(text)
    members: list[tuple[str, str, Any]] = []
    seen: set[str] = set()

    pos = _skip_whitespace(text, 0)
    if pos >= end or text[pos] != "{":
        raise SignedEnvelopeError(f"expected '{{' at position {pos}")
    pos = _skip_whitespace(text, pos + 1)
    if pos < end and text[pos] == "}":
        pos += 1
    else:
        while True:
            if pos >= end or text[pos] != '"':
                raise SignedEnvelopeError(f"expected a string key at position {pos}")
            key, pos = _decode_at(text, pos)
            if key in seen:
                raise SignedEnvelopeError(f"duplicate key {key!r} in JSON object")
            seen.add(key)
            pos = _skip_whitespace(text, pos)
            if pos >= end or text[pos] != ":":
                raise SignedEnvelopeError(f"expected ':' at position {pos}")
            start = _skip_whitespace(text, pos + 1)
            value, pos = _decode_at(text, start)
            members.append((key, text[start:pos], value))
            pos = _skip_whitespace(text, pos)
            if pos < end and text[pos] == "}":
                pos += 1
                break
            if pos >= end or text[pos] != ",":
                raise SignedEnvelopeError(f"expected ',' or '}}' at position {pos}")
            pos = _skip_whitespace(text, pos + 1)

    pos = _skip_whitespace(text, pos)
    if pos != end:
        raise SignedEnvelopeError(f"unexpected data after the JSON object at position {pos}")
    return members


def raw_members(body: bytes | str) -> dict[str, str]:
    """The byte-exact JSON text of each member of the top-level object, by key.

    Python has no ``json.RawMessage``; this is how the signed ``payload`` text is recovered
    without re-serialising it. ``bytes`` are decoded as UTF-8, and ``text.encode()`` of a member
    gives back its exact bytes. Raises SignedEnvelopeError on anything but one well-formed
    object, including a key repeated at any depth.
    """
    return {key: raw for key, raw, _ in _scan_object(body)}


# ---------------------------------------------------------------------------------------------
# Envelopes


@dataclass(frozen=True, slots=True)
class VerifiedEnvelope:
    """A signed request whose signature and client id checked out."""

    payload_raw: str
    payload: dict[str, Any]
    client_id: str
    public_key_b64: str
    signature: str


def _find_member(
    members: dict[str, tuple[str, Any]], name: str, error: str
) -> tuple[str, Any] | None:
    """Look a member up case-insensitively, as Go's encoding/json matched struct fields.

    Go let the last of several case-variants win; we refuse the ambiguity instead.
    """
    folded = name.casefold()
    found = [member for key, member in members.items() if key.casefold() == folded]
    if len(found) > 1:
        raise SignatureError(error, detail=f"several members match {name!r}")
    return found[0] if found else None


def _string_member(members: dict[str, tuple[str, Any]], name: str, error: str) -> str:
    member = _find_member(members, name, error)
    value = None if member is None else member[1]
    if value is None:
        # A missing or null string is "" to Go; it then fails verification, not decoding.
        return ""
    if not isinstance(value, str):
        raise SignatureError(error, detail=f"{name!r} is not a string")
    return value


def verify_signed_envelope(body: bytes, *, payload_key: str = PAYLOAD_KEY) -> VerifiedEnvelope:
    """Check a signed request the way the Go requester did, in the same order.

    1. The body is a JSON object with a non-null ``payload`` (or, when that is absent, the
       legacy ``job_create_payload``).
    2. ``signature`` is a valid RSASSA-PKCS1-v1_5 / SHA-256 signature by ``client_public_key``
       over the payload's raw bytes as sent, so any client serialisation verifies.
    3. The payload is a JSON object.
    4. Its ``ClientID`` is non-empty and is the id of ``client_public_key``.

    Raises SignatureError whose message is what Go answered (the MSG_* constants).
    """
    try:
        scanned = _scan_object(body)
    except SignedEnvelopeError as exc:
        raise SignatureError(MSG_BAD_ENVELOPE, detail=str(exc)) from exc
    envelope = {key: (raw, value) for key, raw, value in scanned}

    public_key_b64 = _string_member(envelope, _ENVELOPE_PUBLIC_KEY, MSG_BAD_ENVELOPE)
    signature = _string_member(envelope, _ENVELOPE_SIGNATURE, MSG_BAD_ENVELOPE)
    payload_member = _find_member(envelope, payload_key, MSG_BAD_ENVELOPE)
    if payload_member is None:
        payload_member = _find_member(envelope, LEGACY_PAYLOAD_KEY, MSG_BAD_ENVELOPE)
    if payload_member is None or payload_member[1] is None:
        raise SignatureError(MSG_NO_PAYLOAD)
    payload_raw, payload = payload_member

    try:
        public_key = _parse_public_key(public_key_b64).key
        signature_bytes = _b64decode(signature)
        public_key.verify(
            signature_bytes, payload_raw.encode("utf-8"), padding.PKCS1v15(), hashes.SHA256()
        )
    except ValueError as exc:
        # ClientKeyError, bad base64, or text that does not encode.
        raise SignatureError(MSG_BAD_SIGNATURE, detail=str(exc)) from exc
    except InvalidSignature as exc:
        raise SignatureError(MSG_BAD_SIGNATURE, detail="verification failed") from exc

    if not isinstance(payload, dict):
        raise SignatureError(MSG_BAD_PAYLOAD, detail="payload is not a JSON object")
    payload_members = {key: (key, value) for key, value in payload.items()}
    client_id = _string_member(payload_members, _PAYLOAD_CLIENT_ID, MSG_BAD_PAYLOAD)
    if not client_id:
        raise SignatureError(MSG_NO_CLIENT_ID)
    if client_id != client_id_of_public_key(public_key_b64):
        raise SignatureError(MSG_CLIENT_ID_MISMATCH)

    return VerifiedEnvelope(
        payload_raw=payload_raw,
        payload=payload,
        client_id=client_id,
        public_key_b64=public_key_b64,
        signature=signature,
    )


def sign_envelope(key: ClientKey, payload: dict[str, Any]) -> bytes:
    """The request body the official Python SDK sends for ``payload``, byte for byte.

    The SDK signs ``json.dumps(payload)`` (default separators, ASCII escapes, keys in the order
    given) and the apiclient sends ``json.dumps`` of the envelope, whose ``payload`` member is
    therefore exactly the signed text. Building the body around the signed text guarantees it.
    """
    payload_text = json.dumps(payload, allow_nan=False)
    signature = key.sign(payload_text.encode("utf-8"))
    body = (
        f'{{"{_ENVELOPE_PUBLIC_KEY}": {json.dumps(key.public_key_b64)}, '
        f'"{PAYLOAD_KEY}": {payload_text}, '
        f'"{_ENVELOPE_SIGNATURE}": {json.dumps(signature)}}}'
    )
    return body.encode("utf-8")
