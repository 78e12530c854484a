"""Transformer checkpoints (Swin, ViT): a file → a torchvision Swin / ViT in eval mode
(TRANSFORMERS.md §1, §7).

Layouts are recognised from the keys, never the file name: torchvision state dicts, the official
Microsoft Swin files (``{'model': …}``, downsample at the end of a stage), timm's ViT and Swin
files (flat, or under ``model`` / ``state_dict``), and the pipeline's own Swin DML files
(``{'model': torchvision Swin keys without head.* + class_fc.weight [512, C] + class_fc.bias}``,
format ``ms``). The key maps live in ``cfga.backbones.{swin,vit}``; buffers torchvision computes
(``relative_position_index``, ``attn_mask``, …) are ignored. A ``head.*`` classifier is dropped
(the net keeps torchvision's random one, never used) unless it is the ms embedding head.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from cfga.backbones import family_module
from cfga.checkpoints.formats import CheckpointError, _show, _unwrap_modules
from cfga.registry.archs import arch_info
from cfga.registry.features import EMBED_DIM

TRANSFORMER_FAMILIES = ("swin", "vit")
_CONTAINERS = (None, "model", "state_dict", "model_state_dict")
_HEAD_PREFIX = {"swin": "head.", "vit": "heads."}


def _candidates(obj):
    """(container key, flat name → tensor dict) of each place a state dict may sit."""
    obj = _unwrap_modules(obj)
    if not isinstance(obj, Mapping):
        return
    for key in _CONTAINERS:
        sub = obj if key is None else obj.get(key)
        if isinstance(sub, Mapping) and sub:
            sub = _unwrap_modules(sub)
            yield key, sub


def sniff(obj) -> tuple[str, str, str | None, dict] | None:
    """(family, layout, container key, state) of a Transformer checkpoint, or None."""
    for key, state in _candidates(obj):
        for fam in TRANSFORMER_FAMILIES:
            layout = family_module(fam).sniff_layout(state)
            if layout is not None:
                return fam, layout, key, dict(state)
    return None


def checkpoint_family(obj) -> str | None:
    """"swin" / "vit" for a Transformer checkpoint, "resnet" for one with ``conv1.weight``, else None."""
    found = sniff(obj)
    if found:
        return found[0]
    for _key, state in _candidates(obj):
        if "conv1.weight" in state or "model.conv1.weight" in state:
            return "resnet"
    return None


def load_transformer(path, obj, arch: str, protocol: str) -> tuple[nn.Module, dict]:
    """Map a loaded Transformer checkpoint ``obj`` (read from ``path``) onto torchvision ``arch``,
    strictly → (net in eval mode on the CPU, meta)."""
    info = arch_info(arch)
    bb = family_module(info.family)
    found = sniff(obj)
    if found is None:
        fam = checkpoint_family(obj)
        if fam is not None:
            raise CheckpointError(f"{path}: this is a {fam} checkpoint, but the config says arch: {arch} "
                                  f"({info.family}). Set `arch:` to the file's architecture or use a {info.family} file.")
        tops = [k for k, _ in _candidates(obj)]
        keys = next((list(s) for _, s in _candidates(obj)), [])
        raise CheckpointError(
            f"{path}: not a recognised {info.family} checkpoint (keys: [{_show(keys, 8)}]; containers "
            f"tried: {[k or '<top level>' for k in tops] or 'none'}). Known {info.family} layouts: "
            + "; ".join(f"{k}: {v}" for k, v in bb.LAYOUTS.items()) + ".")
    fam, layout, container, state = found
    if fam != info.family:
        raise CheckpointError(f"{path}: this is a {fam} checkpoint ({layout} layout), but the config says arch: "
                              f"{arch} ({info.family}). Set `arch:` to a {fam} arch or use a {info.family} file.")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries [{_show(bad)}] of its state dict are not tensors "
                              f"(assumed layout: {layout})")
    fmt = "ms" if "class_fc.weight" in state or "class_fc.bias" in state else layout
    head = None
    if fmt == "ms":
        if layout != "torchvision":
            raise CheckpointError(f"{path}: an ms (class_fc.*) head on a {layout}-layout trunk; the ms format "
                                  "holds torchvision keys (as `train:` saves it)")
        head = {"weight": state.pop("class_fc.weight", None), "bias": state.pop("class_fc.bias", None)}
    mapped = bb.to_torchvision_keys(state, layout)
    hp = _HEAD_PREFIX[info.family]
    mapped = {k: v for k, v in mapped.items() if not k.startswith(hp)}

    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream alone
        net = bb.ARCHS[arch](weights=None)
    C = info.channels
    if head is not None:
        net.head = nn.Linear(C, EMBED_DIM)
    fresh = net.state_dict()
    required = {k: v.shape for k, v in fresh.items()
                if not k.startswith(hp) and not any(b in k for b in bb.COMPUTED_BUFFERS)}
    missing = [k for k in required if k not in mapped]
    unexpected = [k for k in mapped if k not in required]
    if head is not None:
        missing += [f"class_fc.{k}" for k, v in head.items() if v is None]
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: does not fit {arch} (assumed layout: {layout}, {bb.LAYOUTS[layout]}"
            f"{', with the ms head' if head is not None else ''}). missing keys ({len(missing)}): "
            f"[{_show(missing)}]; unexpected keys ({len(unexpected)}): [{_show(unexpected)}] (names after "
            f"mapping onto torchvision). Check `arch:` of this model in the config.")
    if head is not None:
        mapped["head.weight"], mapped["head.bias"] = head["weight"], head["bias"]
        required["head.weight"], required["head.bias"] = torch.Size([EMBED_DIM, C]), torch.Size([EMBED_DIM])
    for k, v in mapped.items():
        if tuple(v.shape) != tuple(required[k]):
            raise CheckpointError(f"{path}: tensor {k} (torchvision name) has shape {tuple(v.shape)}, {arch} needs "
                                  f"{tuple(required[k])} (assumed layout: {layout}). Check `arch:` in the config.")
        if v.is_floating_point() and not torch.isfinite(v.sum()) and not torch.isfinite(v).all():
            raise CheckpointError(f"{path}: tensor {k} holds NaN or Inf values (assumed layout: {layout}); "
                                  "the checkpoint is broken: download or train it again")
    full = dict(fresh)
    full.update({k: (v.float() if v.is_floating_point() else v) for k, v in mapped.items()})
    net.load_state_dict(full, strict=True)
    net.eval()
    meta = {"format": fmt, "layout": layout, "container": container, "arch": arch, "family": info.family}
    return net, meta
