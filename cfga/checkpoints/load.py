"""Checkpoint loading: a file on disk → a torchvision ResNet in eval mode (method.md §1.2).

The ``scda`` protocol takes a raw torchvision state dict (ImageNet V1 files, or the classifier the
offline default trains): trunk keys loaded strictly, ``fc.*`` dropped as the authors do."""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from cfga.backbones.resnet import ARCHS, FEAT_DIM, IMAGENET_V2_FILES
from cfga.checkpoints.formats import (
    _NBT,
    DGPCRL_KNOWN_NCLS,
    FORMATS,
    CheckpointError,
    _trunk_shapes,
    dgpcrl_n_cls,
    log,
    sniff_format,
    to_torchvision,
)
from cfga.checkpoints.transformer import checkpoint_family, load_transformer
from cfga.files import sha256_file
from cfga.registry.archs import ARCH_INFO, arch_info, check_protocol
from cfga.registry.features import EMBED_DIM
from cfga.registry.protocols import HEADS, get_protocol

# torch.hub's naming rule: <name>-<first hex digits of the sha256>.<ext>
_HUB_NAME = re.compile(r"^(?P<stem>.+)-(?P<hash>[0-9a-f]{8,64})\.pth$")



def _torch_load(path: Path, allow_pickle: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint file not found; check the models: entry in the config") from None
    except Exception as err:
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise CheckpointError(
                f"{path}: the file needs full unpickling, which can run arbitrary code; it was "
                "refused (torch.load weights_only=True). Re-save it as a plain dict of tensors, or, if "
                "you trust its origin, set `allow_pickle: true` on that model in the config."
            ) from None
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({err}); re-download it") from None


def load_checkpoint(
    path: str | os.PathLike,
    arch: str,
    fmt: str | None = None,
    *,
    allow_pickle: bool = False,
) -> tuple[nn.Module, dict]:
    """Load one of the authors' checkpoints into torchvision ``arch`` → (net in eval mode, meta).

    ``fmt`` None sniffs it (:func:`sniff_format`). The net's ``fc`` is ``Linear(2048, 512)``
    holding the embedding head for ms/proxy_anchor, else torchvision's default (random, unused).
    meta: ``format``, ``sha256``, ``arch``, ``checkpoint``, and ``n_cls`` for dgpcrl; it is also
    set as ``net.cfga_meta``. The net stays on the CPU.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; known: {', '.join(FORMATS)}")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found; check the models: entry in the config")
    obj = _torch_load(path, allow_pickle)
    other = checkpoint_family(obj)
    if other is not None and other != "resnet":
        raise CheckpointError(f"{path}: this is a {other} checkpoint, but the config says arch: {arch} (resnet). "
                              f"Set `arch:` to the file's {other} architecture or use a ResNet file.")
    if fmt is None:
        try:
            fmt = sniff_format(obj)
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {err}") from None
    trunk, head = to_torchvision(obj, fmt, arch, path=path)
    meta = {"format": fmt, "arch": arch, "checkpoint": str(path), "sha256": sha256_file(path)}
    if fmt == "dgpcrl":
        meta["n_cls"] = dgpcrl_n_cls(obj)
        if meta["n_cls"] not in DGPCRL_KNOWN_NCLS:
            log.info("%s: DGPCRL heads have %d classes (the paper's are 100 for CUB, 98 for Cars); "
                     "they are dropped, so this does not matter", path, meta["n_cls"])
    # float32 throughout (a half-precision file would otherwise make a half-precision net).
    trunk = {k: (v.float() if v.is_floating_point() else v) for k, v in trunk.items()}
    if head is not None:
        head = {k: v.float() for k, v in head.items()}

    # Built on the meta device (no random init), then the checkpoint's tensors are assigned.
    with torch.device("meta"):
        net = ARCHS[arch](weights=None)
    if head is not None:
        net.fc = nn.Linear(FEAT_DIM, EMBED_DIM)
        full = {**trunk, "fc.weight": head["weight"], "fc.bias": head["bias"]}
    else:
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream alone
            net.fc = nn.Linear(FEAT_DIM, 1000)  # torchvision's default fc: random init, never used
        full = {**trunk, "fc.weight": net.fc.weight.detach(), "fc.bias": net.fc.bias.detach()}
    for k in _trunk_shapes(arch):
        if k.endswith(_NBT) and k not in full:
            full[k] = torch.tensor(0, dtype=torch.long)
    net.load_state_dict(full, strict=True, assign=True)
    net.eval()
    net.cfga_meta = meta
    return net, meta


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
    method.md §1.2), detected from the keys when None. The ms and proxy_anchor protocols read the
    embedding head their format carries (as ``model.fc``). The returned module is a plain
    torchvision ResNet; ``model.cfga_meta`` records arch, protocol, format, path and sha256.
    """
    from cfga.checkpoints.load import load_checkpoint
    from cfga.runtime import resolve_device

    info = arch_info(arch)
    get_protocol(protocol)
    check_protocol(arch, protocol)
    path = Path(checkpoint_path)
    if info.family != "resnet":
        return _load_transformer_model(arch, protocol, path, device=resolve_device(device),
                                       allow_pickle=allow_pickle, format=format)
    if path.name in IMAGENET_V2_FILES:
        raise CheckpointError(
            f"{path}: this is torchvision's IMAGENET1K_V2 file; the paper used the V1 weights "
            f"({arch}-19c8e357.pth / -0676ba61.pth style names). Use the V1 file."
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found; check the models: entry in the config")
    _check_hub_name(path, arch)

    net, meta = load_checkpoint(path, arch, format, allow_pickle=allow_pickle)
    if protocol in HEADS and meta["format"] != protocol:
        raise CheckpointError(
            f"{path}: protocol {protocol} evaluates the embedding head of a {protocol}-format checkpoint, "
            f"but this file is format {meta['format']}. Check `protocol:` / `format:` of this model."
        )
    net.to(resolve_device(device))
    net.cfga_meta = {**meta, "protocol": protocol, "checkpoint_sha256": meta["sha256"]}
    return net


def _check_hub_name(path: Path, arch: str) -> None:
    """A torch.hub-style name (``<arch>-<sha256 prefix>.pth``) must name ``arch`` and match its hash."""
    m = _HUB_NAME.match(path.name)
    if m and (m["stem"].startswith("resnet") or m["stem"] in ARCH_INFO) and m["stem"] != arch:
        raise CheckpointError(f"{path}: file name says {m['stem']} but the config says arch: {arch}")
    verify_hub_hash(path)


def _load_transformer_model(arch: str, protocol: str, path: Path, *, device, allow_pickle: bool,
                            format: str | None) -> nn.Module:
    """``load_model`` for a Swin / ViT arch (cfga.checkpoints.transformer)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found; check the models: entry in the config")
    _check_hub_name(path, arch)
    obj = _torch_load(path, allow_pickle)
    net, meta = load_transformer(path, obj, arch, protocol)
    if format is not None and format not in (meta["format"], meta["layout"]):
        raise CheckpointError(f"{path}: the config says format: {format}, but its keys are the {meta['layout']} "
                              f"layout{' with an ms head' if meta['format'] == 'ms' else ''}; drop `format:`")
    if protocol in HEADS and meta["format"] != protocol:
        raise CheckpointError(
            f"{path}: protocol {protocol} evaluates the 512-d embedding head of an {protocol}-format checkpoint "
            f"(as `train:` writes it), but this file has none (layout {meta['layout']}). Check `protocol:`.")
    meta.update(checkpoint=str(path), sha256=sha256_file(path))
    net.to(device)
    net.cfga_meta = {**meta, "protocol": protocol, "checkpoint_sha256": meta["sha256"]}
    return net
