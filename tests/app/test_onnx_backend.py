"""``SSD_BACKEND=onnxruntime``: the service serving an exported ``full`` graph through ONNX
Runtime. A real server started with torch made unimportable answers /detect over real HTTP,
and its answers equal the torch service's on the same photos (labels equal, boxes within
0.5 px); the settings that cannot work with it are named at start."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.main import create_app, load_detector
from app.settings import SettingsError
from model import Detector
from model.export import export_onnx
from tests.app.support import (
    DEFAULT_ENV,
    SHIPPED_WEIGHTS,
    Server,
    encode,
    in_process,
    metric,
    settings_from,
    shapes_image,
)
from tests.conftest import SHARED
from tests.support.matching import assert_same_detections

BOX_PX = 0.5  # the bar for "the same detections"
# Imported before anything else by the server's interpreter (PYTHONPATH): torch and
# torchvision become unimportable, as on a host without them.
NO_TORCH = """import sys
for name in ("torch", "torchvision"):
    sys.modules[name] = None  # import raises ModuleNotFoundError
"""


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder whose sitecustomize.py blocks torch; checked to block it."""
    folder = tmp_path_factory.mktemp("no_torch")
    (folder / "sitecustomize.py").write_text(NO_TORCH)
    probe = subprocess.run(
        [sys.executable, "-c", "import torch"],
        env={"PYTHONPATH": str(folder)},
        capture_output=True,
        text=True,
    )
    assert probe.returncode != 0 and "torch" in probe.stderr
    return folder


@pytest.fixture(scope="module")
def onnx_server(
    shapes_onnx: Path, no_torch: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """``python -m app`` serving the exported shipped model, torch unimportable."""
    env = {
        **DEFAULT_ENV,
        "SSD_BACKEND": "onnxruntime",
        "SSD_WEIGHTS": str(shapes_onnx),
        "PYTHONPATH": str(no_torch),
    }
    running = Server(env, tmp_path_factory.mktemp("onnx") / "server.log").wait_ready()
    yield running
    running.stop()


@pytest.fixture
async def torch_fp32_client(shipped_weights: Path, anyio_backend: str) -> AsyncIterator:
    """The torch service in process, serving the shipped model in fp32, the precision of
    the exported graph (``auto`` may pick int8 or bf16, which answer differently)."""
    env = {**DEFAULT_ENV, "SSD_WEIGHTS": str(shipped_weights), "SSD_PRECISION": "fp32"}
    detector = Detector.load(shipped_weights, device="cpu", precision="fp32")
    async with in_process(create_app(settings_from(env), detector)) as running:
        yield running


def _uploads() -> list[tuple[str, bytes, str]]:
    """(name, bytes, content type): the test scene, a small one, and coco128 photos."""
    files = [
        ("scene", encode(shapes_image(), "PNG"), "image/png"),
        ("small", encode(shapes_image((240, 300)), "JPEG", quality=90), "image/jpeg"),
    ]
    for path in sorted((SHARED / "coco128" / "images").glob("*.jpg"))[:3]:
        files.append((path.name, path.read_bytes(), "image/jpeg"))
    return files


def _same_answers(ours: list[dict], theirs: list[dict]) -> None:
    """Labels equal, boxes within ``BOX_PX``, in score order (the answers round scores to 4
    decimals: scores within 2e-4 may come in either order)."""

    def columns(answer: list[dict]) -> tuple[list[str], np.ndarray, np.ndarray]:
        keys = ("x_min", "y_min", "x_max", "y_max")
        boxes = np.array([[d["box"][k] for k in keys] for d in answer]).reshape(-1, 4)
        return [d["label"] for d in answer], boxes, np.array([d["score"] for d in answer])

    assert_same_detections(columns(ours), columns(theirs), box_px=BOX_PX, tie=2e-4)


QUERIES = [
    {},
    {"score_threshold": "0.05", "max_detections": "50"},
    {"score_threshold": "0.05", "classes": "circle,star", "iou_threshold": "0.7"},
]


@pytest.mark.anyio
async def test_onnx_runtime_service_answers_as_the_torch_service(
    onnx_server: Server, torch_fp32_client: httpx.AsyncClient
):
    found = 0
    for name, data, content_type in _uploads():
        for query in QUERIES:
            headers = {"Content-Type": content_type}
            ours = httpx.post(
                onnx_server.url + "/detect", params=query, content=data, headers=headers
            )
            theirs = await torch_fp32_client.post(
                "/detect", params=query, content=data, headers=headers
            )
            assert ours.status_code == theirs.status_code == 200, (name, ours.text)
            _same_answers(ours.json()["detections"], theirs.json()["detections"])
            found += len(theirs.json()["detections"])
    assert found > 20


def test_onnx_runtime_service_reports_its_model_and_batches(onnx_server: Server):
    models = httpx.get(onnx_server.url + "/models").json()["models"]
    assert models[0]["device"] == "cpu" and models[0]["precision"] == "fp32"
    assert models[0]["class_names"][:2] == ["circle", "square"]
    before = metric(onnx_server.metrics(), "ssd_images_total", model="shapes")
    files = [("images", (f"{i}.png", encode(shapes_image(), "PNG"), "image/png")) for i in range(3)]
    answer = httpx.post(onnx_server.url + "/detect/batch", files=files)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert len(results) == 3 and all(r["detections"] == results[0]["detections"] for r in results)
    assert metric(onnx_server.metrics(), "ssd_images_total", model="shapes") == before + 3


def test_more_detections_than_the_file_keeps_get_422(onnx_server: Server):
    answer = httpx.post(
        onnx_server.url + "/detect",
        params={"max_detections": "500"},
        content=encode(shapes_image(), "PNG"),
        headers={"Content-Type": "image/png"},
    )
    assert answer.status_code == 422
    assert "max_detections 500 is more than the 200" in answer.json()["error"]["message"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SSD_WEIGHTS": "torchvision:coco"}, "serves .onnx files; export the weights first"),
        ({"SSD_DEVICE": "cuda"}, "SSD_DEVICE='cuda': SSD_BACKEND=onnxruntime runs on the CPU"),
        ({"SSD_PRECISION": "int8"}, "SSD_PRECISION='int8'"),
        ({"SSD_MAX_DETECTIONS": "500"}, "SSD_MAX_DETECTIONS=500: .* keeps 200"),
    ],
)
def test_settings_that_cannot_work_are_named(shapes_onnx: Path, env: dict, message: str):
    settings = settings_from({"SSD_BACKEND": "onnxruntime", "SSD_WEIGHTS": str(shapes_onnx), **env})
    with pytest.raises(SettingsError, match=message):
        load_detector(settings.weights, settings)


