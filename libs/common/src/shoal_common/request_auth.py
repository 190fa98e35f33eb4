"""Signed HTTP requests for private clusters (optional API auth, issue 8).

Bacalhau signs only the payload of mutating requests (a JSON envelope), so reads carry no
identity. A private cluster can ask for one on every request: the client signs the request
line, a timestamp and the body's SHA-256 with its usual key (``$SHOAL_DIR/user_id.pem``) and
sends the result in three headers. The requester checks the signature, that the timestamp is
recent (a captured request replays for at most ``max_skew`` seconds, and only as itself: the
method, path, query and body are all signed) and that the client id is on its allow-list.

The canonical string, one field per line::

    SHOAL-REQUEST-V1
    <METHOD>
    <path, percent-encoded as sent>
    <query string as sent, may be empty>
    <unix seconds>
    <hex SHA-256 of the body>
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections.abc import Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from shoal_common.signing import ClientKey, ClientKeyError, public_key_of

SCHEME = "SHOAL-REQUEST-V1"
HEADER_KEY = "X-Shoal-Client-Public-Key"
HEADER_TIME = "X-Shoal-Timestamp"
HEADER_SIGNATURE = "X-Shoal-Signature"
DEFAULT_MAX_SKEW_S = 300.0


class RequestAuthError(ValueError):
    """The request's signature headers are missing, malformed, stale or do not verify."""


def canonical(method: str, path: str, query: str, timestamp: str, body: bytes) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    return "\n".join((SCHEME, method.upper(), path, query, timestamp, digest)).encode()


def sign_request(
    key: ClientKey,
    method: str,
    path: str,
    query: str,
    body: bytes,
    *,
    now: float | None = None,
) -> dict[str, str]:
    """The headers that sign this request as ``key``'s client."""
    timestamp = str(int(time.time() if now is None else now))
    return {
        HEADER_KEY: key.public_key_b64,
        HEADER_TIME: timestamp,
        HEADER_SIGNATURE: key.sign(canonical(method, path, query, timestamp, body)),
    }


def verify_request(
    headers: Mapping[str, str],
    method: str,
    path: str,
    query: str,
    body: bytes,
    *,
    now: float | None = None,
    max_skew: float = DEFAULT_MAX_SKEW_S,
) -> str:
    """The client id that signed this request; raises :class:`RequestAuthError` otherwise.

    ``headers`` is looked up case-insensitively by the caller's mapping (Starlette's is).
    """
    key_b64 = headers.get(HEADER_KEY)
    timestamp = headers.get(HEADER_TIME)
    signature_b64 = headers.get(HEADER_SIGNATURE)
    if not key_b64 or not timestamp or not signature_b64:
        raise RequestAuthError("the request is not signed")
    if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 12:
        raise RequestAuthError("the request's timestamp is not unix seconds")
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > max_skew:
        raise RequestAuthError(
            f"the request's timestamp is more than {max_skew:g} s from the requester's clock"
        )
    try:
        public = public_key_of(key_b64)
        signature = base64.b64decode(signature_b64, validate=True)
    except (ClientKeyError, binascii.Error, ValueError) as exc:
        raise RequestAuthError(f"the request's key or signature cannot be read: {exc}") from exc
    try:
        public.key.verify(
            signature,
            canonical(method, path, query, timestamp, body),
            padding.PKCS1v15(),
            hashes.SHA256(),
        )
    except InvalidSignature as exc:
        raise RequestAuthError("the request's signature does not verify") from exc
    return public.client_id
