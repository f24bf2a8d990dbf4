"""The Detector end to end, with a network whose output is known in advance.

Its predictor weights are zero, so every default box gets the predictor's bias whatever the
image: one confident "circle" on the 1x1 map's first box (centre (0.5, 0.5), side 264/300),
and nine "square"s on the 3x3 map's first boxes, shrunk to a tenth by their offsets. The boxes
each image must get are then known in its own pixels.
"""

import copy
import math

import pytest
import torch
from PIL import Image

from model import Detector, ssd300_vgg16
from model.inference import autotune
from model.inference.runtime import resolve_precision
from model.network.postprocess import MAX_DETECTIONS, Cut
from model.weights.checkpoint import save_checkpoint
from tests.fake_clock import FakeClock

NAMES = ["circle", "square"]
SHRINK = 0.1


def _known_network():
    network = ssd300_vgg16(3, width=0.125).eval()
    for heads in (network.loc_heads, network.conf_heads):
        for head in heads:
            torch.nn.init.zeros_(head.weight)
            torch.nn.init.zeros_(head.bias)
    for head in network.conf_heads:
        head.bias.data.view(-1, 3)[:, 1:] = -10.0  # (A*C,) -> (A, C): background wins
    network.conf_heads[5].bias.data.view(-1, 3)[0, 1] = 10.0  # circle, 1x1 map, box 0
    network.conf_heads[4].bias.data.view(-1, 3)[0, 2] = 10.0  # square, 3x3 map, box 0
    # t_w = t_h = log(0.1) / 0.2 shrinks the squares to a tenth of their default size.
    network.loc_heads[4].bias.data.view(-1, 4)[0, 2:] = math.log(SHRINK) / 0.2
    return network


def _expected_relative() -> tuple[torch.Tensor, torch.Tensor]:
    s = 264 / 300
    circle = torch.tensor([[0.5 - s / 2, 0.5 - s / 2, 0.5 + s / 2, 0.5 + s / 2]])
    half = 213 / 300 * SHRINK / 2
    centres = [(j + 0.5) / 3 for j in range(3)]
    squares = torch.tensor(
        [[cx - half, cy - half, cx + half, cy + half] for cy in centres for cx in centres]
    )
    return circle, squares


def _images() -> list:
    return [
        Image.new("RGB", (640, 480), (10, 200, 30)),
        Image.new("L", (123, 457), 50),
        Image.new("RGBA", (300, 300), (0, 0, 0, 0)),
        Image.new("CMYK", (1000, 20)),
        Image.new("P", (33, 90)),
        torch.zeros(3, 77, 301, dtype=torch.uint8),
        torch.zeros(1, 5, 5, dtype=torch.uint8),
    ]


def _size(image) -> tuple[int, int]:
    return (
        (image.width, image.height)
        if isinstance(image, Image.Image)
        else (image.shape[2], image.shape[1])
    )


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_boxes_are_in_each_images_own_frame(precision):
    detector = Detector(_known_network(), NAMES, precision=precision)
    images = _images()
    results = detector.predict(images, score_threshold=0.5)
    circle, squares = _expected_relative()
    assert len(results) == len(images)
    for image, result in zip(images, results, strict=True):
        w, h = _size(image)
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        assert result.labels.count("circle") == 1 and result.labels.count("square") == 9
        assert result.class_ids.tolist() == [1 if n == "circle" else 2 for n in result.labels]
        tol = 1e-4 if precision == "fp32" else 2e-2
        got_circle = result.boxes[result.class_ids == 1]
        torch.testing.assert_close(got_circle / scale, circle, atol=tol, rtol=0)
        got_squares = result.boxes[result.class_ids == 2] / scale
        order = torch.argsort(got_squares[:, 1] * 10 + got_squares[:, 0])
        torch.testing.assert_close(got_squares[order], squares, atol=tol, rtol=0)
        assert (result.scores > 0.99).all()


def test_max_detections_and_threshold():
    detector = Detector(_known_network(), NAMES)
    image = Image.new("RGB", (50, 60))
    assert len(detector.predict([image], max_detections=4)[0]) == 4
    assert len(detector.predict([image], score_threshold=1.0)[0]) == 0
    assert detector.predict([]) == []
    with pytest.raises(ValueError, match="score_threshold"):
        detector.predict([image], score_threshold=1.5)


