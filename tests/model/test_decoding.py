"""Encoded bytes to network inputs (``Detector.prepare_encoded``), checked on the CPU against
``Detector.prepare`` of the same image decoded by Pillow.

Tolerance: the batched path decodes JPEGs with torchvision's decoder (libjpeg-turbo on the
CPU, nvJPEG on a GPU), ``prepare`` with Pillow's. Two conforming JPEG decoders may differ by a
level or so per sample (ISO/IEC 10918-2 allows an inverse-DCT error of 1) and more where they
upsample chroma differently, which the resize then averages. So the inputs may differ by at
most 4 levels anywhere and 0.5 on average; on this CPU both use libjpeg-turbo and agree
exactly. On a GPU (marked ``gpu``) nvJPEG's inputs are held to the same bounds against
Pillow's, and the shipped model's confident boxes to a pixel.
"""

import io
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as TF

from model import Detector, decoding, ssd300_vgg16
from model.data.synthetic import SyntheticShapes
from model.decoding import orient, read_header
from tests.model.conftest import SHIPPED

pytestmark = pytest.mark.filterwarnings(  # torchvision 0.29 deprecates its decoders for torchcodec
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)
MAX_LEVELS, MEAN_LEVELS = 4.0, 0.5
ORIENTATION = 0x0112  # EXIF tag (CIPA DC-008)


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector(ssd300_vgg16(3, width=0.125).eval(), ["a", "b"])


def _photo(width: int = 640, height: int = 480) -> Image.Image:
    """A smooth gradient with noise: JPEG-like content with no symmetry."""
    generator = torch.Generator().manual_seed(0)
    ramp = (
        torch.linspace(0, 255, width)[None, :] * 0.6 + torch.linspace(0, 255, height)[:, None] * 0.4
    )
    rgb = torch.stack([ramp, ramp.flip(1), 255 - ramp])  # (3, H, W)
    rgb = rgb + torch.randint(-20, 21, rgb.shape, generator=generator)
    return Image.fromarray(rgb.clamp(0, 255).byte().permute(1, 2, 0).numpy())  # -> (H, W, 3)


