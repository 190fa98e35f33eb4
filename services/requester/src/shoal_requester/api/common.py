"""Request plumbing shared by the routers: the service dependency, bodies, JSON, errors."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import orjson
from fastapi import Depends, Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse

from shoal_common.errors import InvalidInput, PayloadTooLarge, ShoalError
from shoal_common.signing import SignatureError
from shoal_requester.domain.validation import describe_validation_error

if TYPE_CHECKING:
    from shoal_requester.service import RequesterService

M = TypeVar("M", bound=BaseModel)


class FastJSONResponse(JSONResponse):
    """JSON rendered by orjson (several times faster than the stdlib on job states)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


# async: FastAPI runs a plain ``def`` dependency in a worker thread, a thread hop per request.
async def get_service(request: Request) -> RequesterService:
    service: RequesterService = request.app.state.service
    return service


ServiceDep = Annotated["RequesterService", Depends(get_service)]


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) anything over ``limit`` bytes before buffering it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(
            f"request body of {declared} bytes is over the limit of {limit} bytes"
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_object(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise InvalidInput("the request body is empty: send a JSON object")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"malformed JSON in the request body: {exc}") from exc
    if not isinstance(value, dict):
        raise InvalidInput(f"the request body must be a JSON object, not {type(value).__name__}")
    return value


def parse_model(model: type[M], body: bytes) -> M:
    data = parse_object(body)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(f"invalid request: {describe_validation_error(exc)}") from exc


def legacy_error(status: int, code: str, message: str) -> Response:
    """An error as the Go requester sent it ({"Code", "Message", "Details", "Err"}).

    The official clients never parse error bodies; ``error`` repeats the message for clients
    (like Shoal's own) that look for a lower-case key.
    """
    body = {"Code": code, "Message": message, "Details": {}, "Err": message, "error": message}
    return FastJSONResponse(body, status_code=status)


def with_legacy_errors(
    handler: Callable[[Request], Coroutine[Any, Any, Response]],
) -> Callable[[Request], Coroutine[Any, Any, Response]]:
    """``handler`` answering Shoal's errors and bad signatures in the reference system's shape."""

    async def answer(request: Request) -> Response:
        try:
            return await handler(request)
        except ShoalError as exc:
            return legacy_error(exc.http_status, exc.code, exc.detail)
        except SignatureError as exc:
            # Go's words first (operators grep for them), then what exactly was wrong.
            message = f"{exc.message}: {exc.detail}" if exc.detail else exc.message
            return legacy_error(exc.http_status, "invalid_signature", message)

    return answer


class LegacyRoute(APIRoute):
    """Routes of the reference system's API: errors in its shape instead of problem+json."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return with_legacy_errors(super().get_route_handler())


def body_schema(model: type[BaseModel], description: str = "") -> dict[str, Any]:
    """``openapi_extra`` documenting a body the route reads itself (raw bytes are needed for
    signatures and size limits, so FastAPI does not parse it)."""
    return {
        "requestBody": {
            "required": True,
            "description": description,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
            },
        }
    }