def test_load_from_checkpoint(tmp_path):
    path = tmp_path / "known.safetensors"
    save_checkpoint(path, _known_network(), NAMES)
    detector = Detector.load(path, device="auto")
    assert detector.class_names == NAMES
    assert detector.input_size == 300
    assert detector.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    result = detector.predict([Image.new("RGB", (10, 10))])[0]
    assert sorted(set(result.labels)) == NAMES


def test_class_name_count_must_match_the_network():
    with pytest.raises(ValueError, match="2 foreground classes but 3"):
        Detector(_known_network(), ["a", "b", "c"])
    with pytest.raises(ValueError, match="precision"):
        Detector(_known_network(), NAMES, precision="int8")


def test_prepare_then_run_batch_equals_predict():
    detector = Detector(_known_network(), NAMES)
    image = Image.new("RGB", (64, 40), (200, 30, 30))
    inputs, size = detector.prepare(image)
    assert inputs.shape == (3, 300, 300) and inputs.dtype == torch.float32 and size == (64, 40)
    [ran] = detector.run_batch([inputs], [size], [Cut(0.3, MAX_DETECTIONS)]).detections
    direct = detector.predict([image])[0]
    assert torch.equal(ran.boxes, direct.boxes) and ran.labels == direct.labels


def test_auto_precision_is_measured_at_load_and_is_the_fastest_passing_candidate(tmp_path):
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"
    path = tmp_path / "known.safetensors"
    save_checkpoint(path, _known_network(), NAMES)
    detector = Detector.load(path, device="cpu", precision="auto")
    choice = detector.precision_choice
    assert choice is not None and detector.precision == choice.precision
    assert set(choice.images_per_s) == set(autotune.candidates(torch.device("cpu")))
    passing = {k: v for k, v in choice.images_per_s.items() if k not in choice.rejected}
    assert choice.precision == max(passing, key=passing.__getitem__)
    assert all(rate > 0 for rate in choice.images_per_s.values())
    assert detector.runtime.precision == choice.precision
    assert Detector.load(path, device="cpu", precision="bf16").precision_choice is None


def test_building_a_detector_measures_nothing_and_refuses_auto():
    # Timing is the explicit step Detector.load runs for "auto", never a side effect of
    # construction: the constructor takes a resolved precision only.
    with pytest.raises(ValueError, match="'auto' is measured"):
        Detector(_known_network(), NAMES, precision="auto")
    assert Detector(_known_network(), NAMES, precision="bf16").precision_choice is None


def test_the_accuracy_guard_rejects_a_faster_precision_that_is_wrong():
    clock = FakeClock()

    def forward(name: str, batch: torch.Tensor) -> torch.Tensor:
        scores = torch.zeros(len(batch), 4, 3)
        if name == "bf16":
            clock.advance(0.1)
            scores[..., 0] = 10.0  # every box turned into background
            return scores
        clock.advance(0.2)  # fp32 is the slower one here
        return scores

    choice = autotune.choose_precision(
        forward, torch.zeros(1, 3, 8, 8), ["fp32", "bf16"], timer=clock
    )
    assert choice.rejected == ("bf16",) and choice.precision == "fp32"
    assert choice.images_per_s == pytest.approx({"fp32": 5.0, "bf16": 10.0})  # 0.2 s, 0.1 s
    assert "rejected by the accuracy guard: bf16; chose fp32" in choice.summary()


