"""Checkpoint loading: a file on disk → a torchvision ResNet in eval mode (SPEC §1.2).

The ``scda`` protocol takes a raw torchvision state dict (ImageNet V1 files, or the classifier the
offline default trains): trunk keys loaded strictly, ``fc.*`` dropped as the authors do.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torchvision
from torch import nn

from .io import sha256_file
from .protocols import get_protocol

ARCHS = {
    "resnet50": torchvision.models.resnet50,
    "resnet101": torchvision.models.resnet101,
    "resnet152": torchvision.models.resnet152,
}

# torchvision IMAGENET1K_V2 files: different weights than the paper used (SPEC §1.2).
IMAGENET_V2_FILES = {"resnet50-11ad3fa6.pth", "resnet101-cd907fc2.pth", "resnet152-f82ba261.pth"}

# torch.hub's naming rule: <name>-<first hex digits of the sha256>.<ext>
_HUB_NAME = re.compile(r"^(?P<stem>.+)-(?P<hash>[0-9a-f]{8,64})\.pth$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


def verify_hub_hash(path: str | os.PathLike) -> str | None:
    """Check a torch.hub-style file name's sha256 prefix; return the full sha256 (None if unnamed)."""
    p = Path(path)
    m = _HUB_NAME.match(p.name)
    if not m:
        return None
    digest = sha256_file(p)
    if not digest.startswith(m["hash"]):
        raise CheckpointError(
            f"{p}: sha256 {digest[:len(m['hash'])]}… does not match the prefix {m['hash']} in its "
            "file name; the download is corrupt or the file was renamed: download it again"
        )
    return digest


def load_model(
    arch: str,
    protocol: str,
    checkpoint_path: str | os.PathLike,
    *,
    device: str | torch.device = "auto",
    allow_pickle: bool = False,
    format: str | None = None,
) -> nn.Module:
    """Build ``arch`` (resnet50/101/152), load ``checkpoint_path`` for ``protocol``, eval mode.

    ``format`` is the checkpoint layout (``torchvision``, ``ms``, ``proxy_anchor``, ``dgpcrl``;
    SPEC §1.2), detected from the keys when None. The ms and proxy_anchor protocols read the
    embedding head their format carries (as ``model.fc``). The returned module is a plain
    torchvision ResNet; ``model.cfga_meta`` records arch, protocol, format, path and sha256.
    """
    from .checkpoints import load_checkpoint
    from .extract import resolve_device
    from .protocols import HEADED

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")
    get_protocol(protocol)
    path = Path(checkpoint_path)
    if path.name in IMAGENET_V2_FILES:
        raise CheckpointError(
            f"{path}: this is torchvision's IMAGENET1K_V2 file; the paper used the V1 weights "
            f"({arch}-19c8e357.pth / -0676ba61.pth style names). Use the V1 file."
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found; check the models: entry in the config")
    m = _HUB_NAME.match(path.name)
    if m and m["stem"].startswith("resnet") and m["stem"] != arch:
        raise CheckpointError(f"{path}: file name says {m['stem']} but the config says arch: {arch}")
    verify_hub_hash(path)

    net, meta = load_checkpoint(path, arch, format, allow_pickle=allow_pickle)
    if protocol in HEADED and meta["format"] != protocol:
        raise CheckpointError(
            f"{path}: protocol {protocol} evaluates the embedding head of a {protocol}-format checkpoint, "
            f"but this file is format {meta['format']}. Check `protocol:` / `format:` of this model."
        )
    net.to(resolve_device(device))
    net.cfga_meta = {**meta, "protocol": protocol, "checkpoint_sha256": meta["sha256"]}
    return net
