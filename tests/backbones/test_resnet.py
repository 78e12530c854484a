"""The ResNet trunk (cfga.backbones.resnet): in-place eval norms and the stem pool, bit-identical
to torchvision's modules."""
import pytest
import torch
import torchvision

import cfga.backbones.resnet as resnet_mod
from cfga.backbones.resnet import stem_max_pool, trunk_to_layer4_0


def _resnet_with_trained_looking_norms(arch):
    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return net.eval()


@pytest.mark.parametrize("arch", ["resnet50", "resnet18"])
def test_trunk_with_in_place_norms_is_bit_identical_to_the_modules(arch):
    net = _resnet_with_trained_looking_norms(arch)
    x = torch.randn(2, 3, 48, 64)
    x0 = x.clone()
    with torch.no_grad():
        ref = net.layer4[0](net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x))))))))
        got = trunk_to_layer4_0(net, x)
    assert got.numpy().tobytes() == ref.numpy().tobytes()
    assert torch.equal(x, x0)  # the input is never written over


def test_trunk_falls_back_to_the_modules_where_in_place_norms_would_be_wrong(monkeypatch):
    """Autograd on, a training-mode norm, or a block torchvision did not build: the modules run."""
    net = _resnet_with_trained_looking_norms("resnet50")
    x = torch.randn(1, 3, 48, 64)
    calls = []
    monkeypatch.setattr(resnet_mod, "_bn_", lambda *a: calls.append(1) or a[1])
    with torch.no_grad():
        trunk_to_layer4_0(net, x)
    assert calls  # the in-place path was taken
    calls.clear()
    with torch.enable_grad():
        trunk_to_layer4_0(net, x)
    net.layer2[1].bn2.train()
    with torch.no_grad():
        trunk_to_layer4_0(net, x)
    net.layer2[1].bn2.eval()

    class Custom(torchvision.models.resnet.Bottleneck):
        pass

    net.layer3[0].__class__ = Custom
    with torch.no_grad():
        trunk_to_layer4_0(net, x)
    assert not calls


def test_stem_max_pool_is_bit_identical_to_the_module():
    pool = torch.nn.MaxPool2d(3, 2, 1)
    x = torch.randn(2, 8, 15, 17)
    x[0, 0, 3, 3] = float("nan")
    x[1, 1] = -0.0
    x[1, 2, 4, 4] = float("inf")
    assert stem_max_pool(pool, x).numpy().tobytes() == pool(x).numpy().tobytes()
    assert stem_max_pool(pool, x).is_contiguous()
