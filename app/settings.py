"""Service settings, read from ``SSD_*`` environment variables by pydantic-settings."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.weights.sources import is_published

ENV_PREFIX = "SSD_"
# The shipped default model (weights/README.md is its model card).
DEFAULT_WEIGHTS = Path("weights/ssd300_shapes.safetensors")
# Uploads still arriving this long before SSD_SHUTDOWN_TIMEOUT_S are cut, which leaves the
# queue's last batch and the answers to the cut uploads time to go out before the exit.
UPLOAD_CUT_MARGIN_S = 1.0
# What a name in SSD_MODELS may hold: it goes into URLs (?model=NAME, /models/NAME/reload)
# and metric labels as it is.
MODEL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class SettingsError(RuntimeError):
    """An invalid setting; the message names the environment variable and its value."""


class Settings(BaseSettings):
    """Every knob of the service. Each field ``name`` is the variable ``SSD_NAME``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    backend: Literal["torch", "onnxruntime"] = Field(
        default="torch",
        description="torch: serve checkpoints with PyTorch; onnxruntime: serve .onnx files "
        "from python -m model.export (full graph) with ONNX Runtime on the CPU, no torch needed",
    )
    weights: Path = Field(
        default=DEFAULT_WEIGHTS,
        description="checkpoint file (safetensors), or published weights by name: "
        "torchvision:coco or ssd.pytorch:PATH (model/weights/published.py); with "
        "SSD_BACKEND=onnxruntime, an .onnx file",
    )
    models: str = Field(
        default="",
        description="more models beside SSD_WEIGHTS, as NAME=SOURCE pairs separated by commas "
        "(a SOURCE as for SSD_WEIGHTS); a request picks one with ?model=NAME",
    )
    allow_reload: bool = Field(
        default=False,
        description="allow POST /models/NAME/reload (with API keys on, it takes an admin key); "
        "SIGHUP reloads every model whatever this says",
    )
    api_keys: str = Field(
        default="",
        description="API keys, separated by commas; any key given here or in the files below "
        "turns authentication on (app/auth.py). Off by default: anyone who can reach the port "
        "may detect",
    )
    api_keys_file: Path | None = Field(
        default=None, description="a file of API keys, one a line (# starts a comment)"
    )
    admin_keys: str = Field(
        default="",
        description="admin keys, separated by commas: they open every route, and they alone "
        "the reload route (without any, client keys open it)",
    )
    admin_keys_file: Path | None = Field(
        default=None, description="a file of admin keys, one a line (# starts a comment)"
    )
    cors_origins: str = Field(
        default="",
        description="origins whose pages may call the API from a browser, separated by commas "
        "(https://app.example.com), or * for any; off by default",
    )
    device: str = Field(
        default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto | cpu | cuda[:N]"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = Field(
        default="auto",
        description="auto: the fastest precision measured on the model at start-up "
        "(model/inference/autotune.py), int8 among them when its artifact is beside the weights; "
        "fp32, bf16, fp16, int8 force one",
    )
    max_batch_size: int = Field(default=8, ge=1, le=256, description="images per forward pass")
    max_wait_ms: float = Field(
        default=10.0, ge=0, le=10_000, description="longest wait of the oldest request for a batch"
    )
    max_queue: int = Field(default=64, ge=1, le=100_000, description="images waiting; more get 503")
    request_timeout_s: float = Field(
        default=10.0, gt=0, le=3600, description="deadline of a request, from arrival; then 504"
    )
    max_upload_bytes: int = Field(default=10 * 2**20, ge=1, description="largest request body")
    max_image_pixels: int = Field(
        default=40_000_000, ge=1, description="largest width x height, read from the image header"
    )
    max_images_per_request: int = Field(
        default=16, ge=1, le=1000, description="images in one POST /detect/batch"
    )
    score_threshold: float = Field(default=0.3, ge=0, le=1, description="default score_threshold")
    max_detections: int = Field(default=100, ge=1, le=1000, description="default max_detections")
    drain_s: float = Field(
        default=0.0,
        ge=0,
        le=600,
        description="after SIGTERM, seconds /readyz answers 503 before the server stops "
        "accepting connections (set it to the load balancer's probe period)",
    )
    # Kubernetes gives a pod 30 s from SIGTERM to SIGKILL (terminationGracePeriodSeconds);
    # 25 s leaves it room to see the exit.
    shutdown_timeout_s: float = Field(
        default=25.0,
        gt=0,
        le=3600,
        description="after SIGTERM, the longest the process lives (SSD_DRAIN_S included): "
        "uploads still arriving 1 s before it are cut, queued work finishes",
    )
    # Connection limits, enforced in front of the uvicorn that `python -m app` runs
    # (app/server.py, app/connection_guard.py).
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="a request's line and headers must arrive within this of the connection "
        "opening or of its first byte on a kept-alive one; then 408 and close",
    )
    max_header_bytes: int = Field(
        default=16_384,  # h11's default max_incomplete_event_size, and nginx's 2 x 8 KiB
        ge=1024,
        le=1_048_576,
        description="largest request line plus headers; more gets 431 and close",
    )
    keep_alive_s: float = Field(
        default=5.0, gt=0, le=600, description="an idle keep-alive connection closes after this"
    )
    body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="the whole request body must arrive within this of its headers; then 408",
    )
    min_body_rate: int = Field(
        default=16_384,
        ge=1,
        description="bytes per second a body must average (after a 2 s grace); slower gets 408",
    )
    max_connections: int = Field(
        default=256,
        ge=1,
        le=100_000,
        description="open connections at once; one more is answered 503 and closed",
    )
    # Decoding budget (app/images.py).
    max_jpeg_scans: int = Field(
        default=100,
        ge=1,
        le=10_000,
        description="most scans a JPEG may hold (progressive files from libjpeg have about "
        "10); more gets 413 before decoding",
    )
    decode_pixel_budget: int = Field(
        default=40_000_000,
        ge=1,
        description="pixels decoded and held at once across all requests (at least "
        "SSD_MAX_IMAGE_PIXELS); requests wait for room",
    )

    def model_sources(self) -> dict[str, Path]:
        """Every model by name, the default (SSD_WEIGHTS) first: it is named by its file name
        without extension, or by the published name."""
        default = str(self.weights) if is_published(self.weights) else self.weights.stem
        sources = {default: self.weights}
        for pair in filter(None, (part.strip() for part in self.models.split(","))):
            name, equals, source = (part.strip() for part in pair.partition("="))
            if not equals or not source:
                raise ValueError(f"SSD_MODELS: {pair!r} is not NAME=SOURCE")
            if not MODEL_NAME.fullmatch(name):
                raise ValueError(
                    f"SSD_MODELS: the name {name!r} must be 1 to 64 letters, digits, '_', '.' "
                    "or '-'"
                )
            if name in sources:
                raise ValueError(f"SSD_MODELS: two models are named {name!r}")
            sources[name] = Path(source)
        return sources

    @field_validator("api_keys_file", "admin_keys_file", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        """An empty file setting (as docker-compose.yml lists it) means no file."""
        return None if value == "" else value

    def cors_origin_list(self) -> list[str]:
        """SSD_CORS_ORIGINS as a list (empty: CORS off)."""
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]

    def keys(self) -> tuple[list[str], list[str]]:
        """The client keys and the admin keys, from the variables and the files.

        Raises:
            SettingsError: a file cannot be read, or a key holds whitespace; names the variable.
        """
        found = []
        for inline, path, name in (
            (self.api_keys, self.api_keys_file, "API_KEYS"),
            (self.admin_keys, self.admin_keys_file, "ADMIN_KEYS"),
        ):
            keys = [k.strip() for k in inline.split(",") if k.strip()]
            if path is not None:
                try:
                    lines = path.read_text(encoding="utf-8").splitlines()
                except (OSError, UnicodeDecodeError) as exc:
                    raise SettingsError(
                        f"invalid setting SSD_{name}_FILE={str(path)!r}: cannot read it ({exc})"
                    ) from None
                keys += [k.strip() for k in lines if k.strip() and not k.strip().startswith("#")]
            if any(len(k.split()) != 1 for k in keys):
                raise SettingsError(f"invalid setting SSD_{name}: a key may not hold whitespace")
            found.append(keys)
        return found[0], found[1]

    @model_validator(mode="after")
    def _limits_fit(self) -> Settings:
        self.model_sources()  # names every malformed entry of SSD_MODELS now, not at start-up
        if self.max_images_per_request > self.max_queue:
            raise ValueError(
                f"SSD_MAX_IMAGES_PER_REQUEST={self.max_images_per_request} is larger than "
                f"SSD_MAX_QUEUE={self.max_queue}, so such a request could never be queued"
            )
        if self.decode_pixel_budget < self.max_image_pixels:
            raise ValueError(
                f"SSD_DECODE_PIXEL_BUDGET={self.decode_pixel_budget} is smaller than "
                f"SSD_MAX_IMAGE_PIXELS={self.max_image_pixels}, so the largest image accepted "
                "could never be decoded"
            )
        if self.shutdown_timeout_s < self.drain_s + UPLOAD_CUT_MARGIN_S:
            raise ValueError(
                f"SSD_SHUTDOWN_TIMEOUT_S={self.shutdown_timeout_s} leaves no time after "
                f"SSD_DRAIN_S={self.drain_s}; it must be at least {UPLOAD_CUT_MARGIN_S} s more"
            )
        return self


def describe_error(error: ValidationError) -> str:
    """One line per invalid field, each naming its ``SSD_*`` variable and the value given."""
    lines = []
    for item in error.errors():
        if item["loc"]:
            name = ENV_PREFIX + str(item["loc"][0]).upper()
            lines.append(f"invalid setting {name}={item['input']!r}: {item['msg']}")
        else:  # a model-level check; its message names the variables itself
            lines.append(f"invalid settings: {item['msg'].removeprefix('Value error, ')}")
    return "; ".join(lines)


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once from the environment (``cache_clear()`` to re-read).

    Raises:
        SettingsError: a variable is invalid; the message names it.
    """
    try:
        return Settings()
    except ValidationError as exc:
        raise SettingsError(describe_error(exc)) from None
