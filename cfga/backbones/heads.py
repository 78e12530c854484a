"""DML embedding heads on a ResNet feature map (method.md §4.4): what the ms and proxy_anchor
protocols evaluate and what DML training optimises.
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn
from torch import nn

from cfga.registry.protocols import HEADS


def trunk_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """F = output of layer4 (after its last ReLU), [B, 2048, h, w]."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def head_embedding(fc: nn.Module, F: torch.Tensor, head: str) -> torch.Tensor:
    """The embedding of a layer4 map F [B, C, h, w] under ``head`` (method.md §4.4).

    ms: ``normalize(W·GMP(F) + b)`` (F.normalize, eps 1e-12);
    proxy_anchor: ``z / sqrt(Σz² + 1e-12)`` with ``z = W·(GMP(F) + GAP(F)) + b``.
    """
    gmp = F.amax(dim=(2, 3))
    if head == "ms":
        return Fn.normalize(fc(gmp), dim=1)
    if head == "proxy_anchor":
        z = fc(gmp + F.mean(dim=(2, 3)))
        return z / torch.sqrt((z * z).sum(dim=1, keepdim=True) + 1e-12)
    raise ValueError(f"unknown embedding head {head!r}; known: {', '.join(HEADS)}")


def dml_embedding(net: nn.Module, x: torch.Tensor, head: str) -> torch.Tensor:
    """[B, 3, H, W] → L2-normalised [B, 512] embedding of a loaded ms / proxy_anchor net."""
    return head_embedding(net.fc, trunk_features(net, x), head)