def test_run_batch_with_per_image_settings_equals_separate_predicts():
    # Random weights on noise images: distinct scores, so no tie makes the order arbitrary.
    torch.manual_seed(0)
    detector = Detector(ssd300_vgg16(3, width=0.125).eval(), NAMES)
    g = torch.Generator().manual_seed(0)
    images = [
        torch.randint(0, 256, (3, 480, 640), dtype=torch.uint8, generator=g),
        torch.randint(0, 256, (1, 457, 123), dtype=torch.uint8, generator=g),
    ]
    settings = [(0.4, 4), (0.0, 10)]
    prepared = [detector.prepare(image) for image in images]
    batch = detector.run_batch(
        [inputs for inputs, _ in prepared],
        [size for _, size in prepared],
        [Cut(threshold, cap) for threshold, cap in settings],
    )
    assert len(batch.detections) == len(images)
    assert batch.forward_s > 0 and batch.postprocess_s > 0
    for image, (threshold, cap), got in zip(images, settings, batch.detections, strict=True):
        [alone] = detector.predict([image], score_threshold=threshold, max_detections=cap)
        assert torch.equal(got.boxes, alone.boxes) and torch.equal(got.scores, alone.scores)
        assert got.labels == alone.labels
    assert [len(d) for d in batch.detections] == [4, 10]


def test_run_batch_refuses_mismatched_lengths_naming_them():
    detector = Detector(_known_network(), NAMES)
    inputs, size = detector.prepare(Image.new("RGB", (20, 30)))
    with pytest.raises(ValueError, match="got 2 inputs, 1 sizes and 3 cuts"):
        detector.run_batch([inputs, inputs], [size], [Cut()] * 3)
    assert detector.run_batch([], [], []).detections == []


def test_class_names_become_ids_and_unknown_ones_are_named():
    detector = Detector(_known_network(), NAMES)
    assert detector.cut(0.2, 5, [NAMES[1]]).classes == frozenset({2})
    with pytest.raises(ValueError, match=rf"unknown classes \['cat'\]; this model has {NAMES[0]}"):
        detector.cut(0.2, 5, ["cat"])
    image = Image.new("RGB", (64, 40), (200, 30, 30))
    [kept] = detector.predict([image], score_threshold=0.0, classes=[NAMES[1]])
    assert set(kept.labels) <= {NAMES[1]}


def test_run_batch_checks_one_result_per_input():
    class Short(Detector):
        def _postprocess(self, *args, **kwargs):
            return super()._postprocess(*args, **kwargs)[:-1]

    detector = Short(_known_network(), NAMES)
    inputs, size = detector.prepare(Image.new("RGB", (20, 30)))
    with pytest.raises(RuntimeError, match="returned 1 results for 2 inputs"):
        detector.run_batch([inputs, inputs], [size, size], [Cut(0.1, 5)] * 2)


def test_warm_up_runs_a_blank_image_without_one_from_the_caller():
    calls = []

    class Counting(Detector):
        def run_batch(self, inputs, sizes, cuts):
            calls.append((len(inputs), tuple(inputs[0].shape), list(sizes)))
            return super().run_batch(inputs, sizes, cuts)

    Counting(_known_network(), NAMES).warm_up()
    assert calls == [(1, (3, 300, 300), [(300, 300)])]


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_on_a_gpu_run_batch_agrees_with_the_cpu(precision):
    torch.manual_seed(0)
    network = ssd300_vgg16(3, width=0.25, batch_norm=True).eval()
    cpu = Detector(copy.deepcopy(network), NAMES)  # a Detector moves its network: two copies
    detector = Detector(network, NAMES, device="cuda", precision=precision)
    assert next(detector.network.parameters()).device.type == "cuda"
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, 200, 300), dtype=torch.uint8, generator=g) for _ in "abc"]
    prepared = [cpu.prepare(image) for image in images]
    inputs, sizes = [i for i, _ in prepared], [s for _, s in prepared]
    ran = detector.run_batch(inputs, sizes, [Cut(0.0, 10)] * 3)
    assert len(ran.detections) == 3 and ran.forward_s > 0 and ran.postprocess_s > 0
    for got in ran.detections:  # post-processed results come back on the CPU
        assert got.boxes.device.type == "cpu" and len(got) == 10
    # The GPU's raw outputs against the CPU's: fp32 may run in TF32 and the reduced
    # precisions keep 8 (bf16) or 11 (fp16) bits, so they agree to a few hundredths.
    batch = torch.stack(inputs)
    with torch.inference_mode():
        theirs = cpu.network(cpu.runtime.inputs(batch))
        with detector.runtime.autocast():
            ours = detector.network(detector.runtime.inputs(batch))
    ours = [output.float().cpu() for output in ours]
    torch.testing.assert_close(ours, list(theirs), rtol=0.05, atol=0.05)
