"""Settings from SSD_* variables; an invalid one is refused with a message naming it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.settings import DEFAULT_WEIGHTS, SettingsError, get_settings


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """A clean SSD_* environment and an empty settings cache, restored afterwards."""
    for key in [k for k in os.environ if k.startswith("SSD_")]:
        monkeypatch.delenv(key)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def test_defaults(fresh: pytest.MonkeyPatch) -> None:
    settings = get_settings()
    assert settings.weights == DEFAULT_WEIGHTS == Path("weights/ssd300_shapes.safetensors")
    assert (settings.device, settings.precision) == ("auto", "auto")
    assert (settings.score_threshold, settings.max_detections) == (0.3, 100)
    assert get_settings() is settings  # cached


def test_values_come_from_prefixed_variables(fresh: pytest.MonkeyPatch) -> None:
    fresh.setenv("SSD_MAX_BATCH_SIZE", "4")
    fresh.setenv("SSD_MAX_WAIT_MS", "2.5")
    fresh.setenv("SSD_DEVICE", "cuda:1")
    fresh.setenv("SSD_WEIGHTS", "/tmp/x.safetensors")
    fresh.setenv("MAX_BATCH_SIZE", "99")  # no prefix: ignored
    settings = get_settings()
    assert settings.max_batch_size == 4
    assert settings.max_wait_ms == 2.5
    assert settings.device == "cuda:1"
    assert settings.weights == Path("/tmp/x.safetensors")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SSD_MAX_BATCH_SIZE", "zero"),
        ("SSD_MAX_BATCH_SIZE", "0"),
        ("SSD_MAX_WAIT_MS", "-1"),
        ("SSD_MAX_QUEUE", "0"),
        ("SSD_REQUEST_TIMEOUT_S", "0"),
        ("SSD_MAX_UPLOAD_BYTES", "lots"),
        ("SSD_MAX_IMAGE_PIXELS", "-5"),
        ("SSD_SCORE_THRESHOLD", "1.5"),
        ("SSD_MAX_DETECTIONS", "0"),
        ("SSD_DEVICE", "gpu"),
        ("SSD_PRECISION", "fp8"),
    ],
)
def test_invalid_setting_names_the_variable(
    fresh: pytest.MonkeyPatch, name: str, value: str
) -> None:
    fresh.setenv(name, value)
    with pytest.raises(SettingsError, match=f"{name}={value!r}"):
        get_settings()


def test_inconsistent_settings_name_both_variables(fresh: pytest.MonkeyPatch) -> None:
    fresh.setenv("SSD_MAX_QUEUE", "4")
    fresh.setenv("SSD_MAX_IMAGES_PER_REQUEST", "8")
    with pytest.raises(SettingsError, match=r"SSD_MAX_IMAGES_PER_REQUEST=8.*SSD_MAX_QUEUE=4"):
        get_settings()
