"""The ASGI app ``app.main:app``: the app factory and its lifespan.

Importing this module builds the app but loads nothing; the lifespan reads the settings,
loads the models, warms them up and starts their batchers, and undoes it all on shutdown.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool

from app.access import AccessMiddleware
from app.auth import Keys
from app.cors import OptionalCors
from app.errors import install_error_handlers
from app.images import DecodePool
from app.lifecycle import Lifecycle
from app.memory import trim_periodically
from app.metrics import Metrics
from app.pipeline import ImageLimits, Pipeline
from app.registry import BatchLimits, Registry
from app.routes import deepstack, demo, detect, health, info, models
from app.service import Service
from app.settings import UPLOAD_CUT_MARGIN_S, Settings, SettingsError, get_settings
from app.signals import install_drain_handler, install_reload_handler
from model.network.detections import ServedDetector
from model.weights.sources import file_version, is_published

log = logging.getLogger("app")

DESCRIPTION = """SSD object detection with dynamic batching.

Boxes are xyxy, in pixels of the image as displayed (EXIF orientation applied). Every error is
JSON: `{"error": {"code": "...", "message": "..."}}`."""


def load_detector(source: Path, settings: Settings) -> ServedDetector:
    """The model at ``source`` (SSD_WEIGHTS or one of SSD_MODELS), on the backend, device and
    precision the settings name.

    Raises:
        SettingsError: the weights, device or precision cannot be used; names the variable.
    """
    if settings.backend == "onnxruntime":
        return _load_onnx(source, settings)
    return _load_torch(source, settings)


def model_version(source: Path, settings: Settings) -> str:
    """A model's version: the sha256 prefix of its file, or for the torch backend of the
    published file that a published name converts.

    Raises:
        OSError: the file cannot be read.
    """
    if settings.backend == "onnxruntime":
        return file_version(source)
    from model.weights.published import weights_version  # torch: only for this backend

    return weights_version(source)


def _variable(source: Path, settings: Settings) -> str:
    """``invalid setting SSD_WEIGHTS='...'`` (or SSD_MODELS), for error messages."""
    variable = "SSD_WEIGHTS" if source == settings.weights else "SSD_MODELS"
    return f"invalid setting {variable}={str(source)!r}"


def _load_onnx(source: Path, settings: Settings) -> ServedDetector:
    """An ``OnnxDetector`` for ``source``, an .onnx file (no torch is imported)."""
    from model.inference.onnx_detector import OnnxDetector, OnnxModelError

    weights = _variable(source, settings)
    if is_published(source):
        raise SettingsError(
            f"{weights}: SSD_BACKEND=onnxruntime serves .onnx files; export the weights "
            f"first (python -m model.export {source} --format onnx --out FILE.onnx)"
        )
    if settings.device not in ("auto", "cpu"):
        raise SettingsError(
            f"invalid setting SSD_DEVICE={settings.device!r}: SSD_BACKEND=onnxruntime runs "
            "on the CPU (auto or cpu)"
        )
    if settings.precision not in ("auto", "fp32", "int8"):
        raise SettingsError(
            f"invalid setting SSD_PRECISION={settings.precision!r}: SSD_BACKEND=onnxruntime "
            "runs the exported graph in the precision it was written in (auto, fp32 or int8)"
        )
    try:
        detector = OnnxDetector(source)
    except (FileNotFoundError, OnnxModelError) as exc:
        raise SettingsError(f"{weights}: {exc}") from None
    if settings.precision not in ("auto", detector.precision):
        raise SettingsError(
            f"invalid setting SSD_PRECISION={settings.precision!r}: {source} is an "
            f"{detector.precision} graph (python -m model.quantize --format onnx writes an "
            "int8 one); use auto"
        )
    if settings.max_detections > detector.max_detections:
        raise SettingsError(
            f"invalid setting SSD_MAX_DETECTIONS={settings.max_detections}: {source} keeps "
            f"{detector.max_detections} detections per image (python -m model.export "
            "--max-detections N)"
        )
    return detector


def _load_torch(source: Path, settings: Settings) -> ServedDetector:
    """A torch ``Detector`` for ``source``, a checkpoint or published weights."""
    from model.inference.detector import Detector
    from model.inference.runtime import resolve_device
    from model.weights.checkpoint import CheckpointError, read_metadata

    weights = _variable(source, settings)
    published = is_published(source)
    if published and settings.precision == "int8":
        raise SettingsError(
            f"{weights}: int8 runs a checkpoint file with its artifact beside it: convert the "
            f"weights first (python -m model.convert {source} --out FILE), then "
            "python -m model.quantize --weights FILE, and serve FILE"
        )
    try:
        if not published:  # cheap: names a wrong file before any weight loads
            read_metadata(source)
        device = resolve_device(settings.device)
    except CheckpointError as exc:
        raise SettingsError(f"{weights}: {exc}") from None
    except ValueError as exc:
        raise SettingsError(f"invalid setting SSD_DEVICE={settings.device!r}: {exc}") from None
    try:
        return Detector.load(source, device=device, precision=settings.precision)
    except CheckpointError as exc:
        raise SettingsError(f"{weights}: {exc}") from None
    except (FileNotFoundError, ValueError) as exc:
        if published:  # offline and not cached, or a file of another layout
            raise SettingsError(f"{weights}: {exc}") from None
        # int8 without its artifact, or on a GPU
        precision = f"invalid setting SSD_PRECISION={settings.precision!r}"
        raise SettingsError(f"{precision}: {exc}") from None


def build_service(config: Settings, detector: ServedDetector | None) -> Service:
    """The service's parts for ``config``, nothing loaded yet; ``detector``, if given, is the
    default model's first copy."""
    sources = config.model_sources()
    default = next(iter(sources))
    metrics = Metrics(config.max_batch_size)
    registry = Registry(
        sources,
        default,
        functools.partial(load_detector, settings=config),
        metrics,
        BatchLimits(
            max_batch_size=config.max_batch_size,
            max_wait_s=config.max_wait_ms / 1000,
            max_queue=config.max_queue,
        ),
        preloaded={default: detector} if detector is not None else None,
        version=functools.partial(model_version, settings=config),
    )
    lifecycle = Lifecycle()
    pipeline = Pipeline(
        registry,
        DecodePool(config.decode_pixel_budget),
        lifecycle,
        ImageLimits(max_pixels=config.max_image_pixels, max_jpeg_scans=config.max_jpeg_scans),
        request_timeout_s=config.request_timeout_s,
        score_threshold=config.score_threshold,
        max_detections=config.max_detections,
    )
    keys = Keys.of(*config.keys())
    if keys.on:
        log.info("API keys on: %d client keys, %d admin keys", len(keys.clients), len(keys.admins))
    else:
        log.info("API keys off: anyone who can reach the port may detect (SSD_API_KEYS)")
    return Service(config, metrics, registry, pipeline, lifecycle, keys)


