"""POST /detect and /detect/batch: response schema, query parameters, real detections, EXIF
frames, batches. In process (the app factory over httpx's ASGI transport)."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageOps

from app.schemas import DetectResponse
from model.inference.drawing import COLOURS
from tests.app.support import (
    CIRCLE_BOX,
    CLASS_NAMES,
    SHAPES_SIZE,
    SQUARE_BOX,
    box_tuple,
    encode,
    iou,
    shapes_image,
)

PHOTOS_PER_DATASET = 3

pytestmark = pytest.mark.anyio


def _photos(raccoon: Path, coco128: Path) -> list[Path]:
    raccoons = sorted((raccoon / "JPEGImages").glob("*.jpg"))[:PHOTOS_PER_DATASET]
    cocos = sorted((coco128 / "images").rglob("*.jpg"))[:PHOTOS_PER_DATASET]
    return raccoons + cocos


def _check_schema(body: dict, width: int, height: int, max_detections: int) -> None:
    assert set(body) == {"detections", "image", "model"}
    assert body["image"] == {"width": width, "height": height}
    assert set(body["model"]) == {"name", "version"}
    assert len(body["model"]["version"]) == 12
    detections = body["detections"]
    assert len(detections) <= max_detections
    scores = [d["score"] for d in detections]
    assert scores == sorted(scores, reverse=True)
    for d in detections:
        assert set(d) == {"label", "class_id", "score", "box"}
        assert d["label"] == CLASS_NAMES[d["class_id"] - 1]
        assert 0.0 <= d["score"] <= 1.0
        x_min, y_min, x_max, y_max = box_tuple(d)
        assert 0.0 <= x_min <= x_max <= width
        assert 0.0 <= y_min <= y_max <= height


async def test_response_schema_on_real_photos(
    client: httpx.AsyncClient, raccoon: Path, coco128: Path
) -> None:
    for path in _photos(raccoon, coco128):
        with Image.open(path) as image:
            width, height = ImageOps.exif_transpose(image).size
        data = path.read_bytes()
        response = await client.post(
            "/detect?score_threshold=0.05&max_detections=20",
            files={"image": (path.name, data, "image/jpeg")},
        )
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        _check_schema(response.json(), width, height, max_detections=20)


async def test_raw_body_and_multipart_give_the_same_answer(client: httpx.AsyncClient) -> None:
    data = encode(shapes_image(), "PNG")
    query = "?score_threshold=0.01&max_detections=7"
    raw = await client.post(
        "/detect" + query,
        content=data,
        headers={"Content-Type": "image/png"},
    )
    form = await client.post("/detect" + query, files={"image": ("s.png", data)})
    assert raw.status_code == form.status_code == 200
    assert raw.json() == form.json()
    assert len(raw.json()["detections"]) == 7  # random weights: many low-scoring boxes


async def test_batch_answers_in_upload_order(client: httpx.AsyncClient) -> None:
    sizes = [(320, 240), (200, 410), (500, 300)]
    files = [
        ("images", (f"{i}.png", encode(shapes_image(size), "PNG"), "image/png"))
        for i, size in enumerate(sizes)
    ]
    response = await client.post("/detect/batch?max_detections=3", files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [(r["image"]["width"], r["image"]["height"]) for r in results] == sizes
    for result, (width, height) in zip(results, sizes, strict=True):
        _check_schema(result, width, height, max_detections=3)


async def test_batch_states_its_cap(client: httpx.AsyncClient) -> None:
    png = encode(shapes_image((64, 64)), "PNG")
    files = [("images", (f"{i}.png", png, "image/png")) for i in range(17)]  # cap: 16
    response = await client.post("/detect/batch", files=files)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "bad_request"
    assert "16" in response.json()["error"]["message"]


async def test_batch_names_the_bad_image(client: httpx.AsyncClient) -> None:
    files = [
        ("images", ("ok.png", encode(shapes_image(), "PNG"), "image/png")),
        ("images", ("bad.gif", encode(shapes_image(), "GIF"), "image/gif")),
    ]
    response = await client.post("/detect/batch", files=files)
    assert response.status_code == 415
    assert response.json()["error"]["message"].startswith("images[1]: ")


async def test_batch_needs_multipart(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/detect/batch",
        content=encode(shapes_image(), "PNG"),
        headers={"Content-Type": "image/png"},
    )
    assert response.status_code == 415


def _exif_rotated_jpeg(displayed: Image.Image, orientation: int) -> bytes:
    """A JPEG whose stored pixels, once its EXIF orientation is applied, show ``displayed``."""
    # Orientation 6 is displayed by rotating 90 degrees clockwise, 8 counter-clockwise, so the
    # stored pixels are the displayed ones turned the other way.
    turn = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(displayed.transpose(turn), "JPEG", exif=exif.tobytes(), quality=95)


@pytest.mark.parametrize("orientation", [6, 8])
async def test_exif_rotated_jpeg_is_answered_in_the_displayed_frame(
    client: httpx.AsyncClient, orientation: int
) -> None:
    data = _exif_rotated_jpeg(shapes_image(), orientation)
    with Image.open(io.BytesIO(data)) as stored:
        assert stored.size == SHAPES_SIZE[::-1]  # stored portrait, displayed landscape
    response = await client.post(
        "/detect?score_threshold=0.01",
        content=data,
        headers={"Content-Type": "image/jpeg"},
    )
    assert response.status_code == 200, response.text
    width, height = SHAPES_SIZE
    _check_schema(response.json(), width, height, max_detections=100)


PNG_SHAPES = encode(shapes_image(), "PNG")


def _best(detections: list[dict], label: str, box: tuple[float, ...]) -> float:
    return max((iou(box_tuple(d), box) for d in detections if d["label"] == label), default=0.0)


async def test_shapes_are_found_with_the_right_labels_and_boxes(
    trained_client: httpx.AsyncClient,
) -> None:
    response = await trained_client.post(
        "/detect",
        content=encode(shapes_image(), "PNG"),
        headers={"Content-Type": "image/png"},
    )
    assert response.status_code == 200, response.text
    detections = response.json()["detections"]
    assert _best(detections, "circle", CIRCLE_BOX) >= 0.5, detections
    assert _best(detections, "square", SQUARE_BOX) >= 0.5, detections


@pytest.mark.parametrize("orientation", [6, 8])
async def test_exif_rotated_boxes_are_in_the_rotated_frame(
    trained_client: httpx.AsyncClient, orientation: int
) -> None:
    data = _exif_rotated_jpeg(shapes_image(), orientation)
    response = await trained_client.post(
        "/detect",
        content=data,
        headers={"Content-Type": "image/jpeg"},
    )
    assert response.status_code == 200, response.text
    detections = response.json()["detections"]
    assert _best(detections, "circle", CIRCLE_BOX) >= 0.5, detections
    assert _best(detections, "square", SQUARE_BOX) >= 0.5, detections


@pytest.mark.parametrize("orientation", [1, 6])
async def test_large_jpeg_decoded_at_reduced_scale_keeps_full_size_boxes(
    trained_client: httpx.AsyncClient, orientation: int
) -> None:
    """A 4800x3600 photo decodes at 1/8 scale (600x450, still twice the network's input), but
    the answer is in the full image's pixels: the same boxes as the 480x360 scene, times ten."""
    big = shapes_image().resize((4800, 3600), Image.Resampling.BICUBIC)
    data = (
        encode(big, "JPEG", quality=90)
        if orientation == 1
        else _exif_rotated_jpeg(big, orientation)
    )
    response = await trained_client.post("/detect", content=data)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["image"] == {"width": 4800, "height": 3600}
    scaled = [{**d, "box": {k: v / 10 for k, v in d["box"].items()}} for d in answer["detections"]]
    assert _best(scaled, "circle", CIRCLE_BOX) >= 0.8, scaled
    assert _best(scaled, "square", SQUARE_BOX) >= 0.8, scaled


async def test_classes_are_kept_before_the_cap_and_iou_threshold_is_the_nms(
    trained_client: httpx.AsyncClient,
) -> None:
    image = encode(shapes_image(), "PNG")

    async def detections(query: str) -> list[dict]:
        response = await trained_client.post(f"/detect?{query}", files={"image": image})
        assert response.status_code == 200, response.text
        return response.json()["detections"]

    everything = await detections("score_threshold=0.01&max_detections=1000")
    assert everything[0]["label"] == "circle"  # the best-scoring box is the circle's
    [square] = await detections("score_threshold=0.01&max_detections=1&classes=square")
    assert square == next(d for d in everything if d["label"] == "square")
    assert _best([square], "square", SQUARE_BOX) >= 0.5
    both = await detections("score_threshold=0.01&max_detections=1000&classes=square, circle")
    assert both == [d for d in everything if d["label"] in ("square", "circle")]
    # IoU 1 suppresses nothing, the default 0.45 some, 0.01 nearly every overlap in a class.
    loose = await detections("score_threshold=0.01&max_detections=1000&iou_threshold=1")
    tight = await detections("score_threshold=0.01&max_detections=1000&iou_threshold=0.01")
    assert len(loose) > len(everything) > len(tight) > 0
    # On the DeepStack route too, with its own answer shape.
    response = await trained_client.post(
        "/v1/vision/detection?classes=square",
        files={"image": image},
        data={"min_confidence": "0.3"},
    )
    assert {p["label"] for p in response.json()["predictions"]} == {"square"}


async def test_an_unknown_class_is_named_with_the_valid_ones(client: httpx.AsyncClient) -> None:
    response = await client.post("/detect?classes=circle,cat", files={"image": PNG_SHAPES})
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert "unknown classes ['cat']" in message and "circle, square, triangle" in message


@pytest.mark.parametrize(
    "query",
    [
        "score_threshold=1.5",
        "score_threshold=-0.1",
        "score_threshold=nan",
        "max_detections=0",
        "max_detections=1001",
        "max_detections=ten",
        "iou_threshold=1.5",
        "iou_threshold=-1",
        "classes=cat",
        "classes=,",
    ],
)
async def test_bad_parameters_are_422(client: httpx.AsyncClient, query: str) -> None:
    response = await client.post(
        f"/detect?{query}",
        content=encode(shapes_image(), "JPEG", quality=90),
        headers={"Content-Type": "image/jpeg"},
    )
    assert response.status_code == 422, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == "bad_request"
    assert body["error"]["message"]
    assert "Traceback" not in response.text


@pytest.mark.parametrize(
    ("size", "orientation", "how"),
    [((480, 360), 1, "query"), ((480, 360), 6, "accept"), ((4000, 3000), 1, "query")],
)
async def test_the_annotated_image_has_its_boxes_where_the_json_says(
    trained_client: httpx.AsyncClient, size: tuple[int, int], orientation: int, how: str
) -> None:
    scene = shapes_image().resize(size, Image.Resampling.BICUBIC)
    data = (
        encode(scene, "JPEG", quality=90)
        if orientation == 1
        else _exif_rotated_jpeg(scene, orientation)
    )
    query = "max_detections=2" + ("&format=jpeg" if how == "query" else "")
    headers = {"Accept": "image/jpeg"} if how == "accept" else {}
    response = await trained_client.post(f"/detect?{query}", files={"image": data}, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    answer = DetectResponse.model_validate_json(response.headers["x-detections"])
    drawn = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB")).astype(int)
    # The image as displayed, at full size (no reduced-scale decode), EXIF orientation applied.
    assert (drawn.shape[1], drawn.shape[0]) == (answer.image.width, answer.image.height) == size
    assert {d.label for d in answer.detections} == {"circle", "square"}
    for detection in answer.detections:
        colour = np.array(COLOURS[detection.class_id % len(COLOURS)])
        box = detection.box
        rows = range(int(box.y_min) + size[1] // 10, int(box.y_max) - 10, 7)
        for x in (int(box.x_min), int(box.x_max) - 1):
            on_line = [np.abs(drawn[y, x] - colour).max() < 60 for y in rows]
            assert np.mean(on_line) > 0.9, (detection.label, x)


async def test_json_stays_the_default_answer(trained_client: httpx.AsyncClient) -> None:
    response = await trained_client.post(
        "/detect", files={"image": PNG_SHAPES}, headers={"Accept": "application/json, image/jpeg"}
    )
    assert response.headers["content-type"] == "application/json"
    assert "x-detections" not in response.headers
