"""Fixtures shared by the whole suite, and its one torch thread."""

import os
from pathlib import Path

import pytest
import torch
from torchvision.models.detection import SSD300_VGG16_Weights
from torchvision.models.detection import ssd300_vgg16 as torchvision_ssd300

from model.weights.torch_cache import cache_path

# ../shared/datasets beside the repository root (see that folder's README.md). Never copied in.
SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def pytest_configure(config: pytest.Config) -> None:
    """One torch (OpenMP) thread, here and in the processes the tests start. With two
    threads on a 2-core machine that is busy with something else, every parallel op waits
    for whichever thread the scheduler has set aside, and the suite's small networks slow
    down many times over (docs/test-suite.md); with one thread the suite's cost no longer
    depends on the neighbours'."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` skip, saying why, where torch sees no CUDA device (plain pytest
    deselects them already; ``pytest -m gpu`` selects them on any machine)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def _shared(name: str) -> Path:
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"shared dataset {name!r} not found at {path} (it lives beside the repo)")
    return path


@pytest.fixture(scope="session")
def raccoon() -> Path:
    """The raccoon Pascal VOC dataset (200 photos, 160/40 split)."""
    return _shared("raccoon")


@pytest.fixture(scope="session")
def raccoon_unsplit(raccoon: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The raccoon photos and annotations as a VOC folder without split files (no
    ImageSets/): links to the shared folders, nothing copied."""
    root = tmp_path_factory.mktemp("raccoon_unsplit")
    for name in ("Annotations", "JPEGImages"):
        (root / name).symlink_to(raccoon / name, target_is_directory=True)
    return root


@pytest.fixture(scope="session")
def coco128() -> Path:
    """The coco128 COCO-JSON dataset (128 images, 80 categories)."""
    return _shared("coco128")


# The class head's random (Xavier) weights give one class a probability near 1 on every box;
# scaled down (x0.2), a dozen classes score 0.05 .. 0.4 on each photo, in a meaningful order.
STANDIN_HEAD_SCALE = 0.2


@pytest.fixture(scope="session")
def torchvision_standin(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[torch.nn.Module, Path]:
    """A stand-in for torchvision's COCO-trained SSD300, which cannot be downloaded here:
    torchvision's own ssd300_vgg16 with seeded random weights (class head scaled), and the
    TORCH_HOME whose cache holds its state dict under COCO_V1's file name (torch.save, as
    published)."""
    weights = SSD300_VGG16_Weights.COCO_V1
    torch.manual_seed(0)
    reference = torchvision_ssd300(weights=None, weights_backbone=None, num_classes=91).eval()
    na_slots = [k for k, name in enumerate(weights.meta["categories"]) if name == "N/A"]
    with torch.no_grad():
        for conv in reference.head.classification_head.module_list:
            conv.weight.mul_(STANDIN_HEAD_SCALE)
            # No COCO box carries the N/A ids, so training only ever pushes their logits down;
            # so does the stand-in's bias (-30). Their folding is checked at random values too
            # (test_unused_slots_fold_into_background_exactly).
            # (N_boxes*91,) -> (N_boxes, 91): column k of each box is slot k
            conv.bias.view(-1, 91)[:, na_slots] = -30.0
    home = tmp_path_factory.mktemp("torch")
    file = home / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[1]
    file.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), file)
    return reference, home


@pytest.fixture
def seeded_cache(
    torchvision_standin: tuple[torch.nn.Module, Path], monkeypatch: pytest.MonkeyPatch
) -> torch.nn.Module:
    """TORCH_HOME set to the stand-in's cache; gives torchvision's network it holds."""
    reference, home = torchvision_standin
    monkeypatch.setenv("TORCH_HOME", str(home))
    assert cache_path(SSD300_VGG16_Weights.COCO_V1).parent == home / "hub" / "checkpoints"
    return reference


@pytest.fixture(scope="session")
def shapes_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped model exported as a ``full`` ONNX graph (``model.export``), once per
    session (skips when the model is not shipped)."""
    from model.export import export_onnx

    shipped = Path(__file__).resolve().parents[1] / "weights" / "ssd300_shapes.safetensors"
    if not shipped.is_file():
        pytest.skip(f"no shipped model at {shipped}")
    return export_onnx(shipped, tmp_path_factory.mktemp("onnx") / "shapes.onnx")