def create_app(settings: Settings | None = None, detector: ServedDetector | None = None) -> FastAPI:
    """Build the app. ``settings`` default to ``get_settings()`` (read at start-up, not here);
    ``detector`` is the default model's first copy, loaded from ``settings.weights`` when
    not given (tests pass their own)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            service = build_service(settings or get_settings(), detector)
        except SettingsError as exc:
            log.error("cannot start: %s", exc)
            raise
        config, lifecycle, registry = service.settings, service.lifecycle, service.registry
        app.state.service = service
        loop = asyncio.get_running_loop()
        janitor = asyncio.create_task(trim_periodically(), name="ssd-malloc-trim")
        restore_sigterm = install_drain_handler(
            lambda: setattr(lifecycle, "draining", True),
            config.drain_s,
            loop,
            on_cut=lifecycle.cut_uploads.set,
            cut_after_s=config.shutdown_timeout_s - UPLOAD_CUT_MARGIN_S,
        )
        restore_sighup: Callable[[], None] | None = None
        try:
            try:
                await registry.start()
            except SettingsError as exc:
                log.error("cannot start: %s", exc)
                raise
            # Only now: a SIGHUP before every model is loaded would have nothing to reload.
            restore_sighup = install_reload_handler(registry.reload_all, loop)
            lifecycle.ready = True
            for line in registry.describe():
                log.info("serving %s", line)
            yield
        finally:
            lifecycle.draining = True
            if restore_sighup is not None:
                restore_sighup()
            restore_sigterm()
            await registry.stop()
            await run_in_threadpool(service.pipeline.pool.shutdown)
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
    app.add_middleware(OptionalCors)  # inside the access log: preflights are logged and counted
    app.add_middleware(AccessMiddleware)
    for module in (detect, deepstack, models, health, info, demo):
        app.include_router(module.router)
    return app


app = create_app()
