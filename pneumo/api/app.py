"""``create_app(settings)``: the FastAPI application of the staff API and worklist page."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

import pneumo
from pneumo.api import batches, fhir, metrics, pages, studies
from pneumo.api.auth import NotSignedIn
from pneumo.api.context import ApiContext

if TYPE_CHECKING:
    from pneumo.settings import Settings

__all__ = ["create_app"]

_HERE = Path(__file__).resolve().parent


def _model_card_dir() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("model")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "weights"


def _reprocessor(settings: Settings) -> Callable[[str], int]:
    """``Intake.reprocess`` for ``settings``, built on first use (no broker contact before)."""
    intake: Any = None

    def reprocess(study_uid: str) -> int:
        nonlocal intake
        if intake is None:
            from pneumo.celery_app import build_app
            from worker.intake import Intake

            intake = Intake(config=settings.worker_config(), app=build_app(settings))
        return int(intake.reprocess(study_uid))

    return reprocess


def create_app(settings: Settings) -> FastAPI:
    """The staff API (``/api``), FHIR (``/fhir``) and pages (``/``) over ``settings``' database."""
    app = FastAPI(
        title="pneumo staff API",
        version=pneumo.__version__,
        description="Pneumonia triage results for radiology staff. Every result is "
        "UNVERIFIED until a radiologist reads the study. Authenticate with "
        "`Authorization: Bearer <token>` (`pneumo tokens create`).",
    )
    app.state.context = ApiContext(
        database_url=settings.effective_database_url,
        broker_url=settings.effective_broker_url,
        data_dir=settings.data_dir,
        max_image_pixels_bits=settings.max_image_pixels_bits,
        model_card_dir=_model_card_dir(),
        heartbeat_stale_seconds=settings.heartbeat_stale_seconds,
        retrieve_purged=settings.pacs is not None,
        reprocess=_reprocessor(settings),
    )
    app.include_router(studies.router)
    app.include_router(batches.router)
    app.include_router(fhir.router)
    app.include_router(pages.router)
    app.include_router(metrics.router_for(settings))
    app.mount("/static", StaticFiles(directory=_HERE / "static"), name="static")

    @app.exception_handler(NotSignedIn)
    def _to_signin(_request: Request, _exc: NotSignedIn) -> RedirectResponse:
        return RedirectResponse("/signin", status_code=303)

    @app.middleware("http")
    async def _security_headers(request: Request, call_next):  # type: ignore[no-untyped-def]
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        if not request.url.path.startswith(("/docs", "/redoc")):
            response.headers.setdefault(
                "Content-Security-Policy",
                "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
            )
        return response

    return app
