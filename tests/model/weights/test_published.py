"""Published detectors converted by name, checked against code that is not ours: torchvision's
own ssd300_vgg16 (seeded random weights saved under torchvision's file name in a temporary
TORCH_HOME), and ssd.pytorch's layout run by an independent functional forward."""

import json
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.models.detection import SSD300_VGG16_Weights
from torchvision.transforms.v2 import functional as TF

from model import Detector
from model.convert import main as convert_main
from model.data import load_dataset
from model.inference.int8 import read_int8_info
from model.network.ssd import fold_unused_slots
from model.quantize import main as quantize_main
from model.train import main as train_main
from model.weights.checkpoint import load_checkpoint, read_metadata
from model.weights.published import SSD_PYTORCH_VOC_SHA256, VOC_CLASSES
from model.weights.sources import file_sha256
from tests.support.offline import use_refusing_proxy

COCO = SSD300_VGG16_Weights.COCO_V1
PHOTOS = 3  # coco128 photos in the end-to-end comparison


def _photos(coco128: Path) -> list[Image.Image]:
    paths = sorted((coco128 / "images").glob("*.jpg"))[:PHOTOS]
    return [Image.open(p).convert("RGB") for p in paths]


def test_raw_outputs_equal_torchvision_on_identical_inputs(seeded_cache):
    reference = seeded_cache
    network = load_checkpoint("torchvision:coco").network
    torch.manual_seed(1)
    x = torch.rand(2, 3, 300, 300) * 255 - 120  # already normalised, as both networks take it
    with torch.no_grad():
        head = reference.head(list(reference.backbone(x).values()))
        loc, conf = network(x)
    torch.testing.assert_close(loc, head["bbox_regression"], atol=1e-4, rtol=1e-4)
    # ours folds the 10 N/A slots into background: the 80 classes' probabilities are equal
    expected = head["cls_logits"].softmax(-1)
    categories = COCO.meta["categories"]
    used = [k for k, name in enumerate(categories) if k and name != "N/A"]
    torch.testing.assert_close(conf.softmax(-1)[..., 1:], expected[..., used], atol=1e-6, rtol=0)
    sides = [[side, side] for side in (38, 19, 10, 5, 3, 1)]
    # torchvision's (cx, cy, w, h) relative to the input, before its forward scales them
    anchors = reference.anchor_generator._grid_default_boxes(sides, [300, 300])
    torch.testing.assert_close(network.default_boxes, anchors.float(), atol=1e-6, rtol=0)


def test_unused_slots_fold_into_background_exactly():
    torch.manual_seed(4)
    logits = torch.randn(2, 7, 91) * 3
    unused = tuple(k for k, name in enumerate(COCO.meta["categories"]) if name == "N/A")
    used = [k for k in range(1, 91) if k not in unused]
    folded = fold_unused_slots(logits, unused)
    assert folded.shape == (2, 7, 81)
    expected = logits.softmax(-1)
    torch.testing.assert_close(folded.softmax(-1)[..., 1:], expected[..., used])
    background = expected[..., [0, *unused]].sum(-1)
    torch.testing.assert_close(folded.softmax(-1)[..., 0], background)


