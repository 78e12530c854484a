"""The authors' checkpoint formats ⇄ a torchvision ResNet (method.md §1.1, §1.2, §4.4).

Every network of the paper is a plain torchvision ResNet; the formats differ only in where the
state dict sits in the saved object, in a ``model.`` prefix, and in the heads stored beside the
trunk:

=================  ===========================  =============================================
format             saved object                 state-dict keys (besides the trunk)
=================  ===========================  =============================================
``torchvision``    the state dict itself, or    ``fc.*`` (any size; dropped)
                   ``{'state_dict': state}``
``ms``             ``{'model': state}``         ``class_fc.weight [512,2048]``,
(MS, CosFace,                                   ``class_fc.bias [512]``  → the embedding head
ArcFace)
``proxy_anchor``   ``{'model_state_dict':       every key prefixed ``model.``; ``model.fc.*``
                   state}``                     (1000-way, unused; dropped) and
                                                ``model.embedding.weight [512,2048]``,
                                                ``model.embedding.bias [512]`` → the head
``dgpcrl``         ``{'model': state}``         bias-free ``class_fc.weight [n_cls,2048]`` and
                                                ``class_fc_2.weight [n_cls,4096]`` (dropped)
=================  ===========================  =============================================

Other top-level entries of the saved dict (optimizer, epoch, …) are ignored. A loaded network is a
torchvision ResNet in eval mode whose ``fc`` is ``Linear(2048, 512)`` holding the embedding head
(ms, proxy_anchor), or the default 1000-way ``fc`` (untouched random init; never used) otherwise.
:func:`dml_embedding` computes the embedding the evaluation protocols use (method.md §4.4).

BN ``num_batches_tracked`` buffers are optional in every format (files written before torch 0.4.1
lack them; they do not influence an eval-mode forward); a missing one keeps the fresh net's 0."""
from __future__ import annotations

import logging
from typing import Mapping

import torch
from torch import nn

from cfga.backbones.resnet import ARCHS, FEAT_DIM
from cfga.registry.features import EMBED_DIM

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


FORMATS = ("torchvision", "ms", "proxy_anchor", "dgpcrl")






DGPCRL_KNOWN_NCLS = (100, 98)  # CUB, Cars (method.md §1.1); others are accepted and recorded


# Where each format keeps its state dict in the saved object.
_CONTAINER = {"ms": "model", "dgpcrl": "model", "proxy_anchor": "model_state_dict", "torchvision": None}


_DESCRIBE = {
    "torchvision": "torchvision state dict (name → tensor, optionally under 'state_dict')",
    "ms": "MS/CosFace/ArcFace {'model': trunk + class_fc.weight/bias}",
    "proxy_anchor": "Proxy Anchor {'model_state_dict': model.<torchvision keys> + model.embedding.*}",
    "dgpcrl": "DGPCRL {'model': trunk + class_fc.weight + class_fc_2.weight}",
}


_NBT = "num_batches_tracked"


def _show(keys, n: int = 6) -> str:
    keys = list(keys)
    return ", ".join(map(str, keys[:n])) + (f" … (+{len(keys) - n} more)" if len(keys) > n else "")


def _is_state(d) -> bool:
    return isinstance(d, Mapping) and len(d) > 0 and all(isinstance(v, torch.Tensor) for v in d.values())


def _unwrap_modules(obj):
    """A fully unpickled file may hold nn.Modules where state dicts are expected: take their state."""
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        return {k: (v.state_dict() if isinstance(v, nn.Module) else v) for k, v in obj.items()}
    return obj


