"""The SSD network and its builders, ``ssd300_vgg16`` and ``ssd512_vgg16``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cache
from typing import Any

import torch
from torch import Tensor, nn

from model.network.default_boxes import DefaultBoxSpec, box_spec, make_default_boxes
from model.network.vgg import EXTRAS_300, EXTRAS_512, L2Norm, output_sides, vgg16_stages


@dataclass(frozen=True)
class Architecture:
    """Everything needed to rebuild a network: what a checkpoint stores besides weights."""

    builder: str
    num_classes: int
    size: int
    preset: str
    batch_norm: bool
    width: float
    # For weights converted from elsewhere (``model.weights.published``); a network trained here
    # keeps the defaults. ``clip_boxes``: how the default boxes are clipped ("none", or as
    # torchvision's "wh" or ssd.pytorch's "cxcywh"; model.network.default_boxes). ``unused_slots``:
    # class-head columns that name no class (torchvision's COCO "N/A" slots), folded into
    # background.
    clip_boxes: str = "none"
    unused_slots: tuple[int, ...] = ()
    # The sizes and aspect ratios of boxes fitted to the training data (preset "fitted",
    # ``DefaultBoxSpec.sizes()``); None for the named presets.
    box_sizes: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        # JSON gives lists; a frozen dataclass wants a hashable tuple
        object.__setattr__(self, "unused_slots", tuple(int(s) for s in self.unused_slots))

    def to_dict(self) -> dict[str, object]:
        """The fields as a JSON-ready dict (what checkpoints store as ``architecture``)."""
        return {**asdict(self), "unused_slots": list(self.unused_slots)}


class SSD(nn.Module):
    """Single Shot MultiBox Detector over a stack of feature stages.

    Args:
        stages: modules applied in sequence; the output of each is one source feature map.
        channels: channels of each source map.
        default_box_spec: default-box sizes; the maps' sides are derived from ``stages``.
        num_classes: including background as class 0.
        l2norm_first: apply an L2Norm (scale 20) to the first source, as SSD does on conv4_3.
        unused_slots: class-head columns that name no class (0 < slot < num_classes +
            len(unused_slots)); the heads have that many more columns, and ``forward`` folds
            them into background (``fold_unused_slots``), so ``conf`` has ``num_classes``.

    ``forward`` takes a normalised Tensor[N, 3, S, S] and returns ``(loc, conf)``:
    Tensor[N, P, 4] of encoded offsets and Tensor[N, P, num_classes] of logits, with P rows in
    the order of ``default_boxes``.
    """

    default_boxes: Tensor  # a buffer: (cx, cy, w, h) relative to the input

    def __init__(
        self,
        stages: nn.ModuleList,
        channels: list[int],
        default_box_spec: DefaultBoxSpec,
        num_classes: int,
        *,
        l2norm_first: bool = True,
        unused_slots: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(
                f"num_classes counts background, so it must be >= 2, got {num_classes}"
            )
        if len(stages) != len(channels):
            raise ValueError(f"{len(stages)} stages but {len(channels)} channel counts")
        self.stages = stages
        self.l2norm = L2Norm(channels[0]) if l2norm_first else nn.Identity()
        self.num_classes = num_classes
        self.head_columns = num_classes + len(unused_slots)  # per box, in the class heads
        if any(not 0 < slot < self.head_columns for slot in unused_slots):
            raise ValueError(
                f"unused slots must lie in 1..{self.head_columns - 1}, got {list(unused_slots)}"
            )
        self.unused_slots = tuple(unused_slots)
        self.input_size = default_box_spec.size
        self.feature_map_sizes = output_sides(stages, default_box_spec.size)
        boxes = default_box_spec.boxes_per_location
        self.register_buffer(
            "default_boxes",
            make_default_boxes(default_box_spec, self.feature_map_sizes),
            persistent=False,
        )
        # The paper's predictors: one 3x3 conv per source map for offsets, one for class scores.
        self.loc_heads = nn.ModuleList(
            nn.Conv2d(c, a * 4, kernel_size=3, padding=1)
            for c, a in zip(channels, boxes, strict=True)
        )
        self.conf_heads = nn.ModuleList(
            nn.Conv2d(c, a * self.head_columns, kernel_size=3, padding=1)
            for c, a in zip(channels, boxes, strict=True)
        )
        self.architecture: Architecture | None = None  # set by the builders

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Offsets and class logits of every default box for a batch.

        Args:
            x: Tensor[N, 3, S, S], RGB 0-255 minus the pixel mean.

        Returns:
            loc Tensor[N, P, 4] (offsets to ``default_boxes``, see ``model.network.box_coding``) and
            conf Tensor[N, P, C] (logits, class 0 being background), P default boxes in the
            order of ``default_boxes``.
        """
        locs, confs = [], []
        for k, stage in enumerate(self.stages):
            x = stage(x)
            source = self.l2norm(x) if k == 0 else x
            n = source.shape[0]
            # (N, A*4, H, W) -> (N, H, W, A*4) -> (N, H*W*A, 4)
            locs.append(self.loc_heads[k](source).permute(0, 2, 3, 1).reshape(n, -1, 4))
            # (N, A*C, H, W) -> (N, H, W, A*C) -> (N, H*W*A, C)
            confs.append(
                self.conf_heads[k](source).permute(0, 2, 3, 1).reshape(n, -1, self.head_columns)
            )
        return torch.cat(locs, dim=1), fold_unused_slots(torch.cat(confs, dim=1), self.unused_slots)


