"""Several models by name (``SSD_MODELS``, ``?model=``, ``/models``) and their reloads
(``app/registry.py``), in process: the model a request names answers, a reload swaps in the
file's new weights, a file that fails leaves the old copy serving, a request admitted to the
old copy finishes there, and the old copy is freed."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import shutil
import weakref
from pathlib import Path

import httpx
import pytest
import torch
from fastapi import FastAPI

from app.errors import ReloadFailedError
from app.main import create_app
from app.metrics import Metrics
from app.registry import BatchLimits, Registry
from app.settings import Settings, SettingsError, get_settings
from model import Detector, ssd300_vgg16
from model.weights.checkpoint import save_checkpoint
from tests.app.support import (
    CLASS_NAMES,
    DEFAULT_ENV,
    check_answer,
    detect_scope,
    encode,
    in_process,
    metric,
    settings_from,
    shapes_image,
)

PNG = encode(shapes_image(), "PNG")
# Class names of the second model, so that its answers cannot pass for the first's.
FRUIT = ("apple", "pear", "plum")


def _checkpoint(path: Path, seed: int, class_names: tuple[str, ...] = CLASS_NAMES) -> Path:
    torch.manual_seed(seed)
    network = ssd300_vgg16(len(class_names) + 1, width=0.125, batch_norm=True, preset="coco")
    save_checkpoint(path, network.eval(), list(class_names))
    return path


def _version(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def _replace(target: Path, source: Path) -> None:
    """Put ``source``'s bytes at ``target`` in one step, as a deploy or a trainer would."""
    staging = target.with_suffix(".partial")
    shutil.copyfile(source, staging)
    staging.replace(target)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two versions of a shapes model (seeds 1 and 2) and a fruit model."""
    folder = tmp_path_factory.mktemp("models")
    return {
        "shapes_v1": _checkpoint(folder / "shapes_v1.safetensors", 1),
        "shapes_v2": _checkpoint(folder / "shapes_v2.safetensors", 2),
        "fruit": _checkpoint(folder / "fruit.safetensors", 3, FRUIT),
    }


def _app(tmp_path: Path, checkpoints: dict[str, Path], **overrides: object) -> FastAPI:
    """An app serving ``served.safetensors`` (a copy of shapes v1) as the default model and
    the fruit model as ``fruit``."""
    served = tmp_path / "served.safetensors"
    shutil.copyfile(checkpoints["shapes_v1"], served)
    settings = settings_from(
        {**DEFAULT_ENV, "SSD_WEIGHTS": str(served), "SSD_MODELS": f"fruit={checkpoints['fruit']}"},
        precision="fp32",
        **overrides,
    )
    return create_app(settings)


def _detect(client: httpx.AsyncClient, query: str = "") -> asyncio.Future[httpx.Response]:
    return client.post(f"/detect?score_threshold=0{query}", content=PNG)


@pytest.mark.anyio
async def test_a_request_picks_its_model_by_name(
    tmp_path: Path, checkpoints: dict[str, Path], anyio_backend: str
) -> None:
    async with in_process(_app(tmp_path, checkpoints)) as client:
        default, fruit = await _detect(client), await _detect(client, "&model=fruit")
        named = await _detect(client, "&model=served")
        unknown = await _detect(client, "&model=nowhere")
        listed = (await client.get("/models")).json()
        text = (await client.get("/metrics")).text
    check_answer(default, 200, None)
    assert default.json()["model"] == {
        "name": "served",
        "version": _version(checkpoints["shapes_v1"]),
    }
    assert named.json() == default.json()
    assert fruit.json()["model"] == {"name": "fruit", "version": _version(checkpoints["fruit"])}
    assert {d["label"] for d in fruit.json()["detections"]} <= set(FRUIT)
    assert {d["label"] for d in default.json()["detections"]} <= set(CLASS_NAMES)
    check_answer(unknown, 404, "unknown_model")
    assert "'nowhere'" in unknown.json()["error"]["message"]
    assert "served, fruit" in unknown.json()["error"]["message"]
    assert listed == {
        "models": [
            {
                "name": "served",
                "version": _version(checkpoints["shapes_v1"]),
                "default": True,
                "class_names": list(CLASS_NAMES),
                "input_size": 300,
                "device": "cpu",
                "precision": "fp32",
            },
            {
                "name": "fruit",
                "version": _version(checkpoints["fruit"]),
                "default": False,
                "class_names": list(FRUIT),
                "input_size": 300,
                "device": "cpu",
                "precision": "fp32",
            },
        ]
    }
    for name, images in (("served", 2), ("fruit", 1)):  # each model's series, by its name
        assert metric(text, "ssd_images_total", model=name) == images
        assert metric(text, "ssd_batch_size_count", model=name) == images
        assert metric(text, "ssd_queue_capacity", model=name) == 64
        decodes = metric(text, "ssd_stage_duration_seconds_count", model=name, stage="decode")
        assert decodes == images
    assert metric(text, "ssd_model_info", model="fruit", version=_version(checkpoints["fruit"]))
    assert metric(text, "ssd_rejected_total", reason="bad_request") == 1  # the unknown name


@pytest.mark.anyio
async def test_reload_is_off_unless_allowed(
    tmp_path: Path, checkpoints: dict[str, Path], anyio_backend: str
) -> None:
    async with in_process(_app(tmp_path, checkpoints)) as client:
        response = await client.post("/models/served/reload")
    check_answer(response, 403, "reload_disabled")
    assert "SSD_ALLOW_RELOAD" in response.json()["error"]["message"]


@pytest.mark.anyio
async def test_reload_swaps_in_the_new_file_and_a_bad_file_leaves_the_old_serving(
    tmp_path: Path, checkpoints: dict[str, Path], anyio_backend: str
) -> None:
    served = tmp_path / "served.safetensors"
    v1, v2 = _version(checkpoints["shapes_v1"]), _version(checkpoints["shapes_v2"])
    async with in_process(_app(tmp_path, checkpoints, allow_reload=True)) as client:
        before = await _detect(client)
        _replace(served, checkpoints["shapes_v2"])
        reloaded = await client.post("/models/served/reload")
        after = await _detect(client)
        served.write_bytes(b"\x00" * 64)  # a damaged file (a copy cut short, say)
        damaged = await client.post("/models/served/reload")
        still = await _detect(client)
        unknown = await client.post("/models/nowhere/reload")
        fruit = await _detect(client, "&model=fruit")
        listed = (await client.get("/models")).json()["models"][0]
        text = (await client.get("/metrics")).text
    assert before.json()["model"]["version"] == v1
    assert reloaded.status_code == 200 and reloaded.json()["version"] == v2
    assert after.json()["model"]["version"] == v2
    assert after.json()["detections"] != before.json()["detections"]  # other weights answer
    check_answer(damaged, 422, "reload_failed")
    message = damaged.json()["error"]["message"]
    assert str(served) in message and f"version {v2} goes on serving" in message
    check_answer(still, 200, None)
    assert still.json() == after.json()
    check_answer(unknown, 404, "unknown_model")
    check_answer(fruit, 200, None)  # the other model was not touched
    assert listed["version"] == v2
    assert metric(text, "ssd_model_reloads_total", model="served", result="ok") == 1
    assert metric(text, "ssd_model_reloads_total", model="served", result="failed") == 1
    assert metric(text, "ssd_model_info", model="served", version=v2) == 1
    assert f'version="{v1}"' not in text  # the old copy's info series is gone


async def _stalled_post(app: FastAPI, body: bytes, release: asyncio.Event) -> dict:
    """POST ``body`` to /detect through the ASGI interface, its upload stalling after 8 bytes
    until ``release`` is set; the JSON answer."""
    scope = detect_scope(len(body), b"score_threshold=0")
    chunks = [body[:8], body[8:]]
    sent: list[dict] = []

    async def receive() -> dict:
        if len(chunks) == 1:
            await release.wait()
        if chunks:
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}
        await asyncio.Event().wait()  # a client that stays until answered
        raise AssertionError("unreachable")

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    [start] = [m for m in sent if m["type"] == "http.response.start"]
    assert start["status"] == 200, sent
    return json.loads(
        b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    )


@pytest.mark.anyio
async def test_a_request_admitted_to_the_old_copy_finishes_there_and_the_copy_is_freed(
    tmp_path: Path, checkpoints: dict[str, Path], anyio_backend: str
) -> None:
    served = tmp_path / "served.safetensors"
    v1, v2 = _version(checkpoints["shapes_v1"]), _version(checkpoints["shapes_v2"])
    app = _app(tmp_path, checkpoints, allow_reload=True)
    async with in_process(app) as client:
        registry = app.state.service.registry
        old = weakref.ref(registry.get().detector)
        old_fruit = weakref.ref(registry.get("fruit").detector)
        release = asyncio.Event()
        stalled = asyncio.create_task(_stalled_post(app, PNG, release))
        while registry.get().batcher.admitted == 0:  # admitted to v1, its upload stalled
            await asyncio.sleep(0.01)
        _replace(served, checkpoints["shapes_v2"])
        reload = asyncio.create_task(client.post("/models/served/reload"))
        while registry.get().ref.version != v2:  # switched while the old copy has a request
            await asyncio.sleep(0.01)
        fresh = await _detect(client)
        assert not reload.done()  # the reload waits for the old copy's request
        release.set()
        answer = await stalled
        reloaded = await reload
        fruit = await client.post("/models/fruit/reload")
        gc.collect()
        freed = old() is None and old_fruit() is None
        text = (await client.get("/metrics")).text
    assert answer["model"]["version"] == v1
    assert fresh.json()["model"]["version"] == v2
    assert reloaded.status_code == 200 and reloaded.json()["version"] == v2
    assert fruit.status_code == 200
    assert freed, [gc.get_referrers(copy()) for copy in (old, old_fruit) if copy() is not None]
    for name in ("served", "fruit"):
        assert metric(text, "ssd_model_copies", model=name) == 1


class _FailsWarmUp(Detector):
    def warm_up(self) -> None:
        raise RuntimeError("injected warm-up failure")


def test_a_copy_that_fails_its_warm_up_is_not_switched_to(checkpoints: dict[str, Path]) -> None:
    loads: list[type[Detector]] = [Detector, _FailsWarmUp]

    def load(source: Path) -> Detector:
        return loads.pop(0).load(source, device="cpu", precision="fp32")

    async def scenario() -> tuple[str, str]:
        limits = BatchLimits(max_batch_size=2, max_wait_s=0.0, max_queue=4)
        registry = Registry({"m": checkpoints["shapes_v1"]}, "m", load, Metrics(2), limits)
        await registry.start()
        first = registry.get()
        with pytest.raises(ReloadFailedError) as failed:
            await registry.reload("m")
        message = failed.value.message
        still = registry.get()
        await registry.stop()
        assert still is first and type(still.detector) is Detector
        return message, still.ref.version

    message, version = asyncio.run(scenario())
    assert "injected warm-up failure" in message
    assert version == _version(checkpoints["shapes_v1"])


@pytest.mark.parametrize(
    ("models", "complaint"),
    [
        ("fruit", "'fruit' is not NAME=SOURCE"),
        ("fruit=", "'fruit=' is not NAME=SOURCE"),
        ("a b=x.safetensors", "the name 'a b' must be"),
        ("ssd300_shapes=x.safetensors", "two models are named 'ssd300_shapes'"),
        ("x=a.safetensors,x=b.safetensors", "two models are named 'x'"),
    ],
)
def test_malformed_model_lists_are_named(
    monkeypatch: pytest.MonkeyPatch, models: str, complaint: str
) -> None:
    monkeypatch.setenv("SSD_MODELS", models)
    get_settings.cache_clear()
    try:
        with pytest.raises(SettingsError, match="SSD_MODELS") as error:
            get_settings()
    finally:
        get_settings.cache_clear()
    assert complaint in str(error.value)


def test_model_sources_keep_the_default_first() -> None:
    settings = Settings(weights=Path("w/a.safetensors"), models=" b = w/b.safetensors , c=c:x ")
    assert settings.model_sources() == {
        "a": Path("w/a.safetensors"),
        "b": Path("w/b.safetensors"),
        "c": Path("c:x"),
    }
    published = Settings(weights=Path("torchvision:coco"))
    assert list(published.model_sources()) == ["torchvision:coco"]