def sniff_format(obj) -> str:
    """The format of a loaded checkpoint object, decided on its KEYS only (never the file name).

    Rules, first match wins:

    1. top-level ``model_state_dict`` holding ``model.embedding.weight`` → ``proxy_anchor``;
    2. top-level ``model`` holding ``class_fc_2.weight`` → ``dgpcrl``;
    3. top-level ``model`` holding ``class_fc.bias`` → ``ms``;
    4. a flat name → tensor dict holding ``conv1.weight`` (optionally under ``state_dict``)
       → ``torchvision``;
    5. anything else → :class:`CheckpointError` listing the top-level keys and the known formats.
    """
    obj = _unwrap_modules(obj)
    if isinstance(obj, Mapping):
        sub = obj.get("model_state_dict")
        if isinstance(sub, Mapping) and "model.embedding.weight" in sub:
            return "proxy_anchor"
        sub = obj.get("model")
        if isinstance(sub, Mapping) and "class_fc_2.weight" in sub:
            return "dgpcrl"
        if isinstance(sub, Mapping) and "class_fc.bias" in sub:
            return "ms"
        flat = obj.get("state_dict") if isinstance(obj.get("state_dict"), Mapping) else obj
        if _is_state(flat) and "conv1.weight" in flat:
            return "torchvision"
        top = _show(list(obj.keys()), 8)
        hint = ""
        if _is_state(flat) and any(str(k).startswith("module.") for k in flat):
            hint = " The keys carry a 'module.' prefix (saved from nn.DataParallel): strip it and re-save."
    else:
        top, hint = f"(not a dict: {type(obj).__name__})", ""
    raise CheckpointError(
        f"unknown checkpoint layout; top-level keys: [{top}]. Known formats: "
        + "; ".join(f"{f}: {_DESCRIBE[f]}" for f in FORMATS)
        + "."
        + hint
    )


_ARCH_CACHE: dict[str, dict[str, torch.Size]] = {}


def _trunk_shapes(arch: str) -> dict[str, torch.Size]:
    """Trunk key → shape of torchvision ``arch`` (built once on the meta device: no init cost)."""
    if arch not in _ARCH_CACHE:
        with torch.device("meta"):
            net = ARCHS[arch](weights=None)
        _ARCH_CACHE[arch] = {k: v.shape for k, v in net.state_dict().items() if not k.startswith("fc.")}
    return _ARCH_CACHE[arch]


def _expected(fmt: str, arch: str) -> tuple[dict[str, torch.Size], set[str]]:
    """(required key → shape, optional keys) in the FILE's naming (DGPCRL heads: checked apart)."""
    trunk = dict(_trunk_shapes(arch))
    if fmt == "torchvision":
        return trunk, {"fc.weight", "fc.bias"}
    if fmt == "ms":
        return {**trunk, "class_fc.weight": torch.Size([EMBED_DIM, FEAT_DIM]),
                "class_fc.bias": torch.Size([EMBED_DIM])}, set()
    if fmt == "proxy_anchor":
        req = {f"model.{k}": s for k, s in trunk.items()}
        req["model.embedding.weight"] = torch.Size([EMBED_DIM, FEAT_DIM])
        req["model.embedding.bias"] = torch.Size([EMBED_DIM])
        return req, {"model.fc.weight", "model.fc.bias"}
    if fmt == "dgpcrl":
        return dict(trunk), set()  # the two heads are checked separately (n_cls is free)
    raise ValueError(f"unknown checkpoint format {fmt!r}; known: {', '.join(FORMATS)}")


def _state_of(obj, fmt: str, path) -> dict:
    obj = _unwrap_modules(obj)
    key = _CONTAINER[fmt]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: assumed format {fmt}, but the file holds a {type(obj).__name__}, not a dict")
    if key is None:
        state = obj["state_dict"] if isinstance(obj.get("state_dict"), Mapping) else obj
    else:
        if key not in obj or not isinstance(obj[key], Mapping):
            raise CheckpointError(
                f"{path}: assumed format {fmt} ({_DESCRIBE[fmt]}), but there is no {key!r} dict; "
                f"top-level keys: [{_show(list(obj.keys()), 8)}]"
            )
        state = _unwrap_modules(obj[key])
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{path}: assumed format {fmt}; entries [{_show(bad)}] of its state dict are not tensors"
        )
    return dict(state)


