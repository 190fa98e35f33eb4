"""The requester's HTTP app: legacy API (root and /api/v1), Shoal's API, health and metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from shoal_common.httpapp import (
    NO_FASTAPI_TELEMETRY,
    DirectRoutes,
    MetricsMiddleware,
    health_router,
    install_error_handlers,
)
from shoal_requester.api import content, legacy, misc, shoal
from shoal_requester.api.auth import ApiAuthMiddleware
from shoal_requester.api.misc import build_version_info
from shoal_requester.api.schemas import BODY_MODELS
from shoal_requester.settings import ApiAuth

if TYPE_CHECKING:
    from shoal_requester.service import RequesterService


def create_app(service: RequesterService) -> FastAPI:
    """Routes bound to ``service`` (no lifespan: the service is started by its owner)."""
    app = FastAPI(
        telemetry=NO_FASTAPI_TELEMETRY,
        title="Shoal requester",
        version=build_version_info()["gitversion"],
        description=(
            "Bacalhau-compatible legacy API (/requester/*, also under /api/v1) and Shoal's own "
            "endpoints (/api/v1/jobs, /api/v1/nodes, /api/v1/events/stream, /api/v1/content)."
        ),
        openapi_url="/openapi.json",
    )
    app.state.service = service
    install_error_handlers(app)
    # Innermost of the three: a direct route is let in, counted and traced like any other.
    app.add_middleware(
        DirectRoutes, routes=legacy.direct_routes(), exception_handlers=app.exception_handlers
    )
    app.add_middleware(MetricsMiddleware, service="requester")
    if service.settings.api_auth is ApiAuth.PRIVATE:
        # Outermost: nothing runs for a request that is not let in.
        app.add_middleware(ApiAuthMiddleware, settings=service.settings)
    app.include_router(health_router(service.ready))
    app.include_router(legacy.router)
    app.include_router(legacy.router, prefix="/api/v1")
    app.include_router(misc.router)
    app.include_router(shoal.router)
    app.include_router(content.router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            # Bodies the routes read themselves (for signatures and size limits) are declared
            # with $refs; add their schemas here.
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in BODY_MODELS:
                definition = model.model_json_schema(
                    by_alias=True, ref_template="#/components/schemas/{model}"
                )
                components.update(definition.pop("$defs", {}))
                components[model.__name__] = definition
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
