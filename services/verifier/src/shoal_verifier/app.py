"""The verifier's HTTP app: health, metrics and the verification view of a job."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI

from shoal_common.httpapp import (
    NO_FASTAPI_TELEMETRY,
    MetricsMiddleware,
    health_router,
    install_error_handlers,
)
from shoal_verifier.api.routes import router

if TYPE_CHECKING:
    from shoal_verifier.service import VerifierService


def create_app(service: VerifierService) -> FastAPI:
    """The app a runner (devstack, ``shoal serve``) serves; the service owns its lifecycle."""
    app = FastAPI(telemetry=NO_FASTAPI_TELEMETRY, title="Shoal verifier", version="0.1.0")
    app.state.store = service.store
    install_error_handlers(app)
    app.add_middleware(MetricsMiddleware, service="verifier")
    app.include_router(health_router(service.ready))
    app.include_router(router)
    return app