def to_torchvision(obj, fmt: str, arch: str, *, path="<checkpoint>") -> tuple[dict, dict | None]:
    """Map a loaded checkpoint of format ``fmt`` onto torchvision ``arch`` (method.md §1.2), strictly.

    → (trunk state in torchvision naming without ``fc.*``, head ``{'weight' [512,2048], 'bias'
    [512]}`` or None). Raises :class:`CheckpointError` naming missing / unexpected keys, wrong
    shapes, non-tensor entries or NaN/Inf, the assumed format and ``path``. A DGPCRL head of any
    class count is accepted (read it back with :func:`dgpcrl_n_cls`).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; known: {', '.join(FORMATS)}")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")
    state = _state_of(obj, fmt, path)
    required, optional = _expected(fmt, arch)

    head_keys = {"class_fc.weight", "class_fc_2.weight"} if fmt == "dgpcrl" else set()
    # Listed in the architecture's module order / the file's order: the first few are telling.
    missing = [k for k in required if k not in state and not k.endswith(_NBT)]
    missing += sorted(k for k in head_keys if k not in state)
    unexpected = [k for k in state if k not in required and k not in optional and k not in head_keys]
    if missing or unexpected:
        hint = ""
        try:
            other = sniff_format(obj)
            if other != fmt:
                hint = f" Its keys look like format {other!r}: pass format: {other} (or leave it unset)."
        except CheckpointError:
            pass
        raise CheckpointError(
            f"{path}: does not fit {arch} (assumed format: {fmt}, {_DESCRIBE[fmt]}). "
            f"missing keys ({len(missing)}): [{_show(missing)}]; "
            f"unexpected keys ({len(unexpected)}): [{_show(unexpected)}]. "
            f"Check `arch:` and the format of this model in the config.{hint}"
        )
    for k, shape in required.items():
        if k in state and tuple(state[k].shape) != tuple(shape):
            raise CheckpointError(
                f"{path}: tensor {k} has shape {tuple(state[k].shape)}, {arch} in format {fmt} needs "
                f"{tuple(shape)}. Check `arch:` of this model in the config."
            )
    if fmt == "dgpcrl":
        w1, w2 = state["class_fc.weight"], state["class_fc_2.weight"]
        n = w1.shape[0] if w1.dim() == 2 else -1
        for k, want in (("class_fc.weight", (n, FEAT_DIM)), ("class_fc_2.weight", (n, 2 * FEAT_DIM))):
            if n < 1 or tuple(state[k].shape) != want:
                raise CheckpointError(
                    f"{path}: tensor {k} has shape {tuple(state[k].shape)}, format dgpcrl needs "
                    f"(n_cls, {want[1]}) with the same n_cls in class_fc.weight "
                    f"{tuple(w1.shape)} and class_fc_2.weight {tuple(w2.shape)}"
                )
    for k, v in state.items():
        # A finite sum proves every element finite (NaN/Inf propagate); check exactly otherwise.
        if v.is_floating_point() and not torch.isfinite(v.sum()) and not torch.isfinite(v).all():
            raise CheckpointError(
                f"{path}: tensor {k} holds NaN or Inf values (assumed format {fmt}); the checkpoint is broken"
            )

    if fmt == "proxy_anchor":
        state = {k[len("model."):]: v for k, v in state.items()}
        head = {"weight": state.pop("embedding.weight"), "bias": state.pop("embedding.bias")}
    elif fmt == "ms":
        head = {"weight": state.pop("class_fc.weight"), "bias": state.pop("class_fc.bias")}
    else:
        head = None
        state.pop("class_fc.weight", None)
        state.pop("class_fc_2.weight", None)
    trunk = {k: v for k, v in state.items() if not k.startswith("fc.")}
    return trunk, head


def dgpcrl_n_cls(obj) -> int:
    """Class count of a DGPCRL checkpoint's heads (100 for CUB, 98 for Cars in the paper)."""
    return int(_state_of(obj, "dgpcrl", "<checkpoint>")["class_fc.weight"].shape[0])




