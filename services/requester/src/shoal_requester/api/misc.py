"""/version, /id, /node_info, /peers: what the reference system's apiclient can ask a node."""

from __future__ import annotations

import os
import platform
import sys
from functools import lru_cache
from importlib import metadata
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse

from shoal_requester.api.common import (
    FastJSONResponse,
    LegacyRoute,
    ServiceDep,
    body_schema,
    parse_model,
    read_body,
)
from shoal_requester.api.schemas import VersionRequest

router = APIRouter(route_class=LegacyRoute, tags=["node"])

_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


@lru_cache(maxsize=1)
def build_version_info() -> dict[str, str]:
    """The reference system's BuildVersionInfo shape (all strings), for this build."""
    try:
        version = metadata.version("shoal-requester")
    except metadata.PackageNotFoundError:
        version = "0.0.0"
    parts = [*version.split("."), "0", "0"][:2]
    return {
        "major": parts[0],
        "minor": parts[1],
        "gitversion": f"v{version}",
        "gitcommit": os.environ.get("SHOAL_GIT_COMMIT", ""),
        "builddate": os.environ.get("SHOAL_BUILD_DATE", ""),
        "goos": sys.platform,
        "goarch": _ARCH.get(platform.machine().lower(), platform.machine().lower()),
    }


@router.get("/version", summary="Build version of this requester")
async def version_get() -> Response:
    return FastJSONResponse({"build_version_info": build_version_info()})


@router.post(
    "/version",
    summary="Build version of this requester (apiclient form)",
    openapi_extra=body_schema(VersionRequest),
)
async def version_post(request: Request, service: ServiceDep) -> Response:
    body = await read_body(request, service.settings.max_body_bytes)
    if body.strip():
        parse_model(VersionRequest, body)
    return FastJSONResponse({"build_version_info": build_version_info()})


@router.get("/id", summary="This node's id", response_class=PlainTextResponse)
async def node_id(service: ServiceDep) -> Response:
    return PlainTextResponse(service.node_id)


@router.get("/node_info", summary="This node's info")
async def node_info(service: ServiceDep) -> Response:
    info: dict[str, Any] = {
        "PeerInfo": {"ID": service.node_id, "Addrs": []},
        "NodeType": "Requester",
        "Labels": {},
        "BacalhauVersion": build_version_info(),
    }
    return FastJSONResponse(info)


@router.get("/peers", summary="Compute nodes this requester knows")
async def peers(service: ServiceDep) -> Response:
    return FastJSONResponse(
        [
            {"id": n.id, "addrs": [n.info.content_url] if n.info.content_url else []}
            for n in service.inventory.all()
            if n.schedulable
        ]
    )