def test_a_checkpoint_is_not_an_onnx_file(shipped_weights: Path):
    settings = settings_from({"SSD_BACKEND": "onnxruntime", "SSD_WEIGHTS": str(shipped_weights)})
    with pytest.raises(SettingsError, match=r"SSD_WEIGHTS=.*not a readable ONNX model"):
        load_detector(settings.weights, settings)


@pytest.fixture(scope="module")
def shapes_int8_onnx(shapes_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The exported shipped model's ONNX Runtime INT8 graph, calibrated on 16 images."""
    from model.data.synthetic import SyntheticShapes
    from model.inference.onnx_int8 import quantize_onnx

    samples = SyntheticShapes(16, split="train")
    images = [Image.fromarray(samples[i][0].permute(1, 2, 0).numpy()) for i in range(16)]
    return quantize_onnx(shapes_onnx, images, tmp_path_factory.mktemp("int8") / "s.int8.onnx")


def test_an_int8_graph_is_served_without_torch(
    shapes_int8_onnx: Path, onnx_server: Server, no_torch: Path, tmp_path: Path
):
    env = {**DEFAULT_ENV, "SSD_BACKEND": "onnxruntime", "SSD_WEIGHTS": str(shapes_int8_onnx),
           "SSD_PRECISION": "int8", "PYTHONPATH": str(no_torch)}  # fmt: skip
    server = Server(env, tmp_path / "server.log").wait_ready()
    try:
        models = httpx.get(server.url + "/models").json()["models"]
        assert models[0]["precision"] == "int8"
        headers = {"Content-Type": "image/png"}
        data = encode(shapes_image(), "PNG")
        ours = httpx.post(server.url + "/detect", content=data, headers=headers)
        theirs = httpx.post(onnx_server.url + "/detect", content=data, headers=headers)
    finally:
        server.stop()
    assert ours.status_code == theirs.status_code == 200, ours.text
    # int8 rounding moves scores a little, not what is found: the same confident labels
    confident = [
        sorted(d["label"] for d in answer.json()["detections"] if d["score"] >= 0.5)
        for answer in (ours, theirs)
    ]
    assert confident[0] == confident[1] and confident[1]


def test_a_precision_the_file_is_not_in_is_named(shapes_int8_onnx: Path):
    env = {"SSD_BACKEND": "onnxruntime", "SSD_WEIGHTS": str(shapes_int8_onnx)}
    settings = settings_from({**env, "SSD_PRECISION": "fp32"})
    with pytest.raises(SettingsError, match=r"SSD_PRECISION='fp32': .* is an int8 graph"):
        load_detector(settings.weights, settings)
    assert load_detector(settings_from(env).weights, settings_from(env)).precision == "int8"


@pytest.mark.anyio
async def test_several_onnx_models_serve_and_reload(shapes_onnx: Path, tmp_path: Path):
    # SSD_MODELS names .onnx files too; a reload loads the replaced file, with its version.
    second = tmp_path / "second.onnx"
    second.write_bytes(shapes_onnx.read_bytes())
    env = {
        **DEFAULT_ENV,
        "SSD_BACKEND": "onnxruntime",
        "SSD_WEIGHTS": str(shapes_onnx),
        "SSD_MODELS": f"other={second}",
        "SSD_ALLOW_RELOAD": "true",
    }
    async with in_process(create_app(settings_from(env))) as client:
        models = (await client.get("/models")).json()["models"]
        assert [m["name"] for m in models] == ["shapes", "other"]
        image = encode(shapes_image(), "PNG")
        headers = {"Content-Type": "image/png"}
        answer = await client.post("/detect?model=other", content=image, headers=headers)
        assert answer.status_code == 200 and answer.json()["model"]["name"] == "other"
        first = answer.json()["detections"]
        fresh = tmp_path / "fresh.onnx"
        export_onnx(SHIPPED_WEIGHTS, fresh, max_detections=150)  # another file: new version
        fresh.replace(second)
        reloaded = await client.post("/models/other/reload")
        assert reloaded.status_code == 200, reloaded.text
        after = await client.post("/detect?model=other", content=image, headers=headers)
        assert after.json()["model"]["version"] != answer.json()["model"]["version"]
        _same_answers(after.json()["detections"], first)
