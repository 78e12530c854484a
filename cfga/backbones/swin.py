"""The Swin family (swin_t/s/b, swin_v2_t/s/b; torchvision layout; TRANSFORMERS.md §1, §2, §5).

F is the last stage's token map after the model's final LayerNorm, channels first [B, C, h, w]
(what the classifier average-pools). The CFGA layers are ``attn.qkv``, ``attn.proj``, ``mlp.0``
and ``mlp.3`` of the last stage's two blocks; autograd starts at the input of the first of them
(everything before runs without autograd). torchvision's attention calls ``F.linear`` on the qkv
and proj weights directly, so their inputs/outputs are taken by ``LinearCapture`` during
torchvision's own block forward.
"""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from cfga.backbones.capture import LinearCapture

ARCHS = {
    name: getattr(torchvision.models, name)
    for name in ("swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b")
}


def cfga_blocks(net: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(b0, b1): the last stage's two blocks, ``features.7.0`` and ``features.7.1``."""
    stage = net.features[-1]
    if len(stage) < 2:
        raise ValueError(f"expected a Swin whose last stage has 2 blocks, got {len(stage)}")
    return stage[-2], stage[-1]


def cfga_weights(net: nn.Module) -> list[torch.Tensor]:
    """The eight CFGA weights: b0 then b1, each qkv, proj, fc1 (mlp.0), fc2 (mlp.3)."""
    return [w for b in cfga_blocks(net) for w in (b.attn.qkv.weight, b.attn.proj.weight, b.mlp[0].weight,
                                                  b.mlp[3].weight)]


def channels(net: nn.Module) -> int:
    return net.norm.normalized_shape[0]


def block_count(net: nn.Module) -> None:
    """Swin feature names do not depend on the depth (always stage 4's blocks 0 and 1)."""
    return None


def trunk(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] → the input of b0, [B, h, w, C] (channels last, as torchvision keeps it)."""
    h = net.features[:-1](x)
    for blk in list(net.features[-1])[:-2]:
        h = blk(h)
    return h


def tail(net: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, None, list[tuple[torch.Tensor, torch.Tensor]]]:
    """b0, b1, norm with autograd from h → (F [B, C, h, w], None, [(X, Y)] of the eight CFGA
    linears, batch-major: ``X.reshape(B, -1, C_in)`` holds image n's tokens in row n)."""
    b0, b1 = cfga_blocks(net)
    with LinearCapture(cfga_weights(net)) as cap:
        y = b1(b0(h))
    F = net.permute(net.norm(y))
    if any(io is None for io in cap.io):
        raise RuntimeError("a Swin CFGA linear was not called through F.linear; unsupported torchvision version")
    return F, None, cap.io
