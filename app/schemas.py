"""Response bodies, as the OpenAPI documentation shows them. Boxes are xyxy pixels."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Box(BaseModel):
    """A box in pixels of the image as displayed (EXIF orientation applied), xyxy."""

    x_min: float = Field(description="left edge, pixels from the image's left")
    y_min: float = Field(description="top edge, pixels from the image's top")
    x_max: float = Field(description="right edge, pixels")
    y_max: float = Field(description="bottom edge, pixels")


class Detection(BaseModel):
    """One detected object."""

    label: str = Field(description="class name")
    class_id: int = Field(ge=1, description="class index, 1..C-1 (0 is the background)")
    score: float = Field(ge=0, le=1, description="confidence")
    box: Box


class ImageSize(BaseModel):
    """The image's size in pixels, after its EXIF orientation is applied."""

    width: int
    height: int


class ModelRef(BaseModel):
    """Which model answered."""

    name: str = Field(
        description="the model's name: SSD_WEIGHTS's file name without extension (or its "
        "published name), or its name in SSD_MODELS"
    )
    version: str = Field(description="first 12 hex digits of the checkpoint's sha256")


class DetectResponse(BaseModel):
    """Detections in one image, sorted by score, descending."""

    detections: list[Detection]
    image: ImageSize
    model: ModelRef


class BatchResponse(BaseModel):
    """One result per uploaded image, in upload order."""

    results: list[DetectResponse]


class ErrorDetail(BaseModel):
    """What went wrong."""

    code: str = Field(description="machine-readable, e.g. invalid_image, too_large, timeout")
    message: str = Field(description="human-readable, naming the value that was wrong")
    request_id: str | None = Field(
        default=None, description="the request's X-Request-ID (given by the client or made)"
    )


class ErrorResponse(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


class Status(BaseModel):
    """A health or readiness answer."""

    status: str


class BatchingInfo(BaseModel):
    """The dynamic batching settings."""

    max_batch_size: int
    max_wait_ms: float
    max_queue: int
    request_timeout_s: float
    max_images_per_request: int


class ModelSummary(BaseModel):
    """One model the server has, as the copy serving now describes it."""

    name: str = Field(description="what ?model= takes")
    version: str = Field(description="first 12 hex digits of the checkpoint's sha256")
    default: bool = Field(description="whether a request that names no model gets this one")
    class_names: list[str] = Field(description="names of class ids 1..C-1")
    input_size: int = Field(description="network input side, pixels (images are resized)")
    device: str
    precision: str


class ModelList(BaseModel):
    """Every model the server has, the default first."""

    models: list[ModelSummary]


class ModelInfo(BaseModel):
    """The model being served and how requests are batched."""

    name: str
    version: str = Field(description="first 12 hex digits of the checkpoint's sha256")
    class_names: list[str] = Field(description="names of class ids 1..C-1")
    input_size: int = Field(description="network input side, pixels (images are resized)")
    device: str
    precision: str
    batching: BatchingInfo


class DeepStackPrediction(BaseModel):
    """One detected object, as DeepStack and CodeProject.AI give it: integer pixels."""

    label: str = Field(description="class name")
    confidence: float = Field(ge=0, le=1)
    x_min: int = Field(description="left edge, pixels from the image's left")
    y_min: int = Field(description="top edge, pixels from the image's top")
    x_max: int = Field(description="right edge, pixels")
    y_max: int = Field(description="bottom edge, pixels")


class DeepStackResponse(BaseModel):
    """The DeepStack detection answer: predictions sorted by confidence, descending."""

    success: bool = True
    predictions: list[DeepStackPrediction]
    count: int = Field(description="the number of predictions")
    model: ModelRef


class DeepStackError(BaseModel):
    """A DeepStack-shaped error: ``success`` false, the HTTP status kept."""

    success: bool = False
    error: str = Field(description="human-readable, naming the value that was wrong")
    code: int = Field(description="the HTTP status")
    reason: str = Field(description="machine-readable, as /detect's error code")
    request_id: str | None = None
