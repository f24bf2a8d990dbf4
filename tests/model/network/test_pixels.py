"""``model.network.pixels``, the torch-free preparation the ONNX Runtime backend runs, against
the torch path (``model.network.preprocessing.preprocess``) on the same images: equal up to
float rounding for ``"bilinear"``, and within the integer rounding of two ports of one filter
for ``"antialias"`` (the module docstring says why)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from model.data.synthetic import SyntheticShapes
from model.network.pixels import PIXEL_MEAN, prepare_image
from model.network.preprocessing import preprocess, to_rgb_tensor
from tests.app.support import shapes_image
from tests.conftest import SHARED

# float32 rounding of values up to 255 (ulp 1.5e-5), with torch's and numpy's blends summed
# in other orders: measured at most 0.0033 on coco128 photos.
BILINEAR_ATOL = 0.01
# torchvision's AVX2 uint8 kernel rounds the filter weights to <= 15 bits, Pillow to 22: the
# rounded results differ by at most 2 levels (measured), and on a small share of values.
ANTIALIAS_MAX = 2.0
ANTIALIAS_MEAN = 0.5


def _images() -> list[Image.Image]:
    """Photos (coco128, where present), synthetic scenes, the test scene, a tiny image (so
    both resizes also enlarge) and images in other colour modes."""
    photos = [Image.open(p) for p in sorted((SHARED / "coco128" / "images").glob("*.jpg"))[:4]]
    samples = SyntheticShapes(2, split="test")
    synthetic = [Image.fromarray(samples[i][0].permute(1, 2, 0).numpy()) for i in range(2)]
    tiny = Image.fromarray(np.arange(7 * 9 * 3, dtype=np.uint8).reshape(7, 9, 3) * 3)
    rgba = shapes_image().convert("RGBA")
    rgba.putalpha(128)
    return [*photos, *synthetic, shapes_image(), tiny, rgba, shapes_image().convert("L")]


@pytest.mark.parametrize("size", [300, 512])
@pytest.mark.parametrize("resize", ["antialias", "bilinear"])
def test_prepared_like_the_torch_path(resize: str, size: int):
    worst, means = 0.0, []
    for image in _images():
        ours, image_size = prepare_image(image, size, PIXEL_MEAN, resize)
        theirs = preprocess([to_rgb_tensor(image)], size, PIXEL_MEAN, resize)[0].numpy()
        assert ours.dtype == np.float32 and ours.shape == theirs.shape == (3, size, size)
        assert image_size == image.size
        difference = np.abs(ours - theirs)
        worst = max(worst, float(difference.max()))
        means.append(float(difference.mean()))
    if resize == "bilinear":
        assert worst <= BILINEAR_ATOL
    else:
        assert worst <= ANTIALIAS_MAX and max(means) <= ANTIALIAS_MEAN


def test_an_unknown_resize_is_named():
    with pytest.raises(ValueError, match="resize must be one of"):
        prepare_image(shapes_image(), 300, PIXEL_MEAN, "bicubic")
