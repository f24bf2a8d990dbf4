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

from model import Detector, autotune, ssd300_vgg16
from model.checkpoint import save_checkpoint
from model.runtime import resolve_precision
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


def test_per_image_thresholds_equal_separate_runs():
    detector = Detector(_known_network(), NAMES)
    g = torch.Generator().manual_seed(0)
    loc = torch.randn(2, 8732, 4, generator=g) * 0.5
    conf = torch.randn(2, 8732, 3, generator=g) * 1.5  # no saturated (tied) scores
    sizes = [(640, 480), (300, 200)]
    mixed = detector.decode(loc, conf, sizes, [0.05, 0.6], [200, 7])
    for i, (threshold, cap) in enumerate([(0.05, 200), (0.6, 7)]):
        alone = detector.decode(loc[i : i + 1], conf[i : i + 1], sizes[i : i + 1], threshold, cap)
        assert torch.equal(mixed[i].boxes, alone[0].boxes)
        assert torch.equal(mixed[i].scores, alone[0].scores)
        assert mixed[i].labels == alone[0].labels
    assert len(mixed[1]) == 7 and len(mixed[0]) > 7
    with pytest.raises(ValueError, match="2 values for 1 images"):
        detector.decode(loc[:1], conf[:1], sizes[:1], [0.1, 0.2])


def test_prepare_forward_decode_equals_predict():
    detector = Detector(_known_network(), NAMES)
    image = Image.new("RGB", (64, 40), (200, 30, 30))
    inputs, size = detector.prepare(image)
    assert inputs.shape == (3, 300, 300) and size == (64, 40)
    loc, conf = detector.forward(inputs[None])
    staged = detector.decode(loc, conf, [size])[0]
    direct = detector.predict([image])[0]
    assert torch.equal(staged.boxes, direct.boxes) and staged.labels == direct.labels


def test_auto_precision_is_the_fastest_measured_candidate():
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"
    detector = Detector(_known_network(), NAMES, precision="auto")
    choice = detector.precision_choice
    assert choice is not None and detector.precision == choice.precision
    assert set(choice.images_per_s) == set(autotune.candidates(torch.device("cpu")))
    passing = {k: v for k, v in choice.images_per_s.items() if k not in choice.rejected}
    assert choice.precision == max(passing, key=passing.__getitem__)
    assert all(rate > 0 for rate in choice.images_per_s.values())
    assert detector.runtime.precision == choice.precision
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
        [threshold for threshold, _ in settings],
        [cap for _, cap in settings],
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
    with pytest.raises(ValueError, match="2 inputs, 1 sizes, 2 score_thresholds and 3 max_"):
        detector.run_batch([inputs, inputs], [size], [0.1, 0.2], [1, 2, 3])
    assert detector.run_batch([], [], [], []).detections == []


def test_stage_then_run_staged_equals_run_batch_and_checks_lengths():
    # The batcher stages the next batch on a thread of its own while the current one runs
    # (app.batcher): the two halves give what run_batch gives in one call.
    torch.manual_seed(0)
    detector = Detector(ssd300_vgg16(3, width=0.125).eval(), NAMES)
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, 200, 300), dtype=torch.uint8, generator=g) for _ in "ab"]
    prepared = [detector.prepare(image) for image in images]
    inputs, sizes = [i for i, _ in prepared], [s for _, s in prepared]
    staged = detector.stage(inputs)
    assert staged.tensor.shape == (2, 3, 300, 300) and staged.ready is None  # no GPU, no event
    assert staged.tensor.is_contiguous(memory_format=detector.runtime.memory_format)
    halves = detector.run_staged(staged, sizes, [0.0, 0.2], [5, 3]).detections
    whole = detector.run_batch(inputs, sizes, [0.0, 0.2], [5, 3]).detections
    for got, expected in zip(halves, whole, strict=True):
        assert torch.equal(got.boxes, expected.boxes) and got.labels == expected.labels
    with pytest.raises(ValueError, match="2 images, 1 sizes, 2 score_thresholds and 2 max_"):
        detector.run_staged(staged, sizes[:1], [0.1, 0.1], [1, 1])
    with pytest.raises(ValueError, match="at least one input"):
        detector.stage([])


def test_run_batch_checks_one_result_per_input():
    class Short(Detector):
        def decode(self, *args, **kwargs):
            return super().decode(*args, **kwargs)[:-1]

    detector = Short(_known_network(), NAMES)
    inputs, size = detector.prepare(Image.new("RGB", (20, 30)))
    with pytest.raises(RuntimeError, match="returned 1 results for 2 inputs"):
        detector.run_batch([inputs, inputs], [size, size], [0.1, 0.1], [5, 5])


def test_warm_up_runs_a_blank_image_without_one_from_the_caller():
    calls = []

    class Counting(Detector):
        def run_batch(self, inputs, sizes, score_thresholds, max_detections):
            calls.append((len(inputs), tuple(inputs[0].shape), list(sizes)))
            return super().run_batch(inputs, sizes, score_thresholds, max_detections)

    Counting(_known_network(), NAMES).warm_up()
    assert calls == [(1, (3, 300, 300), [(300, 300)])]


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_on_a_gpu_staging_copies_from_pinned_memory_on_its_own_stream(precision):
    torch.manual_seed(0)
    network = ssd300_vgg16(3, width=0.25, batch_norm=True).eval()
    cpu = Detector(copy.deepcopy(network), NAMES)  # a Detector moves its network: two copies
    detector = Detector(network, NAMES, device="cuda", precision=precision)
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, 200, 300), dtype=torch.uint8, generator=g) for _ in "abc"]
    prepared = [cpu.prepare(image) for image in images]
    inputs, sizes = [i for i, _ in prepared], [s for _, s in prepared]
    batch = torch.stack(inputs)
    pinned = detector.runtime.staged(batch)
    assert pinned.is_pinned() and not batch.is_pinned() and torch.equal(pinned, batch)
    assert detector.runtime.staged(pinned) is pinned  # already pinned: no second copy
    # Two batches staged before either runs, as the batcher does (it stages the next batch
    # while the current one runs); each waits for its own copy through its event.
    first, second = detector.stage(inputs), detector.stage(inputs[:2])
    for staged, count in ((first, 3), (second, 2)):
        assert staged.ready is not None and staged.tensor.device.type == "cuda"
        assert staged.tensor.is_contiguous(memory_format=detector.runtime.memory_format)
        staged.ready.synchronize()
        assert torch.equal(staged.tensor.cpu(), batch[:count])  # the bytes arrived intact
    assert detector._copy_stream is not None
    assert detector._copy_stream != torch.cuda.current_stream(detector.device)
    thresholds, caps = [0.0] * 3, [10] * 3
    ran_first = detector.run_staged(first, sizes, thresholds, caps).detections
    ran_second = detector.run_staged(second, sizes[:2], thresholds[:2], caps[:2]).detections
    whole = detector.run_batch(inputs, sizes, thresholds, caps).detections
    for got, expected in zip([*ran_first, *ran_second], [*whole, *whole[:2]], strict=True):
        assert torch.equal(got.boxes, expected.boxes) and got.labels == expected.labels
    # The GPU's raw outputs against the CPU's: fp32 may run in TF32 and the reduced
    # precisions keep 8 (bf16) or 11 (fp16) bits, so they agree to a few hundredths.
    with torch.inference_mode():
        theirs = cpu.forward(batch)
        ours = [output.cpu() for output in detector.forward(batch)]
    torch.testing.assert_close(ours, list(theirs), rtol=0.05, atol=0.05)
