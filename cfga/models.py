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


def _load_state(path: Path, allow_pickle: bool = False) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint file not found; check the models: entry") from None
    except Exception as err:
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise CheckpointError(
                f"{path}: the file needs full unpickling, which can run arbitrary code; it was "
                "refused (torch.load weights_only=True). Re-save it as a plain state dict, or, if "
                "you trust its origin, set `allow_pickle: true` on that model in the config."
            ) from None
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({err}); re-download it") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path}: expected a torchvision state dict (name → tensor); got {type(obj).__name__}"
        )
    return obj


def _check_trunk(path: Path, net: nn.Module, state: dict) -> dict:
    expected = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    trunk = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing = sorted(set(expected) - set(trunk))
    unexpected = sorted(set(trunk) - set(expected))
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:6]) + (f" … (+{len(keys) - 6})" if len(keys) > 6 else "")
        raise CheckpointError(
            f"{path}: does not fit the architecture (assumed format: torchvision state dict). "
            f"missing keys: [{show(missing)}]; unexpected keys: [{show(unexpected)}]. "
            "Check `arch:` of this model in the config."
        )
    for k, v in expected.items():
        if tuple(trunk[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{path}: tensor {k} has shape {tuple(trunk[k].shape)}, the architecture needs "
                f"{tuple(v.shape)}. Check `arch:` of this model in the config."
            )
        if trunk[k].is_floating_point() and not torch.isfinite(trunk[k]).all():
            raise CheckpointError(f"{path}: tensor {k} holds NaN or Inf values; the checkpoint is broken")
    return trunk


def load_model(
    arch: str,
    protocol: str,
    checkpoint_path: str | os.PathLike,
    *,
    device: str | torch.device = "auto",
    allow_pickle: bool = False,
) -> nn.Module:
    """Build ``arch`` (resnet50/101/152), load ``checkpoint_path`` for ``protocol``, eval mode.

    The returned module is a plain torchvision ResNet; ``model.cfga_meta`` records the arch,
    protocol, checkpoint path and sha256.
    """
    from .extract import resolve_device

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
    digest = verify_hub_hash(path) or sha256_file(path)

    net = ARCHS[arch](weights=None)
    trunk = _check_trunk(path, net, _load_state(path, allow_pickle))
    net.load_state_dict({**net.state_dict(), **trunk})
    net.eval()
    net.to(resolve_device(device))
    net.cfga_meta = {"arch": arch, "protocol": protocol, "checkpoint": str(path), "checkpoint_sha256": digest}
    return net
