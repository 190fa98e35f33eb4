"""Credentials for private clusters (requester ``api_auth=private``): a bearer token, or every
request signed with the client's key (shoal_common.request_auth). Open clusters need neither."""

from __future__ import annotations

import os
from collections.abc import Callable, Generator

import httpx

from shoal_common.request_auth import sign_request
from shoal_common.signing import ClientKey

TOKEN_ENV = "SHOAL_API_TOKEN"
SIGN_ENV = "SHOAL_API_SIGN_REQUESTS"


def token_from_env() -> str | None:
    return os.environ.get(TOKEN_ENV) or None


def sign_from_env() -> bool:
    return os.environ.get(SIGN_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class RequestAuth(httpx.Auth):
    """Adds ``Authorization: Bearer`` when a token is set, else signature headers when asked."""

    def __init__(self, *, token: str | None, sign: bool, key: Callable[[], ClientKey]) -> None:
        self._token = token
        self._sign = sign
        self._key = key
        # The signature covers the body: httpx must read it first (not needed otherwise).
        self.requires_request_body = sign and not token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self._token:
            request.headers["Authorization"] = f"Bearer {self._token}"
        elif self._sign:
            path, _, query = request.url.raw_path.decode("ascii").partition("?")
            request.headers.update(
                sign_request(self._key(), request.method, path, query, request.content)
            )
        yield request