def fold_unused_slots(conf: Tensor, unused_slots: tuple[int, ...]) -> Tensor:
    """Class logits Tensor[N, P, C + U] with U unused columns -> Tensor[N, P, C].

    The unused columns and background (column 0) become one background logit, their
    logsumexp; the other columns keep their order. The softmax of the result gives every
    class exactly the probability the full softmax gives it, and background the rest.
    """
    if not unused_slots:
        return conf
    columns = conf.shape[-1]
    used = [c for c in range(1, columns) if c not in unused_slots]
    background = conf[..., [0, *unused_slots]].float().logsumexp(dim=-1, keepdim=True)
    return torch.cat([background.to(conf.dtype), conf[..., used]], dim=-1)


# Standard deviation of ImageNet pixels on the 0-255 scale (torchvision's normalisation std
# (0.229, 0.224, 0.225) x 255, averaged). SSD feeds 0-255 pixels minus the mean, unscaled.
_PIXEL_STD = 57.6


def _init_weights(network: SSD) -> None:
    """He init for the base (torchvision's VGG init), Xavier for extras and heads (authors).

    He init assumes unit-variance inputs, but SSD's input keeps the 0-255 scale (std ~58), as
    the authors' ImageNet-pretrained weights expect. The first conv's initial weights are
    divided by that std, so a network trained from scratch starts with unit-scale activations
    instead of ones ~58x too large (ImageNet initialisation overwrites them anyway).
    """
    base = {id(m) for m in (*network.stages[0].modules(), *network.stages[1].modules())}
    first_conv = next(m for m in network.stages[0].modules() if isinstance(m, nn.Conv2d))
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            if id(module) in base:
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    with torch.no_grad():
        first_conv.weight /= _PIXEL_STD


def _build(
    builder: str,
    size: int,
    num_classes: int,
    *,
    batch_norm: bool,
    preset: str,
    width: float,
    clip_boxes: str,
    unused_slots: tuple[int, ...],
    box_sizes: dict[str, Any] | None,
) -> SSD:
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    extras = EXTRAS_300 if size == 300 else EXTRAS_512
    stages, channels = vgg16_stages(extras, width=width, batch_norm=batch_norm)
    spec = box_spec(size, preset, box_sizes, clip_boxes)
    network = SSD(stages, channels, spec, num_classes, unused_slots=unused_slots)
    _init_weights(network)
    network.architecture = Architecture(
        builder=builder,
        num_classes=num_classes,
        size=size,
        preset=preset,
        batch_norm=batch_norm,
        width=width,
        clip_boxes=clip_boxes,
        unused_slots=unused_slots,
        box_sizes=spec.sizes() if box_sizes is not None else None,
    )
    return network


def ssd300_vgg16(
    num_classes: int,
    *,
    batch_norm: bool = False,
    preset: str = "voc",
    width: float = 1.0,
    clip_boxes: str = "none",
    unused_slots: tuple[int, ...] = (),
    box_sizes: dict[str, Any] | None = None,
) -> SSD:
    """SSD300 with the reduced atrous VGG16 base; ``num_classes`` includes background.

    ``box_sizes`` are fitted boxes' (``preset="fitted"``); ``clip_boxes`` and ``unused_slots``
    are for converted weights (``Architecture``)."""
    return _build(
        "ssd300_vgg16",
        300,
        num_classes,
        batch_norm=batch_norm,
        preset=preset,
        width=width,
        clip_boxes=clip_boxes,
        unused_slots=unused_slots,
        box_sizes=box_sizes,
    )


def ssd512_vgg16(
    num_classes: int,
    *,
    batch_norm: bool = False,
    preset: str = "voc",
    width: float = 1.0,
    clip_boxes: str = "none",
    unused_slots: tuple[int, ...] = (),
    box_sizes: dict[str, Any] | None = None,
) -> SSD:
    """SSD512 with the reduced atrous VGG16 base; ``num_classes`` includes background.

    ``box_sizes`` are fitted boxes' (``preset="fitted"``); ``clip_boxes`` and ``unused_slots``
    are for converted weights (``Architecture``)."""
    return _build(
        "ssd512_vgg16",
        512,
        num_classes,
        batch_norm=batch_norm,
        preset=preset,
        width=width,
        clip_boxes=clip_boxes,
        unused_slots=unused_slots,
        box_sizes=box_sizes,
    )


@cache
def feature_map_sides(size: int) -> tuple[int, ...]:
    """The sides of ``ssd{size}_vgg16``'s source feature maps (its ``feature_map_sizes``),
    from the same VGG16 stages made on the meta device, so no weights are allocated (width
    and batch norm do not change them)."""
    if size not in (300, 512):
        raise ValueError(f"size must be 300 or 512, got {size}")
    extras = EXTRAS_300 if size == 300 else EXTRAS_512
    with torch.device("meta"):
        stages, _ = vgg16_stages(extras, width=1.0, batch_norm=False)
    return tuple(output_sides(stages, size))


BUILDERS = {"ssd300_vgg16": ssd300_vgg16, "ssd512_vgg16": ssd512_vgg16}


def build(architecture: Architecture) -> SSD:
    """Rebuild a network from its recorded architecture."""
    if architecture.builder not in BUILDERS:
        raise ValueError(f"unknown builder {architecture.builder!r}; known: {sorted(BUILDERS)}")
    return BUILDERS[architecture.builder](
        architecture.num_classes,
        batch_norm=architecture.batch_norm,
        preset=architecture.preset,
        width=architecture.width,
        clip_boxes=architecture.clip_boxes,
        unused_slots=architecture.unused_slots,
        box_sizes=architecture.box_sizes,
    )