def test_detections_equal_torchvision_on_coco128_photos(seeded_cache, coco128):
    reference = seeded_cache
    detector = Detector.load("torchvision:coco", device="cpu", precision="fp32")
    categories = COCO.meta["categories"]
    photos = _photos(coco128)
    ours = detector.predict(photos, score_threshold=0.05)
    compared, worst_box, worst_score = 0, 0.0, 0.0
    for photo, mine in zip(photos, ours, strict=True):
        with torch.no_grad():
            [theirs] = reference([TF.pil_to_tensor(photo).float() / 255])
        keep = theirs["scores"] > 0.05
        labels = [categories[k] for k in theirs["labels"][keep].tolist()]
        assert len(mine) == len(labels) > 0
        # Pair each of torchvision's detections with one of ours of the same label: scores a
        # few 1e-7 apart may swap places in the sorted order, so the lists are not zipped.
        unpaired = set(range(len(mine)))
        rows = zip(theirs["boxes"][keep], theirs["scores"][keep], labels, strict=True)
        for box, score, label in rows:
            candidates = [j for j in unpaired if mine.labels[j] == label]
            assert candidates, f"no {label} detection of ours left for torchvision's"
            j = min(candidates, key=lambda j: float((mine.boxes[j] - box).abs().max()))
            unpaired.remove(j)
            worst_box = max(worst_box, float((mine.boxes[j] - box).abs().max()))
            worst_score = max(worst_score, abs(float(mine.scores[j] - score)))
        compared += len(labels)
    assert worst_box <= 0.5 and worst_score <= 1e-4, (worst_box, worst_score)
    logging.getLogger(__name__).info(
        "%d detections: largest box difference %.2e px, score %.2e",
        compared,
        worst_box,
        worst_score,
    )


def test_converted_file_describes_itself_and_loads_offline(
    seeded_cache, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "coco.safetensors"
    assert convert_main(["torchvision:coco", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    meta = read_metadata(out)
    assert len(meta["class_names"]) == 80 and meta["class_names"][:2] == ["person", "bicycle"]
    assert meta["architecture"]["unused_slots"] == [12, 26, 29, 30, 45, 66, 68, 69, 71, 83]
    assert meta["normalization"]["resize"] == "bilinear"
    source = meta["recipe"]["source"]
    assert source["url"] == COCO.url and "BSD-3-Clause" in source["licence"]
    assert source["sha256_is_published"] is False  # a stand-in, not torchvision's file
    assert source["coco_category_ids"][-1] == 90 and len(source["coco_category_ids"]) == 80
    x = torch.rand(1, 3, 300, 300, generator=torch.Generator().manual_seed(3)) * 255 - 120
    with torch.no_grad():
        expected = load_checkpoint("torchvision:coco").network(x)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))  # the file alone is enough
    use_refusing_proxy(monkeypatch)
    with torch.no_grad():
        loc, conf = load_checkpoint(out).network(x)
    assert torch.equal(loc, expected[0]) and torch.equal(conf, expected[1])
    assert Detector.load(out, device="cpu", precision="fp32").class_names[0] == "person"


def test_torchvision_coco_offline_names_the_url_and_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    use_refusing_proxy(monkeypatch)
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "ssd300_vgg16_coco-b556d3b4.pth"
    with pytest.raises(FileNotFoundError) as caught:
        Detector.load("torchvision:coco", device="cpu", precision="fp32")
    message = str(caught.value)
    assert COCO.url in message and str(expected) in message and not expected.exists()
    assert convert_main(["torchvision:coco", "--out", str(tmp_path / "x.safetensors")]) == 2


# -- ssd.pytorch (amdegroot) ------------------------------------------------------------------
# Its layout, restated from its ssd.py: vgg() over base['300'], add_extras() over
# extras['300'], multibox() with mbox['300'] boxes per location; priors from PriorBox(voc).
_VGG_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "C", 512, 512, 512, "M", 512, 512, 512]
_EXTRAS = [(1024, 256, 1), (256, 512, 3), (512, 128, 1), (128, 256, 3)]
_EXTRAS += [(256, 128, 1), (128, 256, 3), (256, 128, 1), (128, 256, 3)]
_MBOX = [4, 6, 6, 6, 4, 4]
_SOURCE_CHANNELS = [512, 1024, 512, 256, 256, 256]


