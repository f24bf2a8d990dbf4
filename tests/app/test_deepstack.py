"""The DeepStack API (/v1/vision/detection, /v1/vision/custom/NAME) through the clients its users
run: deepstack-python (what Home Assistant's integration uses) and codeproject-ai-api, against
a real server serving the shipped model, with the tiny one as a custom model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from codeprojectai.core import CodeProjectAIException, CodeProjectAIObject
from deepstack.core import DeepstackException, DeepstackObject

from tests.app.support import (
    CIRCLE_BOX,
    DEFAULT_ENV,
    SQUARE_BOX,
    Server,
    encode,
    iou,
    metric,
    shapes_image,
)

JPEG = encode(shapes_image(), "JPEG", quality=95)


@pytest.fixture(scope="module")
def served(
    shipped_weights: Path, tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """The shipped model as the default, the tiny one as the custom model "tiny"."""
    env = {**DEFAULT_ENV, "SSD_WEIGHTS": str(shipped_weights), "SSD_MODELS": f"tiny={tiny_weights}"}
    log = tmp_path_factory.mktemp("deepstack") / "server.log"
    running = Server(env, log).wait_ready()
    yield running
    running.stop()


def _detect_json(server: Server, threshold: float, model: str | None = None) -> list[dict]:
    params = {"score_threshold": threshold, **({"model": model} if model else {})}
    response = httpx.post(f"{server.url}/detect", params=params, files={"image": JPEG})
    assert response.status_code == 200, response.text
    return response.json()["detections"]


def test_deepstack_python_gets_the_detections_of_detect(served):
    client = DeepstackObject(ip="127.0.0.1", port=served.port, min_confidence=0.3, timeout=30)
    predictions = client.detect(JPEG)
    expected = _detect_json(served, 0.3)
    # The shipped model finds the circle and the square, and the two APIs agree on every one.
    assert {p["label"] for p in predictions} >= {"circle", "square"}
    assert [p["label"] for p in predictions] == [d["label"] for d in expected]
    for prediction, detection in zip(predictions, expected, strict=True):
        assert prediction["confidence"] == pytest.approx(detection["score"], abs=1e-4)
        box = detection["box"]
        for key in ("x_min", "y_min", "x_max", "y_max"):
            assert isinstance(prediction[key], int)
            assert abs(prediction[key] - box[key]) <= 0.5
    best = {p["label"]: p for p in reversed(predictions)}  # the highest score of each label
    for label, truth in (("circle", CIRCLE_BOX), ("square", SQUARE_BOX)):
        found = tuple(best[label][k] for k in ("x_min", "y_min", "x_max", "y_max"))
        assert iou(found, truth) > 0.7, (label, found)
    # Sorted by confidence, as Frigate's DeepStack detector expects (it stops at the first
    # below its threshold).
    confidences = [p["confidence"] for p in predictions]
    assert confidences == sorted(confidences, reverse=True)


def test_min_confidence_is_the_score_threshold(served):
    low = DeepstackObject(ip="127.0.0.1", port=served.port, min_confidence=0.05, timeout=30)
    high = DeepstackObject(ip="127.0.0.1", port=served.port, min_confidence=0.9, timeout=30)
    many, few = low.detect(JPEG), high.detect(JPEG)
    assert len(many) == len(_detect_json(served, 0.05)) > len(few)
    assert all(p["confidence"] > 0.9 for p in few)


def test_custom_models_by_name_in_both_clients(served):
    expected = _detect_json(served, 0.01, model="tiny")
    deepstack = DeepstackObject(
        ip="127.0.0.1", port=served.port, min_confidence=0.01, custom_model="tiny", timeout=30
    )
    codeproject = CodeProjectAIObject(
        ip="127.0.0.1", port=served.port, min_confidence=0.01, custom_model="tiny", timeout=30
    )
    for predictions in (deepstack.detect(JPEG), codeproject.detect(JPEG)):
        assert [p["label"] for p in predictions] == [d["label"] for d in expected]
    raw = httpx.post(f"{served.url}/v1/vision/custom/tiny", files={"image": JPEG}).json()
    assert raw["success"] is True and raw["model"]["name"] == "tiny"
    assert raw["count"] == len(raw["predictions"])
    # A name the server does not have: deepstack-python's "bad url" error on a 404.
    missing = DeepstackObject(ip="127.0.0.1", port=served.port, custom_model="nope", timeout=30)
    with pytest.raises(DeepstackException, match="Bad url"):
        missing.detect(JPEG)


def test_errors_keep_their_status_in_deepstacks_shape(served):
    cases = [
        ("detection", {"image": b"not an image"}, {}, 415, "unsupported_type"),
        ("detection", {"image": JPEG[:200]}, {}, 400, "invalid_image"),
        ("detection", {"picture": JPEG}, {}, 422, "bad_request"),
        ("detection", {"image": JPEG}, {"min_confidence": "high"}, 422, "bad_request"),
        ("detection", {"image": JPEG}, {"min_confidence": "1.5"}, 422, "bad_request"),
        ("custom/nope", {"image": JPEG}, {}, 404, "unknown_model"),
    ]
    for path, files, data, status, reason in cases:
        response = httpx.post(f"{served.url}/v1/vision/{path}", files=files, data=data)
        assert response.status_code == status, (path, data, response.text)
        body = response.json()
        assert body["success"] is False and body["code"] == status and body["reason"] == reason
        assert body["error"] and body["request_id"] == response.headers["x-request-id"]
    assert (
        "min_confidence must be a number from 0 to 1, got 'high'"
        in httpx.post(
            f"{served.url}/v1/vision/detection",
            files={"image": JPEG},
            data={"min_confidence": "high"},
        ).json()["error"]
    )
    # The clients raise on the error statuses rather than returning nothing.
    client = CodeProjectAIObject(ip="127.0.0.1", port=served.port, timeout=30)
    with pytest.raises(CodeProjectAIException, match="error: 415"):
        client.detect(b"not an image")


def test_the_routes_are_counted_under_their_own_label(served):
    def count(route: str) -> float:
        text = httpx.get(f"{served.url}/metrics").text
        return metric(text, "ssd_requests_total", route=route, status="200")

    before = count("/v1/vision/detection"), count("/v1/vision/custom/{model}")
    DeepstackObject(ip="127.0.0.1", port=served.port, timeout=30).detect(JPEG)
    DeepstackObject(ip="127.0.0.1", port=served.port, custom_model="tiny", timeout=30).detect(JPEG)
    after = count("/v1/vision/detection"), count("/v1/vision/custom/{model}")
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1)
