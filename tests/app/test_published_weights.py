"""Serving published weights by name: ``SSD_WEIGHTS=torchvision:coco`` from a seeded torch
cache (torchvision's own ssd300_vgg16 with seeded random weights, ``tests/conftest.py``) in a
real ``python -m app``, compared with torchvision's own output on a coco128 photo."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import torch
from torchvision.models.detection import SSD300_VGG16_Weights
from torchvision.transforms.v2 import functional as TF

from app.main import create_app
from app.settings import Settings, SettingsError
from tests.app.support import PATIENCE_S, Server, chromium, in_process
from tests.model.weights.test_published import _photos
from tests.support.offline import use_refusing_proxy


def test_serves_torchvision_coco_with_coco_names(
    torchvision_standin: tuple[torch.nn.Module, Path], coco128: Path, tmp_path: Path
) -> None:
    # A real `python -m app`, as a user starts it: SSD_WEIGHTS names the weights, and torch's
    # cache (TORCH_HOME) holds the stand-in under torchvision's file name.
    reference, home = torchvision_standin
    env = {
        "SSD_WEIGHTS": "torchvision:coco",
        "SSD_DEVICE": "cpu",
        "SSD_PRECISION": "fp32",
        "TORCH_HOME": str(home),
    }
    server = Server(env, tmp_path / "server.log").wait_ready()
    path = sorted((coco128 / "images").glob("*.jpg"))[0]
    try:
        with httpx.Client(base_url=server.url, timeout=PATIENCE_S) as client:
            model = client.get("/model")
            detect = client.post(
                "/detect?score_threshold=0.05&max_detections=200",
                content=path.read_bytes(),
                headers={"content-type": "image/jpeg"},
            )
        shown = _demo_page_labels(server, path)
    finally:
        server.stop()
    assert model.status_code == 200 and len(model.json()["class_names"]) == 80
    assert model.json()["class_names"][:3] == ["person", "bicycle", "car"]
    assert detect.status_code == 200, detect.text
    body = detect.json()
    assert body["model"]["name"] == "torchvision:coco"
    [photo] = _photos(coco128)[:1]
    with torch.no_grad():
        [theirs] = reference([TF.pil_to_tensor(photo).float() / 255])
    keep = theirs["scores"] > 0.05
    categories = SSD300_VGG16_Weights.COCO_V1.meta["categories"]
    expected = sorted(categories[k] for k in theirs["labels"][keep].tolist())
    assert expected and sorted(d["label"] for d in body["detections"]) == expected
    # The demo page lists what it drew by COCO name: its own threshold (0.01, torchvision's
    # too) and cap, so among all that torchvision returns.
    assert shown and shown <= {categories[k] for k in theirs["labels"].tolist()}
    for found in body["detections"]:  # each pairs with one of torchvision's
        box = torch.tensor([found["box"][k] for k in ("x_min", "y_min", "x_max", "y_max")])
        assert any(
            float((b - box).abs().max()) <= 0.5 and abs(float(s) - found["score"]) <= 1e-4
            for b, s in zip(theirs["boxes"][keep], theirs["scores"][keep], strict=True)
        ), found


def _demo_page_labels(server: Server, photo: Path) -> set[str]:
    """The labels the demo page lists after ``photo`` is dropped on it, its slider at 0."""
    with chromium() as browser:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.set_input_files("#file", str(photo))
        page.wait_for_selector("#stage[data-state=drawn]", timeout=PATIENCE_S * 1000)
        page.locator("#threshold").fill("0")
        items = page.locator("#detections li.detection")
        return {items.nth(i).get_attribute("data-label") for i in range(items.count())}


def test_offline_start_names_the_url_and_the_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    use_refusing_proxy(monkeypatch)
    app = create_app(Settings(weights="torchvision:coco", device="cpu", precision="fp32"))

    async def start() -> None:
        async with in_process(app):
            pass

    with pytest.raises(SettingsError, match="SSD_WEIGHTS='torchvision:coco'") as caught:
        asyncio.run(start())
    assert SSD300_VGG16_Weights.COCO_V1.url in str(caught.value)
    assert "ssd300_vgg16_coco-b556d3b4.pth" in str(caught.value)
