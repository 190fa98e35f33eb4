"""A thin streaming proxy to the publisher's content store, for ``shoal get`` / ``shoal put``.

Clients talk to one address (the requester); bytes are streamed through in both directions,
never buffered whole. ``GET /api/v1/content/{cid}`` -> ``{publisher_url}/content/{cid}`` and
``POST /api/v1/content`` -> ``{publisher_url}/content``, with query string and the headers that
describe the content (type, length, kind, CID) passed along.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from shoal_common.errors import InvalidInput, Unavailable
from shoal_requester.api.common import ServiceDep

router = APIRouter(prefix="/api/v1", tags=["content"])

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-encoding",
    }
)
_FORWARDED_REQUEST = ("content-type", "content-length", "range", "accept", "if-none-match")
_PIECE = 1 << 20


def _base(service: ServiceDep) -> str:
    url = service.settings.publisher_url
    if not url:
        raise Unavailable(
            "no content store is configured on this requester",
            hint="set SHOAL_REQUESTER_PUBLISHER_URL to the publisher's base URL",
        )
    return url


async def _forward(
    service: ServiceDep, request: Request, method: str, url: str, body: AsyncIterator[bytes] | None
) -> Response:
    client = service.http_client
    headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED_REQUEST}
    upstream = client.build_request(
        method, url, params=request.query_params, headers=headers, content=body
    )
    try:
        response = await client.send(upstream, stream=True)
    except httpx.HTTPError as exc:
        raise Unavailable(f"content store unreachable: {exc}") from exc
    out_headers = {k: v for k, v in response.headers.items() if k.lower() not in _HOP_BY_HOP}
    if "content-encoding" in response.headers:
        # aiter_bytes() decodes it, so the upstream length no longer applies.
        out_headers = {k: v for k, v in out_headers.items() if k.lower() != "content-length"}
    return StreamingResponse(
        # Passed on in 1 MiB pieces, not the 64 KiB network reads: each piece costs a trip
        # through the ASGI server (16 times fewer trips for a big download).
        response.aiter_bytes(_PIECE),
        status_code=response.status_code,
        headers=out_headers,
        background=BackgroundTask(response.aclose),
    )


@router.get("/content/{cid}", summary="Download content by CID (proxied to the publisher)")
async def get_content(cid: str, request: Request, service: ServiceDep) -> Response:
    if not cid or "/" in cid or cid.startswith("."):
        raise InvalidInput(f"{cid!r} is not a CID")
    return await _forward(service, request, "GET", f"{_base(service)}/content/{cid}", None)


@router.post("/content", summary="Upload content; answers its CID (proxied to the publisher)")
async def put_content(request: Request, service: ServiceDep) -> Response:
    return await _forward(service, request, "POST", f"{_base(service)}/content", request.stream())
