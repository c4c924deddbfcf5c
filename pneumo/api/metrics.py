"""``/metrics``: Prometheus text exposition of :mod:`pneumo.metrics` (no token, no PHI).

Scrapers rarely carry a bearer token, and nothing here identifies a patient:
labels are statuses, queue and stage names, destinations, model versions and
worker node names (docs/SECURITY.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pneumo.metrics import build_registry

if TYPE_CHECKING:
    from pneumo.settings import Settings

__all__ = ["router_for"]


def router_for(settings: Settings) -> APIRouter:
    """A router serving ``GET /metrics`` over ``settings``' database and broker."""
    registry = build_registry(settings)
    router = APIRouter()

    @router.get("/metrics", tags=["health"], summary="Prometheus metrics", include_in_schema=True)
    def get_metrics() -> Response:
        # A plain (sync) handler: FastAPI runs it in its thread pool, so the
        # database and broker reads never block the event loop.
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router
