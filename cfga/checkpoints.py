"""The authors' checkpoint formats ⇄ a torchvision ResNet (SPEC §1.1, §1.2, §4.4).

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
:func:`dml_embedding` computes the embedding the evaluation protocols use (SPEC §4.4).

BN ``num_batches_tracked`` buffers are optional in every format (files written before torch 0.4.1
lack them; they do not influence an eval-mode forward); a missing one keeps the fresh net's 0.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as Fn
from torch import nn

from .io import atomic_path, sha256_file
from .models import ARCHS, CheckpointError

log = logging.getLogger(__name__)

FORMATS = ("torchvision", "ms", "proxy_anchor", "dgpcrl")

EMBED_DIM = 512
FEAT_DIM = 2048  # channels of layer4's output for resnet50/101/152
DGPCRL_KNOWN_NCLS = (100, 98)  # CUB, Cars (SPEC §1.1); others are accepted and recorded

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
    """Map a loaded checkpoint of format ``fmt`` onto torchvision ``arch`` (SPEC §1.2), strictly.

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


# ---------------------------------------------------------------------------------------------
# Embedding heads (SPEC §4.4): what the ms and proxy_anchor protocols evaluate.

HEADS = ("ms", "proxy_anchor")


def trunk_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """F = output of layer4 (after its last ReLU), [B, 2048, h, w]."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def head_embedding(fc: nn.Module, F: torch.Tensor, head: str) -> torch.Tensor:
    """The embedding of a layer4 map F [B, C, h, w] under ``head`` (SPEC §4.4).

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


# ---------------------------------------------------------------------------------------------
# Writers: exactly the authors' key layouts (SPEC §1.2), atomically.

def _trunk_of(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items() if not k.startswith("fc.")}


def _embedding_fc(net: nn.Module) -> nn.Linear:
    fc = getattr(net, "fc", None)
    if not isinstance(fc, nn.Linear) or fc.in_features != FEAT_DIM or fc.out_features != EMBED_DIM or fc.bias is None:
        raise ValueError(f"net.fc must be Linear({FEAT_DIM}, {EMBED_DIM}) with bias (the embedding head); got {fc}")
    return fc


def _save(path, obj) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def ms_state(net: nn.Module) -> dict:
    fc = _embedding_fc(net)
    state = _trunk_of(net)
    state["class_fc.weight"] = fc.weight.detach().cpu().clone()
    state["class_fc.bias"] = fc.bias.detach().cpu().clone()
    return {"model": state}


def proxy_anchor_state(net: nn.Module, fc_seed: int = 0) -> dict:
    fc = _embedding_fc(net)
    gen = torch.Generator().manual_seed(fc_seed)
    bound = 1.0 / FEAT_DIM**0.5  # nn.Linear's default init range, from a fixed generator
    state = {f"model.{k}": v for k, v in _trunk_of(net).items()}
    state["model.fc.weight"] = (torch.rand(1000, FEAT_DIM, generator=gen) * 2 - 1) * bound
    state["model.fc.bias"] = (torch.rand(1000, generator=gen) * 2 - 1) * bound
    state["model.embedding.weight"] = fc.weight.detach().cpu().clone()
    state["model.embedding.bias"] = fc.bias.detach().cpu().clone()
    return {"model_state_dict": state}


def dgpcrl_state(net: nn.Module, n_cls: int, seed: int = 0) -> dict:
    if int(n_cls) < 1:
        raise ValueError(f"n_cls must be positive, got {n_cls}")
    gen = torch.Generator().manual_seed(seed)
    state = _trunk_of(net)
    state["class_fc.weight"] = torch.randn(int(n_cls), FEAT_DIM, generator=gen) * 0.01
    state["class_fc_2.weight"] = torch.randn(int(n_cls), 2 * FEAT_DIM, generator=gen) * 0.01
    return {"model": state}


def save_ms(path: str | os.PathLike, net: nn.Module) -> None:
    """{'model': trunk + class_fc.weight [512,2048] + class_fc.bias [512]} (MS/CosFace/ArcFace)."""
    _save(path, ms_state(net))


def save_proxy_anchor(path: str | os.PathLike, net: nn.Module) -> None:
    """{'model_state_dict': model.<trunk> + random 1000-way model.fc.* + model.embedding.*}."""
    _save(path, proxy_anchor_state(net))


def save_dgpcrl(path: str | os.PathLike, net: nn.Module, n_cls: int, seed: int = 0) -> None:
    """{'model': trunk + random bias-free class_fc.weight [n_cls,2048], class_fc_2.weight [n_cls,4096]}.

    ``net.fc`` is ignored (DGPCRL's embedding is parameter-free pooling).
    """
    _save(path, dgpcrl_state(net, n_cls, seed))
