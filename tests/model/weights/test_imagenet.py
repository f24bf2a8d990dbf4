import time

import pytest
import torch
import torchvision
from torch import nn

from model import ssd300_vgg16
from model.train import main as train_main
from model.weights.imagenet import imagenet_cache_path, load_vgg16_backbone
from tests.support.offline import use_refusing_proxy


@pytest.fixture(scope="module")
def vgg16_state():
    torch.manual_seed(0)
    return torchvision.models.vgg16().state_dict()


def _base_convs(network):
    layers = [*network.stages[0].modules(), *network.stages[1].modules()]
    return [m for m in layers if isinstance(m, nn.Conv2d)]


def test_convs_are_copied_and_fc_layers_subsampled(vgg16_state, tmp_path):
    path = tmp_path / "vgg16.pth"
    torch.save(vgg16_state, path)
    network = ssd300_vgg16(21)
    load_vgg16_backbone(network, path)
    convs = _base_convs(network)
    assert torch.equal(convs[0].weight, vgg16_state["features.0.weight"])  # conv1_1
    assert torch.equal(convs[9].bias, vgg16_state["features.21.bias"])  # conv4_3
    assert torch.equal(convs[12].weight, vgg16_state["features.28.weight"])  # conv5_3

    fc6, fc7 = convs[13], convs[14]
    assert fc6.weight.shape == (1024, 512, 3, 3) and fc7.weight.shape == (1024, 1024, 1, 1)
    w6 = vgg16_state["classifier.0.weight"].view(4096, 512, 7, 7)
    # filter 1 <- VGG filter 4; tap (2, 1) <- tap (6, 3); input channel unchanged
    assert fc6.weight[1, 7, 2, 1] == w6[4, 7, 6, 3]
    assert fc6.weight[1023, 511, 0, 2] == w6[4092, 511, 0, 6]
    assert fc6.bias[5] == vgg16_state["classifier.0.bias"][20]
    w7 = vgg16_state["classifier.3.weight"]
    assert fc7.weight[2, 5, 0, 0] == w7[8, 20]
    assert fc7.bias[3] == vgg16_state["classifier.3.bias"][12]


def test_the_rest_of_the_network_is_untouched(vgg16_state):
    network = ssd300_vgg16(21)
    before = {k: v.clone() for k, v in network.state_dict().items() if "heads" in k}
    load_vgg16_backbone(network, vgg16_state)
    for key, value in before.items():
        assert torch.equal(network.state_dict()[key], value)


@pytest.mark.parametrize("ours_has_bn", [True, False])
def test_vgg16_bn_gives_the_same_conv1_function(ours_has_bn):
    torch.manual_seed(1)
    reference = torchvision.models.vgg16_bn().eval()
    for module in reference.modules():
        if isinstance(module, nn.BatchNorm2d):  # non-trivial statistics
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    network = ssd300_vgg16(21, batch_norm=ours_has_bn).eval()
    load_vgg16_backbone(network, reference.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = reference.features[:6](x)  # conv1_1, bn, relu, conv1_2, bn, relu
        ours = network.stages[0][: 6 if ours_has_bn else 4](x)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_wrong_inputs_are_explained(vgg16_state, tmp_path):
    with pytest.raises(ValueError, match="width"):
        load_vgg16_backbone(ssd300_vgg16(21, width=0.5), vgg16_state)
    with pytest.raises(ValueError, match="not a torchvision VGG16"):
        load_vgg16_backbone(ssd300_vgg16(21), {"features.0.weight": torch.zeros(1, 1, 1, 1)})
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"junk\.pth"):
        load_vgg16_backbone(ssd300_vgg16(21), junk)


def test_imagenet_by_name_loads_from_a_seeded_cache(vgg16_state, tmp_path, monkeypatch):
    # torch's cache, pre-seeded with a generated state dict of the right shapes at the very
    # file name torchvision's weights API uses; nothing is downloaded.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = imagenet_cache_path(batch_norm=False)
    assert cached == tmp_path / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth"
    assert imagenet_cache_path(batch_norm=True).name == "vgg16_bn-6c64b313.pth"
    cached.parent.mkdir(parents=True)
    torch.save(vgg16_state, cached)
    network = ssd300_vgg16(21)
    load_vgg16_backbone(network, "imagenet")
    assert torch.equal(_base_convs(network)[0].weight, vgg16_state["features.0.weight"])


def test_imagenet_offline_fails_at_once_saying_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    use_refusing_proxy(monkeypatch)
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "vgg16_bn-6c64b313.pth"
    started = time.monotonic()
    with pytest.raises(FileNotFoundError) as caught:
        load_vgg16_backbone(ssd300_vgg16(21, batch_norm=True), "imagenet")
    # Refused, not waited out: a refused connection returns within milliseconds, while a
    # socket timeout or a retry with back-off would take tens of seconds. 30 s leaves room
    # for a machine many times slower.
    assert time.monotonic() - started < 30
    message = str(caught.value)
    assert "https://download.pytorch.org/models/vgg16_bn-6c64b313.pth" in message
    assert str(expected) in message and not expected.exists()


def test_training_cli_names_the_missing_imagenet_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    use_refusing_proxy(monkeypatch)
    out = tmp_path / "x.safetensors"
    args = ["--data", "synthetic:8", "--out", str(out), "--backbone-weights", "imagenet"]
    assert train_main([*args, "--batch-size", "2", "--workers", "0"]) == 2
    assert "vgg16-397923af.pth" in capsys.readouterr().err
    assert not out.exists()
