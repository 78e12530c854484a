"""The ResNet family (resnet50/101/152, torchvision layout; method.md §1.1, §3).

What is ResNet-specific lives here: the builders, the trunk forward up to ``layer4.0`` (no
autograd; eval-mode batch norms in place on the CPU), and the tail ``layer4.1``–``layer4.2`` run
with autograd, whose six convs ``layer4.{1,2}.conv{1,2,3}`` are the CFGA layers. Their weight
gradients depend only on the input of ``layer4.1`` and what follows it, so autograd starts there;
the per-image gradient → vector step is ``cfga.numerics.gradients``.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torchvision
from torch import nn
from torchvision.models import resnet

from cfga.numerics.gradients import cfga_vectors, per_sample_weight_grad
from cfga.registry.features import CFGA_LAYERS, cfga_name

ARCHS = {
    "resnet50": torchvision.models.resnet50,
    "resnet101": torchvision.models.resnet101,
    "resnet152": torchvision.models.resnet152,
}


# torchvision IMAGENET1K_V2 files: different weights than the paper used (method.md §1.2).
IMAGENET_V2_FILES = {"resnet50-11ad3fa6.pth", "resnet101-cd907fc2.pth", "resnet152-f82ba261.pth"}

FEAT_DIM = 2048  # channels of layer4's output for resnet50/101/152


def cfga_convs(net: nn.Module) -> list[nn.Conv2d]:
    """The six CFGA convs ``layer4.{1,2}.conv{1,2,3}`` in the authors' emission order."""
    return [getattr(net.layer4[b], f"conv{c}") for b, c in CFGA_LAYERS]


def stem_max_pool(pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``pool(x)``, bit for bit, but through the CPU's channels-last max-pool kernel.

    A max is exact in any order, so the layout cannot change a single bit (NaN and −0.0
    included), while torch's NCHW max-pool kernel on CPU (it always computes argmax indices, one
    window at a time) costs several times the channels-last one plus the two layout copies, a
    visible share of the trunk's forward (BENCHMARKS.md). Other devices and modules: ``pool(x)``.
    """
    if x.device.type != "cpu" or x.dim() != 4 or type(pool) is not nn.MaxPool2d:
        return pool(x)
    return pool(x.contiguous(memory_format=torch.channels_last)).contiguous()


def trunk_to_layer4_0(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Forward of a torchvision ResNet up to the output of ``layer4.0``: [B, 3, H, W] → [B, C, h, w].

    Without autograd on the CPU, eval-mode batch norms write over their conv's output
    (``_bn_``, bit-identical to the modules) instead of filling a fresh tensor: one memory pass
    and one large allocation less for each of the trunk's 50-odd batch norms.
    """
    blocks = [*net.layer1, *net.layer2, *net.layer3, net.layer4[0]]
    if not (_can_norm_in_place(x, [net.bn1]) and type(net.relu) is nn.ReLU
            and all(_plain_block(b) and _can_norm_in_place(x, _block_norms(b)) for b in blocks)):
        x = stem_max_pool(net.maxpool, net.relu(net.bn1(net.conv1(x))))
        x = net.layer3(net.layer2(net.layer1(x)))
        return net.layer4[0](x)
    x = stem_max_pool(net.maxpool, _bn_(net.bn1, net.conv1(x)).relu_())
    for b in blocks:
        x = _block_in_place(b, x)
    return x


_PLAIN_BLOCKS = (resnet.Bottleneck, resnet.BasicBlock)


def _plain_block(b: nn.Module) -> bool:
    """A torchvision Bottleneck/BasicBlock as torchvision builds it (no subclass, no other module)."""
    return (type(b) in _PLAIN_BLOCKS and type(b.relu) is nn.ReLU
            and (b.downsample is None or (type(b.downsample) is nn.Sequential and len(b.downsample) == 2
                                          and type(b.downsample[0]) is nn.Conv2d)))


