"""The reduced, atrous VGG16 base and SSD's extra feature layers (SSD paper, sec. 3, Fig. 2).

Layer by layer as the authors' ``VGGNetBody(fully_conv=True, reduced=True, dilated=True)`` and
``AddExtraLayers`` build them:

* conv1_1 ... conv5_3 (3x3, pad 1), max-pool 2x2/2 after each block; pool3 rounds up
  (``ceil_mode``) so that conv4_3 is 38x38 at 300 px, as Caffe's pooling does;
* pool5 is 3x3, stride 1, pad 1; fc6 is a 3x3 conv with 1024 channels and dilation 6 (the
  "a trous" trick); fc7 is a 1x1 conv with 1024 channels;
* the extras alternate a 1x1 "squeeze" conv and a 3x3 conv that halves the map.

The network is cut into *stages*: each stage ends at one source feature map for the
predictors. ``width`` scales every channel count (1.0 is the paper's network), and
``batch_norm`` puts a BatchNorm after every conv of the base and the extras (ScratchDet).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

# VGG16 configuration "D" (Simonyan & Zisserman, 2015, Table 1): channels per conv, "M" = pool.
_VGG16_TO_CONV4_3 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "C", 512, 512, 512)
_VGG16_CONV5 = (512, 512, 512)
_FC_CHANNELS = 1024  # fc6/fc7 after the authors' subsampling of VGG's 4096-wide fc layers
_FC6_DILATION = 6  # pool5 is 3x3/1, so fc6 needs dilation 6 to keep its field of view

# Extra layers as (1x1 channels, 3x3 channels, stride, padding, kernel), from AddExtraLayers.
ExtraSpec = tuple[int, int, int, int, int]
EXTRAS_300: tuple[ExtraSpec, ...] = (
    (256, 512, 2, 1, 3),  # conv8_2: 19 -> 10
    (128, 256, 2, 1, 3),  # conv9_2: 10 -> 5
    (128, 256, 1, 0, 3),  # conv10_2: 5 -> 3
    (128, 256, 1, 0, 3),  # conv11_2: 3 -> 1
)
EXTRAS_512: tuple[ExtraSpec, ...] = (
    (256, 512, 2, 1, 3),  # conv8_2: 32 -> 16
    (128, 256, 2, 1, 3),  # conv9_2: 16 -> 8
    (128, 256, 2, 1, 3),  # conv10_2: 8 -> 4
    (128, 256, 2, 1, 3),  # conv11_2: 4 -> 2
    (128, 256, 1, 1, 4),  # conv12_2: 4x4 kernel, 2 -> 1
)


def scaled(channels: int, width: float) -> int:
    """A channel count scaled by ``width``, at least 1."""
    return max(1, round(channels * width))


class L2Norm(nn.Module):
    """Per-position L2 normalisation across channels with a learnable per-channel scale.

    ParseNet (Liu et al., 2015), used by SSD on conv4_3 with the scale initialised to 20
    (the authors' ``Normalize`` layer, ``across_spatial: false``, ``eps`` 1e-10).
    """

    def __init__(self, channels: int, scale: float = 20.0, eps: float = 1e-10) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """``x`` Tensor[N, C, H, W] divided by its L2 norm over channels, times the learned
        per-channel scale; the same shape and dtype."""
        # Computed in fp32: a sum of 512 squares overflows or underflows easily in 16 bits.
        x32 = x.float()
        norm = x32.pow(2).sum(dim=1, keepdim=True).sqrt() + self.eps
        return (x32 / norm * self.weight.float()[None, :, None, None]).to(x.dtype)


def _conv(
    in_ch: int,
    out_ch: int,
    batch_norm: bool,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, dilation, bias=not batch_norm)
    ]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_ch))
    layers.append(nn.ReLU(inplace=True))
    return layers


def _vgg_layers(
    cfg: Iterable[int | str], in_ch: int, width: float, batch_norm: bool
) -> tuple[list[nn.Module], int]:
    layers: list[nn.Module] = []
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        elif item == "C":
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
        else:
            out_ch = scaled(int(item), width)
            layers += _conv(in_ch, out_ch, batch_norm, kernel_size=3, padding=1)
            in_ch = out_ch
    return layers, in_ch


def vgg16_stages(
    extras: tuple[ExtraSpec, ...], *, width: float = 1.0, batch_norm: bool = False
) -> tuple[nn.ModuleList, list[int]]:
    """Build the stages of the base and extras, and the channels of each source map.

    Stage 0 ends at conv4_3 (before its L2Norm), stage 1 at fc7, stage 2+ at each extra's
    second conv.
    """
    stage0, ch = _vgg_layers(_VGG16_TO_CONV4_3, 3, width, batch_norm)
    conv5, ch = _vgg_layers(_VGG16_CONV5, ch, width, batch_norm)
    fc_ch = scaled(_FC_CHANNELS, width)
    stage1 = [
        nn.MaxPool2d(2, 2),  # pool4
        *conv5,
        nn.MaxPool2d(3, 1, padding=1),  # pool5
        *_conv(
            ch, fc_ch, batch_norm, kernel_size=3, padding=_FC6_DILATION, dilation=_FC6_DILATION
        ),  # fc6
        *_conv(fc_ch, fc_ch, batch_norm, kernel_size=1),  # fc7
    ]
    stages = [nn.Sequential(*stage0), nn.Sequential(*stage1)]
    channels = [scaled(512, width), fc_ch]
    ch = fc_ch
    for squeeze, out, stride, padding, kernel in extras:
        mid, out_ch = scaled(squeeze, width), scaled(out, width)
        stages.append(
            nn.Sequential(
                *_conv(ch, mid, batch_norm, kernel_size=1),
                *_conv(mid, out_ch, batch_norm, kernel_size=kernel, stride=stride, padding=padding),
            )
        )
        channels.append(out_ch)
        ch = out_ch
    return nn.ModuleList(stages), channels


def output_sides(stages: nn.ModuleList, size: int) -> list[int]:
    """Side of each stage's square output for a ``size`` x ``size`` input, by conv arithmetic."""
    sides = []
    side = size
    for stage in stages:
        for layer in stage.modules():
            if isinstance(layer, nn.Conv2d | nn.MaxPool2d):
                k, s, p, d = (
                    _pair0(getattr(layer, a))
                    for a in ("kernel_size", "stride", "padding", "dilation")
                )
                span = side + 2 * p - d * (k - 1) - 1
                ceil = isinstance(layer, nn.MaxPool2d) and layer.ceil_mode
                side = -(-span // s) + 1 if ceil else span // s + 1
        sides.append(side)
    return sides


def _pair0(value: int | tuple[int, ...]) -> int:
    """The first element of a (possibly) pair-valued conv/pool argument; ours are square."""
    return value[0] if isinstance(value, tuple) else int(value)
