"""The publisher's HTTP app: content store API, kubo RPC subset, publications, health."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from shoal_common.httpapp import (
    NO_FASTAPI_TELEMETRY,
    MetricsMiddleware,
    health_router,
    install_error_handlers,
)
from shoal_publisher.api import content, kubo, publications
from shoal_publisher.api.deps import ContentContext

if TYPE_CHECKING:
    from shoal_publisher.service import PublisherService


def create_app(service: PublisherService) -> FastAPI:
    """The app a runner (devstack, ``shoal serve``) serves; the service owns its lifecycle."""
    app = FastAPI(
        telemetry=NO_FASTAPI_TELEMETRY, title="Shoal publisher and content store", version="0.1.0"
    )
    settings = service.settings
    app.state.store = service.store
    app.state.content = ContentContext(
        store=service.content,
        staging=settings.staging_dir,
        max_upload_bytes=settings.max_upload_bytes,
    )
    app.state.node_name = f"shoal-publisher-{settings.node_id or 'local'}"
    install_error_handlers(app)

    @app.exception_handler(kubo.KuboError)
    async def _kubo_error(_: Request, exc: kubo.KuboError) -> JSONResponse:
        return exc.response()

    app.add_middleware(MetricsMiddleware, service="publisher")
    app.include_router(health_router(service.ready))
    app.include_router(content.router)
    app.include_router(kubo.router)
    app.include_router(publications.router)
    return app