def _ssd_pytorch_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict in ssd.pytorch's key layout, with seeded random values."""
    generator = torch.Generator().manual_seed(seed)

    def conv(cin: int, cout: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        scale = math.sqrt(2.0 / (cin * k * k))
        weight = torch.randn(cout, cin, k, k, generator=generator) * scale
        return weight, torch.randn(cout, generator=generator) * 0.1

    state, index, cin = {}, 0, 3
    for item in _VGG_CFG:
        if item in ("M", "C"):
            index += 1
            continue
        state[f"vgg.{index}.weight"], state[f"vgg.{index}.bias"] = conv(cin, item, 3)
        index, cin = index + 2, item
    index += 1  # pool5
    state[f"vgg.{index}.weight"], state[f"vgg.{index}.bias"] = conv(512, 1024, 3)  # conv6
    state[f"vgg.{index + 2}.weight"], state[f"vgg.{index + 2}.bias"] = conv(1024, 1024, 1)
    state["L2Norm.weight"] = torch.full((512,), 20.0)
    for j, (cin, cout, k) in enumerate(_EXTRAS):
        state[f"extras.{j}.weight"], state[f"extras.{j}.bias"] = conv(cin, cout, k)
    for k, (channels, boxes) in enumerate(zip(_SOURCE_CHANNELS, _MBOX, strict=True)):
        # heads scaled down, so offsets stay near their priors and scores spread out
        weight, bias = conv(channels, boxes * 4, 3)
        state[f"loc.{k}.weight"], state[f"loc.{k}.bias"] = weight * 0.1, bias
        weight, bias = conv(channels, boxes * 21, 3)
        state[f"conf.{k}.weight"], state[f"conf.{k}.bias"] = weight * 0.3, bias
    return state


def _ssd_pytorch_forward(state: dict[str, torch.Tensor], x: torch.Tensor):
    """ssd.pytorch's SSD.forward (phase 'train' outputs), restated with functional ops."""
    sources, index = [], 0
    for item in _VGG_CFG:
        if item in ("M", "C"):
            x = F.max_pool2d(x, 2, 2, ceil_mode=item == "C")
            index += 1
            continue
        x = F.relu(F.conv2d(x, state[f"vgg.{index}.weight"], state[f"vgg.{index}.bias"], 1, 1))
        index += 2
        if index == 23:  # after conv4_3's ReLU: vgg[:23]
            norm = x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10
            sources.append(x / norm * state["L2Norm.weight"][None, :, None, None])
    x = F.max_pool2d(x, 3, 1, 1)  # pool5
    x = F.relu(F.conv2d(x, state["vgg.31.weight"], state["vgg.31.bias"], padding=6, dilation=6))
    x = F.relu(F.conv2d(x, state["vgg.33.weight"], state["vgg.33.bias"]))
    sources.append(x)
    for j in range(len(_EXTRAS)):
        # add_extras: the 3x3 convs after an "S" (extras 1 and 3) have stride 2, padding 1
        stride, padding = (2, 1) if j in (1, 3) else (1, 0)
        weight, bias = state[f"extras.{j}.weight"], state[f"extras.{j}.bias"]
        x = F.relu(F.conv2d(x, weight, bias, stride, padding))
        if j % 2 == 1:
            sources.append(x)
    n = x.shape[0]
    outputs = []
    for kind, columns in (("loc", 4), ("conf", 21)):
        maps = [
            F.conv2d(s, state[f"{kind}.{k}.weight"], state[f"{kind}.{k}.bias"], padding=1)
            for k, s in enumerate(sources)
        ]
        # each (N, A*K, H, W) -> (N, H, W, A*K) -> (N, H*W*A*K); all -> (N, P, K)
        flat = torch.cat([m.permute(0, 2, 3, 1).reshape(n, -1) for m in maps], 1)
        outputs.append(flat.view(n, -1, columns))
    return outputs[0], outputs[1]


def _ssd_pytorch_priors() -> torch.Tensor:
    """ssd.pytorch's PriorBox with its voc config (clip True), restated."""
    feature_maps, steps = [38, 19, 10, 5, 3, 1], [8, 16, 32, 64, 100, 300]
    min_sizes, max_sizes = [30, 60, 111, 162, 213, 264], [60, 111, 162, 213, 264, 315]
    ratios = [[2], [2, 3], [2, 3], [2, 3], [2], [2]]
    mean = []
    for k, f in enumerate(feature_maps):
        for i in range(f):
            for j in range(f):
                f_k = 300 / steps[k]
                cx, cy = (j + 0.5) / f_k, (i + 0.5) / f_k
                s_k = min_sizes[k] / 300
                mean += [cx, cy, s_k, s_k]
                s_prime = math.sqrt(s_k * (max_sizes[k] / 300))
                mean += [cx, cy, s_prime, s_prime]
                for ar in ratios[k]:
                    mean += [cx, cy, s_k * math.sqrt(ar), s_k / math.sqrt(ar)]
                    mean += [cx, cy, s_k / math.sqrt(ar), s_k * math.sqrt(ar)]
    return torch.tensor(mean).view(-1, 4).clamp(max=1, min=0)


@pytest.fixture(scope="module")
def ssd_pytorch_file(tmp_path_factory):
    state = _ssd_pytorch_state()
    path = tmp_path_factory.mktemp("ssd_pytorch") / "ssd300_voc.pth"
    torch.save(state, path)
    return state, path


def test_ssd_pytorch_layout_converts_exactly(ssd_pytorch_file, caplog):
    state, path = ssd_pytorch_file
    with caplog.at_level(logging.WARNING, logger="model.weights.published"):
        loaded = load_checkpoint(f"ssd.pytorch:{path}")
    assert "differs from the known copy" in caplog.text and SSD_PYTORCH_VOC_SHA256 in caplog.text
    assert loaded.class_names == list(VOC_CLASSES) and loaded.class_names[14] == "person"
    assert loaded.normalization["mean"] == [123.0, 117.0, 104.0]
    source = loaded.recipe["source"]
    assert source["sha256_is_published"] is False and source["file"] == "ssd300_voc.pth"
    network = loaded.network
    torch.testing.assert_close(network.default_boxes, _ssd_pytorch_priors(), atol=1e-6, rtol=0)
    torch.manual_seed(2)
    x = torch.rand(2, 3, 300, 300) * 255 - 120
    with torch.no_grad():
        expected_loc, expected_conf = _ssd_pytorch_forward(state, x)
        loc, conf = network(x)
    torch.testing.assert_close(loc, expected_loc, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(conf, expected_conf, atol=1e-4, rtol=1e-4)


def test_ssd_pytorch_detections_follow_its_outputs(ssd_pytorch_file, coco128):
    """End to end: the Detector's detections are the raw outputs of the reference forward,
    decoded with ssd.pytorch's priors and variances, on an input resized as its cv2 did."""
    state, path = ssd_pytorch_file
    detector = Detector.load(f"ssd.pytorch:{path}", device="cpu", precision="fp32")
    [photo] = _photos(coco128)[:1]
    [mine] = detector.predict([photo], score_threshold=0.05)
    pixels = TF.pil_to_tensor(photo).float()[None]
    x = F.interpolate(pixels, size=(300, 300), mode="bilinear", align_corners=False)
    x = x - torch.tensor([123.0, 117.0, 104.0])[None, :, None, None]
    with torch.no_grad():
        loc, conf = _ssd_pytorch_forward(state, x)
    priors = _ssd_pytorch_priors()
    scores = conf[0].softmax(-1)
    assert len(mine) > 0
    for box, score, label in zip(mine.boxes, mine.scores, mine.class_ids, strict=True):
        # each detection is some prior's decoded box at that prior's class score
        rows = (scores[:, label] - score).abs() < 1e-4
        assert rows.any()
        p, t = priors[rows], loc[0][rows]
        centre = p[:, :2] + t[:, :2] * 0.1 * p[:, 2:]
        size = p[:, 2:] * torch.exp(t[:, 2:] * 0.2)
        boxes = torch.cat([centre - size / 2, centre + size / 2], 1).clamp(0, 1)
        boxes = boxes * torch.tensor([photo.width, photo.height] * 2)
        assert (boxes - box).abs().amax(dim=1).min() <= 0.5


def test_ssd_pytorch_layout_is_checked_not_the_name(ssd_pytorch_file, tmp_path):
    state, _ = ssd_pytorch_file
    broken = {k: v for k, v in state.items() if k != "conf.5.bias"}
    broken["conf.5.weight"] = torch.zeros(4 * 81, 256, 3, 3)  # COCO's 81 classes
    path = tmp_path / "ssd300_mAP_77.43_v2.pth"
    torch.save(broken, path)
    with pytest.raises(ValueError, match=r"conf_heads\.5\.bias.*conf_heads\.5\.weight"):
        load_checkpoint(f"ssd.pytorch:{path}")
    with pytest.raises(FileNotFoundError, match=r"nothing\.pth"):
        load_checkpoint(f"ssd.pytorch:{tmp_path / 'nothing.pth'}")


def test_ssd_pytorch_is_read_weights_only(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("ran code",))

    path = tmp_path / "evil.pth"
    torch.save({"vgg.0.weight": Payload()}, path)
    with pytest.raises(ValueError, match="cannot read"):
        load_checkpoint(f"ssd.pytorch:{path}")


def test_finetune_from_torchvision_coco_replaces_only_the_class_head(
    seeded_cache, tmp_path, caplog
):
    out = tmp_path / "mine.safetensors"
    args = ["--data", "synthetic:4", "--val-data", "synthetic:2", "--out", str(out)]
    args += ["--init", "torchvision:coco", "--recipe", "finetune", "--steps", "2"]
    args += ["--batch-size", "2", "--workers", "0", "--precision", "fp32", "--eval-every", "0"]
    args += ["--calibration", "0"]
    with caplog.at_level(logging.INFO, logger="model.train"):
        assert train_main(args) == 0
    line = next(r.getMessage() for r in caplog.records if "initialised" in r.getMessage())
    assert "from torchvision:coco" in line
    fresh = line.split("(", 1)[1]
    assert sorted(fresh.rstrip(")").split(", ")) == [
        f"conf_heads.{k}.{t}" for k in range(6) for t in ("bias", "weight")
    ]
    meta = read_metadata(out)
    assert meta["architecture"]["preset"] == "coco"  # the boxes the weights were trained with
    assert meta["architecture"]["clip_boxes"] == "wh"
    assert meta["recipe"]["lr"] == 5e-4 and meta["recipe"]["schedule"] == "step"
    trained = load_checkpoint(out).network.state_dict()
    source = load_checkpoint("torchvision:coco").network.state_dict()
    # the base starts from the source's weights: two warm-up steps move it a little
    for key in ("stages.0.0.weight", "stages.1.10.weight", "loc_heads.5.weight"):
        moved = (trained[key] - source[key]).norm()
        assert moved < 0.1 * source[key].norm(), key
    json.dumps(meta)  # the recipe stays JSON


def test_finetune_recipe_needs_an_init(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_main(["--data", "synthetic:4", "--out", str(tmp_path / "x"), "--recipe", "finetune"])
    assert "--init" in capsys.readouterr().err


def test_coco_classes_line_up_with_coco_json_data(seeded_cache, coco128):
    # model.evaluate scores a checkpoint on COCO JSON data with the checkpoint's class names,
    # matched by name (tests/model/data/test_coco.py). torchvision:coco's names are COCO's 80
    # in id order, so its class k is the data's label k, and both are the same COCO id:
    # torchvision's slot for it.
    names = load_checkpoint("torchvision:coco").class_names
    data = load_dataset(f"coco:{coco128 / 'images'}:{coco128 / 'annotations/instances.json'}",
                        split="test", classes=names)  # fmt: skip
    assert data.class_names == names and len(names) == 80
    slots = COCO.meta["categories"]
    for label, category_id in data.label_to_category_id.items():
        assert slots[category_id] == names[label - 1]


def _own_coco_file(coco128: Path, tmp_path: Path, count: int) -> str:
    """A user's own COCO file of coco128's first ``count`` photos, as a data spec."""
    data = json.loads((coco128 / "annotations" / "instances.json").read_text())
    images = data["images"][:count]
    ids = {image["id"] for image in images}
    annotations = [a for a in data["annotations"] if a["image_id"] in ids]
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({**data, "images": images, "annotations": annotations}))
    return f"coco:{coco128 / 'images'}:{mine}"


def test_int8_of_torchvision_coco_calibrated_on_the_users_photos(seeded_cache, coco128, tmp_path):
    # A user's own photos, here two of coco128 in a COCO file of their own: calibration and
    # the accuracy guard run on them. The stand-in's random weights make the guard's mAP
    # meaningless; what is checked is that each step runs on imported weights and reports.
    spec = _own_coco_file(coco128, tmp_path, 2)
    out = tmp_path / "coco.int8.safetensors"
    argv = ["--weights", "torchvision:coco", "--data", spec, "--calibration", "2",
            "--guard-data", spec, "--out", str(out)]  # fmt: skip
    assert quantize_main(argv) == 0
    converted = tmp_path / "coco.safetensors"  # the checkpoint the artifact belongs to
    guard = read_int8_info(out)["info"]["guard"]["map50"]
    assert set(guard) >= {"fp32", "int8"} and all(0 <= guard[k] <= 1 for k in ("fp32", "int8"))
    detector = Detector.load(converted, device="cpu", precision="int8")
    assert detector.precision == "int8" and detector.class_names[:2] == ["person", "bicycle"]
    [found] = detector.predict(_photos(coco128)[:1], score_threshold=0.05)
    assert set(found.labels) <= set(detector.class_names) and len(found.labels) > 0


def test_a_damaged_cached_file_is_named_and_never_unpickled_freely(tmp_path, monkeypatch):
    # Torch's cache holds a file of the right name but damaged bytes: the error names the file
    # and does not pass on torch's advice to load it with weights_only=False.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / COCO.url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"\x80\x02" + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="damaged or holds more than tensors") as caught:
        load_checkpoint("torchvision:coco")
    assert str(cached) in str(caught.value) and "weights_only=False" not in str(caught.value)


def test_convert_writes_the_int8_artifact_given_calibration_images(seeded_cache, coco128, tmp_path):
    # A user's own photos in a COCO file: the train part calibrates, the val part guards. As
    # above, the stand-in's random weights make the guard's figures meaningless, not absent.
    spec = _own_coco_file(coco128, tmp_path, 6)
    out = tmp_path / "coco.safetensors"
    argv = ["torchvision:coco", "--out", str(out), "--calibration-data", spec,
            "--calibration", "2"]  # fmt: skip
    assert convert_main(argv) == 0
    info = read_int8_info(tmp_path / "coco.int8.safetensors")
    assert info["checkpoint_sha256"] == file_sha256(out)
    assert info["info"]["calibration"] == {"data": spec, "split": "train", "images": 2}
    assert (info["info"]["guard"]["data"], info["info"]["guard"]["split"]) == (spec, "val")
    detector = Detector.load(out, device="cpu", precision="int8")
    assert detector.precision == "int8" and detector.class_names[:2] == ["person", "bicycle"]


def test_convert_refuses_calibration_data_it_cannot_read_before_writing(tmp_path, capsys):
    out = tmp_path / "coco.safetensors"
    missing = tmp_path / "nowhere"
    argv = ["torchvision:coco", "--out", str(out), "--calibration-data", f"voc:{missing}"]
    assert convert_main(argv) == 2
    assert str(missing) in capsys.readouterr().err and not out.exists()
