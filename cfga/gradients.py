"""Per-image weight gradients of the six CFGA convs, without back-propagating through the trunk.

The authors back-propagate the scalar L (SPEC §4.5) through the whole network, one image at a
time, and read ``layer4.{1,2}.conv{1,2,3}.weight.grad``. Those gradients depend only on the
input of ``layer4.1`` and on what follows it, so here:

1. the trunk up to ``layer4.0`` runs without autograd;
2. ``layer4.1``–``layer4.2`` run with autograd, recording each CFGA conv's input X and output Y;
3. ``autograd.grad(L, Y)`` gives dL/dY per image (eval-mode BN keeps images independent, so the
   batch's summed scalar yields each image's own dY);
4. the weight gradient of image n is ``dY_n ⊗ X_n``: ``dY_n [C_out, hw] @ X_nᵀ [hw, C_in]`` for
   1×1 convs and ``dY_n @ unfold(X_n)ᵀ`` for the 3×3 conv — it never mixes images.
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn
from torch import nn

from .features import CFGA_LAYERS


def cfga_convs(net: nn.Module) -> list[nn.Conv2d]:
    """The six CFGA convs ``layer4.{1,2}.conv{1,2,3}`` in the authors' emission order."""
    return [getattr(net.layer4[b], f"conv{c}") for b, c in CFGA_LAYERS]


def per_sample_weight_grad(X: torch.Tensor, dY: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Weight gradient of ``conv`` for each image: X [B, C_in, h, w], dY [B, C_out, h', w']
    → G [B, C_out, C_in, kh, kw] (float32, same device)."""
    if conv.groups != 1:
        raise ValueError("grouped convolutions are not supported")
    B, C_out = dY.shape[:2]
    kh, kw = conv.kernel_size
    dYf = dY.reshape(B, C_out, -1)
    C_in = X.shape[1]
    if (kh, kw) == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0):
        cols = X.reshape(B, C_in, -1)
        return torch.bmm(dYf, cols.transpose(1, 2)).view(B, C_out, C_in, 1, 1)
    cols = Fn.unfold(X, (kh, kw), dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    # Tap-major columns [B, k², C_in, hw]: the result is stored tap-major, so the per-kernel
    # reductions over the k² taps (cfga.aggregation) run vectorised across input channels.
    cols = cols.view(B, C_in, kh * kw, -1).transpose(1, 2).reshape(B, kh * kw * C_in, -1)
    G = torch.bmm(dYf, cols.transpose(1, 2)).view(B, C_out, kh * kw, C_in)
    return G.transpose(2, 3).unflatten(3, (kh, kw))  # a [B, C_out, C_in, kh, kw] view


def trunk_to_layer4_0(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Forward of a torchvision ResNet up to the output of ``layer4.0``: [B, 3, H, W] → [B, C, h, w]."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    x = net.layer3(net.layer2(net.layer1(x)))
    return net.layer4[0](x)


def cfga_scalar(F: torch.Tensor, mask: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of L = Σ_c max_p(F·M) + Σ_c coef·mean_p(F·M) (SPEC §4.5).

    F [B, C, h, w]; mask float32 [B, 1, h, w]; coef float32 [B] = (h·w)/|M|. The average term is
    ``coef · AdaptiveAvgPool`` exactly as the authors wrote it, so dL/dF has their float order, and
    adaptive max-pool sends the gradient to the first argmax only (SPEC S22).
    """
    Fm = F * mask
    gmp = Fn.adaptive_max_pool2d(Fm, 1)
    gap = coef.view(-1, 1, 1, 1) * Fn.adaptive_avg_pool2d(Fm, 1)
    return gmp.sum() + gap.sum()


class Layer4Tail:
    """Runs ``layer4.1``–``layer4.2`` with autograd and returns the maps plus a gradient callback.

    Usage::

        tail = Layer4Tail(net)
        F = tail.forward(h)              # h: layer4.0 output [B, C, h, w] (no grad needed)
        grads = tail.weight_grads(L)     # list of 6 tensors [B, C_out, C_in, k, k]
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

    def weight_grads(self, L: torch.Tensor):
        """Yield (index, G [B, C_out, C_in, k, k]) for the six convs, one at a time (memory)."""
        outs = [io[1] for io in self._io]
        dYs = torch.autograd.grad(L, outs)
        for i, (conv, dY) in enumerate(zip(self.convs, dYs)):
            X = self._io[i][0]
            yield i, per_sample_weight_grad(X, dY, conv)
        self._io = [None] * len(self.convs)
