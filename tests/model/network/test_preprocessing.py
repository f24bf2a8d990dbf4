import io

import numpy as np
import pytest
import torch
from PIL import Image

from model.network.preprocessing import PIXEL_MEAN, preprocess, to_rgb_tensor


def _rgb(image: Image.Image) -> np.ndarray:
    return to_rgb_tensor(image).permute(1, 2, 0).numpy()


def test_greyscale_is_replicated():
    out = _rgb(Image.new("L", (4, 3), 77))
    assert out.shape == (3, 4, 3) and (out == 77).all()


def test_alpha_is_composited_on_white():
    image = Image.new("RGBA", (2, 1), (200, 10, 10, 255))
    image.putpixel((1, 0), (200, 10, 10, 0))
    out = _rgb(image)
    assert out[0, 0].tolist() == [200, 10, 10]
    assert out[0, 1].tolist() == [255, 255, 255]


def test_palette_cmyk_and_sixteen_bit():
    palette = Image.new("P", (2, 2))
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.putpixel((0, 0), 1)
    assert _rgb(palette)[0, 0].tolist() == [10, 20, 30]

    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red in CMYK
    assert _rgb(cmyk)[0, 0].tolist() == [255, 0, 0]

    deep = np.full((2, 2), 32768, dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(deep).save(buffer, format="PNG")
    decoded = Image.open(io.BytesIO(buffer.getvalue()))
    assert decoded.mode.startswith("I")
    assert _rgb(decoded)[0, 0].tolist() == [128, 128, 128]  # half scale, not clipped to 255


def test_tensors_of_one_three_and_four_channels():
    grey = torch.full((1, 2, 2), 9, dtype=torch.uint8)
    assert to_rgb_tensor(grey).shape == (3, 2, 2)
    rgba = torch.zeros(4, 1, 1, dtype=torch.uint8)  # fully transparent black
    assert to_rgb_tensor(rgba).flatten().tolist() == [255, 255, 255]
    with pytest.raises(ValueError, match="float32"):
        to_rgb_tensor(torch.zeros(3, 2, 2))
    with pytest.raises(ValueError, match=r"\(2, 2, 2\)"):
        to_rgb_tensor(torch.zeros(2, 2, 2, dtype=torch.uint8))
    with pytest.raises(TypeError):
        to_rgb_tensor(np.zeros((2, 2, 3), dtype=np.uint8))


def test_preprocess_resizes_and_subtracts_the_mean():
    image = torch.zeros(3, 40, 100, dtype=torch.uint8)
    image[0] = 200
    batch = preprocess([image, torch.full((3, 7, 9), 123, dtype=torch.uint8)], 30)
    assert batch.shape == (2, 3, 30, 30) and batch.dtype == torch.float32
    torch.testing.assert_close(
        batch[0, :, 15, 15], torch.tensor([200.0, 0.0, 0.0]) - torch.tensor(PIXEL_MEAN)
    )
    torch.testing.assert_close(batch[1, 0], torch.zeros(30, 30))
