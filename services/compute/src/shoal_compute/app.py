"""The compute node's small HTTP app: its content endpoint plus health and metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI

from shoal_common.httpapp import (
    NO_FASTAPI_TELEMETRY,
    MetricsMiddleware,
    health_router,
    install_error_handlers,
)
from shoal_compute.api.content import router as content_router

if TYPE_CHECKING:
    from shoal_compute.service import ComputeService


def create_app(service: ComputeService) -> FastAPI:
    """FastAPI app of one node; its lifecycle belongs to the service (no lifespan here)."""
    app = FastAPI(
        telemetry=NO_FASTAPI_TELEMETRY,
        title="Shoal compute node",
        version="0.1.0",
        docs_url=None,
        redoc_url=None,
    )
    app.state.content_cache = service.cache
    install_error_handlers(app)
    app.add_middleware(MetricsMiddleware, service="compute")

    async def ready() -> bool:
        return service.ready

    app.include_router(health_router(ready))
    app.include_router(content_router)

    @app.get("/node", summary="This node's info, as in its heartbeats")
    async def node_info() -> dict[str, object]:
        return service.node_info().model_dump(mode="json")

    return app