def _encode(image: Image.Image, fmt: str = "JPEG", orientation: int = 1, **options) -> bytes:
    exif = Image.Exif()
    if orientation != 1:
        exif[ORIENTATION] = orientation
        options["exif"] = exif.tobytes()
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _reference(detector: Detector, data: bytes) -> tuple[torch.Tensor, tuple[int, int]]:
    """What the service makes of the bytes: Pillow, EXIF orientation applied, ``prepare``."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    return detector.prepare(image)


def _assert_close_inputs(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    diff = (ours - theirs).abs()
    assert diff.max() <= MAX_LEVELS and diff.mean() <= MEAN_LEVELS, (diff.max(), diff.mean())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_turns_the_pixels_as_pillow_does(orientation):
    stored = _photo(5, 3)
    exif = stored.getexif()
    exif[ORIENTATION] = orientation
    expected = TF.pil_to_tensor(ImageOps.exif_transpose(stored))
    assert torch.equal(orient(TF.pil_to_tensor(stored), orientation), expected)


def test_jpegs_in_one_batch_match_prepare(detector):
    encoded = [
        _encode(_photo(), quality=90, subsampling=0),
        _encode(_photo(300, 500), quality=75, subsampling=2),
        _encode(_photo(64, 48).convert("L")),  # greyscale: replicated to RGB
    ]
    batch, sizes = detector.prepare_encoded(encoded)
    assert batch.shape == (3, 3, 300, 300) and batch.dtype == torch.float32
    assert sizes == [(640, 480), (300, 500), (64, 48)]
    for row, data in zip(batch, encoded, strict=True):
        _assert_close_inputs(row, _reference(detector, data)[0])


def test_the_exif_orientation_is_applied_and_the_size_turned(detector):
    data = _encode(_photo(), orientation=6)
    assert read_header(data).orientation == 6
    batch, sizes = detector.prepare_encoded([data])
    expected, size = _reference(detector, data)
    assert sizes == [size] == [(480, 640)]
    _assert_close_inputs(batch[0], expected)


def test_other_formats_and_cmyk_jpegs_go_through_pillow_exactly(detector):
    rgba = _photo(50, 40).convert("RGBA")
    rgba.putalpha(128)
    encoded = [
        _encode(rgba, "PNG"),
        _encode(_photo(50, 40).convert("CMYK")),
        _encode(_photo(), "BMP"),
    ]
    assert [read_header(data).batch_decodable for data in encoded] == [False, False, False]
    batch, sizes = detector.prepare_encoded(encoded)
    for row, size, data in zip(batch, sizes, encoded, strict=True):
        expected, expected_size = _reference(detector, data)
        assert size == expected_size and torch.equal(row, expected)


def test_a_failed_batch_decode_falls_back_one_by_one(detector, monkeypatch):
    # The batch decoder returns nothing when one image fails; the others still decode.
    real = decoding.decode_jpeg
    seen = []

    def no_batches(data, **options):
        seen.append(len(data))
        if len(data) > 1:
            raise RuntimeError("nvjpeg: batch refused")
        return real(data, **options)

    monkeypatch.setattr(decoding, "decode_jpeg", no_batches)
    encoded = [_encode(_photo()), _encode(_photo(99, 77))]
    batch, sizes = detector.prepare_encoded(encoded)
    assert seen == [2, 1, 1] and sizes == [(640, 480), (99, 77)]
    _assert_close_inputs(batch[1], _reference(detector, encoded[1])[0])


def test_undecodable_images_are_named_by_index(detector):
    good = _encode(_photo(32, 32))
    truncated = good[: len(good) // 2]
    for bad in (truncated, b"\xff\xd8\xff\xe0" + b"garbage" * 10, b"not an image"):
        with pytest.raises(ValueError, match=r"encoded\[1\]: cannot decode"):
            detector.prepare_encoded([good, bad])
    with pytest.raises(ValueError, match="at least one image"):
        detector.prepare_encoded([])


def test_real_photos_match_prepare(detector, raccoon: Path):
    paths = sorted((raccoon / "JPEGImages").glob("*.jpg"))[:4]
    encoded = [path.read_bytes() for path in paths]
    batch, sizes = detector.prepare_encoded(encoded)
    for row, size, data in zip(batch, sizes, encoded, strict=True):
        expected, expected_size = _reference(detector, data)
        assert size == expected_size
        _assert_close_inputs(row, expected)


@pytest.mark.gpu
def test_on_a_gpu_nvjpeg_decodes_as_the_cpu_does_and_boxes_stay_within_a_pixel():
    if not SHIPPED.is_file():
        pytest.skip(f"no shipped model at {SHIPPED}")
    detector = Detector.load(SHIPPED, device="cuda", precision="fp32")
    photos = [
        Image.fromarray(image.permute(1, 2, 0).numpy())  # (3, H, W) -> (H, W, 3)
        for image, _ in (SyntheticShapes(8, split="test")[i] for i in range(8))
    ]
    encoded = [_encode(photo, quality=90) for photo in photos[:6]]
    encoded.append(_encode(photos[6], orientation=6, quality=90))
    encoded.append(_encode(photos[7].convert("L"), quality=90))
    assert all(read_header(data).batch_decodable for data in encoded)
    batch, sizes = detector.prepare_encoded(encoded)
    assert batch.device.type == "cuda"
    references = [_reference(detector, data) for data in encoded]
    assert sizes == [size for _, size in references]
    for row, (expected, _) in zip(batch, references, strict=True):
        _assert_close_inputs(row.cpu(), expected)
    count = len(encoded)
    settings = ([0.3] * count, [100] * count)
    ours = detector.run_batch(list(batch), sizes, *settings).detections
    theirs = detector.run_batch([inputs for inputs, _ in references], sizes, *settings)
    matched = 0
    for got, expected in zip(ours, theirs.detections, strict=True):
        for box, label, score in zip(expected.boxes, expected.labels, expected.scores, strict=True):
            if score <= 0.5:  # a detection near the threshold may fall either side of it
                continue
            same = [i for i, other in enumerate(got.labels) if other == label]
            assert same, (label, box)
            offsets = (got.boxes[same] - box).abs().amax(dim=1)  # pixels, per candidate
            assert float(offsets.min()) <= 1.0, (label, box, got.boxes[same])
            matched += 1
    assert matched >= count  # the shapes images hold at least one object each
