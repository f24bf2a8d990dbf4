"""The ASGI app ``app.main:app``: the app factory and its lifespan.

Importing this module builds the app but loads nothing; the lifespan reads the settings,
loads the model, warms it up and starts the batcher, and undoes it all on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool

from app.access import AccessMiddleware
from app.batcher import Batcher
from app.decoding import DecodePool
from app.errors import install_error_handlers
from app.memory import trim_periodically
from app.metrics import Metrics
from app.routes import demo, detect, health, info
from app.service import Service, model_ref
from app.settings import UPLOAD_CUT_MARGIN_S, Settings, SettingsError, get_settings
from app.shutdown import install_drain_handler
from model import Detector
from model.inference.runtime import resolve_device
from model.weights.checkpoint import CheckpointError, read_metadata
from model.weights.published import is_published

log = logging.getLogger("app")

DESCRIPTION = """SSD object detection with dynamic batching.

Boxes are xyxy, in pixels of the image as displayed (EXIF orientation applied). Every error is
JSON: `{"error": {"code": "...", "message": "..."}}`."""


def load_detector(settings: Settings) -> Detector:
    """The model named by the settings, on its device and precision.

    Raises:
        SettingsError: the weights, device or precision cannot be used; names the variable.
    """
    weights = f"invalid setting SSD_WEIGHTS={str(settings.weights)!r}"
    published = is_published(settings.weights)
    if published and settings.precision == "int8":
        raise SettingsError(
            f"{weights}: int8 runs a checkpoint file with its artifact beside it: convert the "
            f"weights first (python -m model.convert {settings.weights} --out FILE), then "
            "python -m model.quantize --weights FILE, and serve FILE"
        )
    try:
        if not published:  # cheap: names a wrong file before any weight loads
            read_metadata(settings.weights)
        device = resolve_device(settings.device)
    except CheckpointError as exc:
        raise SettingsError(f"{weights}: {exc}") from None
    except ValueError as exc:
        raise SettingsError(f"invalid setting SSD_DEVICE={settings.device!r}: {exc}") from None
    try:
        return Detector.load(settings.weights, device=device, precision=settings.precision)
    except CheckpointError as exc:
        raise SettingsError(f"{weights}: {exc}") from None
    except (FileNotFoundError, ValueError) as exc:
        if published:  # offline and not cached, or a file of another layout
            raise SettingsError(f"{weights}: {exc}") from None
        # int8 without its artifact, or on a GPU
        precision = f"invalid setting SSD_PRECISION={settings.precision!r}"
        raise SettingsError(f"{precision}: {exc}") from None


def create_app(settings: Settings | None = None, detector: Detector | None = None) -> FastAPI:
    """Build the app. ``settings`` default to ``get_settings()`` (read at start-up, not here);
    ``detector`` defaults to the one ``settings.weights`` names (tests pass their own)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            config = settings or get_settings()
            model = (
                detector if detector is not None else await run_in_threadpool(load_detector, config)
            )
        except SettingsError as exc:
            log.error("cannot start: %s", exc)
            raise
        metrics = Metrics(config.max_batch_size)
        batcher = Batcher(
            model,
            metrics,
            max_batch_size=config.max_batch_size,
            max_wait_s=config.max_wait_ms / 1000,
            max_queue=config.max_queue,
        )
        ref = await run_in_threadpool(model_ref, config.weights)
        decoder = DecodePool(config.decode_pixel_budget)
        service = Service(config, model, batcher, metrics, ref, decoder)
        metrics.model_info.labels(
            name=ref.name, version=ref.version, device=str(model.device), precision=model.precision
        ).set(1)
        app.state.service = service
        await batcher.start()
        janitor = asyncio.create_task(trim_periodically(), name="ssd-malloc-trim")
        restore_sigterm = install_drain_handler(
            lambda: setattr(service, "draining", True),
            config.drain_s,
            asyncio.get_running_loop(),
            on_cut=service.cut_uploads.set,
            cut_after_s=config.shutdown_timeout_s - UPLOAD_CUT_MARGIN_S,
        )
        try:
            await batcher.warm_up()
            service.ready = True
            log.info(
                "serving %s %s on %s in %s", ref.name, ref.version, model.device, model.precision
            )
            yield
        finally:
            service.draining = True
            restore_sigterm()
            await batcher.stop()
            await run_in_threadpool(decoder.shutdown)
            janitor.cancel()

    # FastAPIOffline serves /docs and /redoc with their scripts from the package itself, so
    # the pages work on a host with no way out to a CDN.
    app = FastAPIOffline(
        title="SSD detection service",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(AccessMiddleware)
    for module in (detect, health, info, demo):
        app.include_router(module.router)
    return app


app = create_app()
