"""Backbone families: builders, the feature map, the CFGA layers and where autograd starts (one module per family).

``cfga.backbones.resnet``, ``.swin`` and ``.vit`` each own what differs between families; this
module only tells a net's family and hands out the family module (imported lazily: the ResNet
path never pays for the Transformer modules' imports).

A Transformer family module provides: ``ARCHS`` (builders), ``trunk(net, x)`` (no autograd, up to
the input of the second-to-last block), ``tail(net, h)`` → (F [B, C, h, w], class token or None,
[(X, Y)] of the eight CFGA linears), ``qkv_input_map(blk, X, (h, w))`` (a qkv linear's captured
input X on the token grid, [B, C, h, w]; for the heatmaps), ``cfga_blocks``, ``cfga_weights``,
``channels``, ``block_count``, and its checkpoint layouts: ``LAYOUTS``, ``sniff_layout(state)``,
``to_torchvision_keys(state, layout)``, ``COMPUTED_BUFFERS``. The ResNet module keeps its own,
older shape (``trunk_to_layer4_0``, ``Layer4Tail``; formats in ``cfga.checkpoints.formats``):
its features are pinned byte for byte, so it was left as it is.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from cfga.registry.archs import FAMILIES, arch_info


def family_module(family: str) -> ModuleType:
    if family not in FAMILIES:
        raise ValueError(f"unknown backbone family {family!r}; known: {', '.join(FAMILIES)}")
    return importlib.import_module(f"cfga.backbones.{family}")


def family_of(net, default: str | None = None) -> str:
    """The family of a torchvision net ("resnet", "swin" or "vit"), from its class; another class
    gets ``default`` (the extraction passes "resnet": its ResNet path predates the families and
    accepts any module with a ResNet's attributes), or a ValueError when None."""
    from torchvision.models import ResNet, SwinTransformer, VisionTransformer

    for cls, fam in ((ResNet, "resnet"), (SwinTransformer, "swin"), (VisionTransformer, "vit")):
        if isinstance(net, cls):
            return fam
    if default is not None:
        return default
    raise ValueError(f"unsupported backbone {type(net).__name__}: expected a torchvision ResNet, "
                     "SwinTransformer or VisionTransformer (load it with cfga.load_model)")


def builder(arch: str):
    """torchvision's builder of ``arch`` (e.g. ``torchvision.models.swin_t``)."""
    return family_module(arch_info(arch).family).ARCHS[arch]


def embedding_fc(net):
    """The module holding a DML net's 512-d embedding head: ``fc`` (ResNet), ``head`` (Swin)."""
    return net.fc if family_of(net, default="resnet") == "resnet" else net.head
