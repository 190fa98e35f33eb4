"""Optional API auth for private clusters (``api_auth=private``): every API request, reads
included, must carry a bearer token or a request signature by an allowed client.

An ASGI middleware rather than a dependency: it has to cover every route (legacy, Shoal's own,
the event stream, content) and read the raw body a signature covers before any route does.
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shoal_common.errors import Forbidden, PayloadTooLarge, ShoalError, Unauthorized
from shoal_common.httpapp import problem_response
from shoal_common.request_auth import HEADER_SIGNATURE, RequestAuthError, verify_request
from shoal_requester.settings import RequesterSettings

# Open whatever the mode: probes, scraping, discovery.
OPEN_PATHS = frozenset(
    {
        "/healthz",
        "/livez",
        "/readyz",
        "/metrics",
        "/version",
        "/api/v1/version",
        "/openapi.json",
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
    }
)


class ApiAuthMiddleware:
    """Lets a request in on a valid bearer token, or a valid signature by an allowed client."""

    def __init__(self, app: ASGIApp, *, settings: RequesterSettings) -> None:
        self.app = app
        # Digests, compared in constant time; the tokens themselves are not kept here.
        self._tokens = [
            hashlib.sha256(t.get_secret_value().encode()).digest() for t in settings.api_tokens
        ]
        self._clients = frozenset(settings.api_clients)
        self._max_skew = settings.api_auth_max_skew
        self._max_body = settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        authorization = headers.get("authorization", "")
        if authorization[:7].lower() == "bearer " and self._tokens:
            if self._token_ok(authorization[7:].strip()):
                await self.app(scope, receive, send)
                return
            await self._refuse(scope, receive, send, Unauthorized("the bearer token is not valid"))
            return
        if HEADER_SIGNATURE.lower() in headers and self._clients:
            await self._signed(scope, receive, send, headers)
            return
        ways = " or ".join(
            w
            for w, on in (
                ("send 'Authorization: Bearer <token>'", bool(self._tokens)),
                ("sign the request (SHOAL_API_SIGN_REQUESTS=1)", bool(self._clients)),
            )
            if on
        )
        await self._refuse(
            scope, receive, send, Unauthorized(f"this cluster's API is private: {ways}")
        )

    def _token_ok(self, token: str) -> bool:
        given = hashlib.sha256(token.encode()).digest()
        ok = False
        for known in self._tokens:  # no early exit: the time does not say which one matched
            ok |= hmac.compare_digest(given, known)
        return ok

    async def _signed(self, scope: Scope, receive: Receive, send: Send, headers: Headers) -> None:
        body, more = await self._read_body(receive)
        if more:
            err: ShoalError = PayloadTooLarge(
                f"a signed request's body is limited to {self._max_body} bytes",
                hint="use a bearer token for bigger uploads",
            )
            await self._refuse(scope, receive, send, err)
            return
        raw_path = scope.get("raw_path") or scope["path"].encode()
        try:
            client_id = verify_request(
                headers,
                scope["method"],
                raw_path.decode("latin-1"),
                scope.get("query_string", b"").decode("latin-1"),
                body,
                max_skew=self._max_skew,
            )
        except RequestAuthError as exc:
            await self._refuse(scope, receive, send, Unauthorized(str(exc)))
            return
        if client_id not in self._clients:
            err = Forbidden(f"client {client_id} is not allowed on this cluster")
            await self._refuse(scope, receive, send, err)
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read_body(self, receive: Receive) -> tuple[bytes, bool]:
        """The whole body, or (what was read, True) once it passes the limit."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks), False
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body:
                return b"", True
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), False

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, err: ShoalError) -> None:
        response = problem_response(err)
        if err.http_status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="shoal"'
        await response(scope, receive, send)