def _block_norms(b: nn.Module) -> list[nn.Module]:
    names = ("bn1", "bn2", "bn3") if type(b) is resnet.Bottleneck else ("bn1", "bn2")
    return [getattr(b, n) for n in names] + ([] if b.downsample is None else [b.downsample[1]])


def _can_norm_in_place(x: torch.Tensor, norms: list[nn.Module]) -> bool:
    return (x.device.type == "cpu" and not torch.is_grad_enabled()
            and all(type(bn) is nn.BatchNorm2d and not bn.training and bn.running_mean is not None
                    for bn in norms))


def _bn_(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``bn(x)`` of an eval-mode BatchNorm2d, written over x (CPU, no autograd): the same kernel as
    the module's, so the same bits."""
    empty = x.new_empty(0)
    torch.ops.aten.native_batch_norm.out(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, False, 0.0,
                                         bn.eps, out=x, save_mean=empty, save_invstd=empty.clone())
    return x


def _block_in_place(b: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``b(x)`` for a ``_plain_block``, with its batch norms in place (x itself is not modified)."""
    out = _bn_(b.bn1, b.conv1(x)).relu_()
    out = _bn_(b.bn2, b.conv2(out))
    if type(b) is resnet.Bottleneck:
        out = _bn_(b.bn3, b.conv3(out.relu_()))
    identity = x if b.downsample is None else _bn_(b.downsample[1], b.downsample[0](x))
    return out.add_(identity).relu_()


class Layer4Tail:
    """Runs ``layer4.1``–``layer4.2`` with autograd and returns the maps plus a gradient callback.

    Usage::

        tail = Layer4Tail(net)
        F = tail.forward(h)              # h: layer4.0 output [B, C, h, w] (no grad needed)
        for i, v in tail.vectors(L): ...  # the six CFGA vectors [B, C_in], one conv at a time
        # (or tail.weight_grads(L): the six whole gradients [B, C_out, C_in, k, k])
    """

    def __init__(self, net: nn.Module):
        if len(net.layer4) != 3:
            raise ValueError(f"expected a ResNet whose layer4 has 3 blocks, got {len(net.layer4)}")
        self.net = net
        self.convs = cfga_convs(net)
        self._io: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.convs)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h.detach().requires_grad_(True)  # builds the graph even if the weights are frozen
        handles = []
        for i, conv in enumerate(self.convs):
            def hook(_m, inp, out, i=i):
                self._io[i] = (inp[0].detach(), out)
            handles.append(conv.register_forward_hook(hook))
        try:
            with torch.enable_grad():
                F = self.net.layer4[2](self.net.layer4[1](h))
        finally:
            for hd in handles:
                hd.remove()
        return F

    def layer_inputs(self, names) -> dict[str, torch.Tensor]:
        """The inputs X [B, C_in, h, w] of the CFGA convs named ``names`` (feature keys, e.g.
        ``cfga_4_1_2``) from the last ``forward``; call before ``vectors`` (which frees them)."""
        index = {cfga_name(b, c): i for i, (b, c) in enumerate(CFGA_LAYERS)}
        return {n: self._io[index[n]][0] for n in names}

    def vectors(self, L: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (index, CFGA unit vectors [B, C_in]) for the six convs (``cfga_vectors``)."""
        outs = [io[1] for io in self._io]
        dYs = list(torch.autograd.grad(L, outs))
        del outs
        for i, conv in enumerate(self.convs):
            X = self._io[i][0]
            self._io[i] = None
            dY, dYs[i] = dYs[i], None
            yield i, cfga_vectors(X, dY, conv)
            del X, dY

    def weight_grads(self, L: torch.Tensor):
        """Yield (index, G [B, C_out, C_in, k, k]) for the six convs, one at a time (memory)."""
        outs = [io[1] for io in self._io]
        dYs = torch.autograd.grad(L, outs)
        for i, (conv, dY) in enumerate(zip(self.convs, dYs)):
            X = self._io[i][0]
            yield i, per_sample_weight_grad(X, dY, conv)
        self._io = [None] * len(self.convs)
