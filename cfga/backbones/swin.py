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



def qkv_input_map(blk: nn.Module, X: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """What ``blk``'s attention passed to ``F.linear`` with its qkv weight, X [B·nW, Ws·Ws, C]
    (windowed tokens), back on the token grid → [B, C, h, w] for the grid ``size`` = (h, w).

    torchvision's ``shifted_window_attention`` run backwards: pad to whole windows, cyclic shift
    by −shift (none on an axis whose padded length fits in one window), window partition; so
    un-partition, roll back by +shift and crop the padding (the padded cells are zeros, not
    tokens). v1 blocks feed it ``norm1(block input)``, v2 blocks (norm after attention) the block
    input itself (method.md §T9).
    """
    h, w = size
    wh, ww = blk.attn.window_size
    ph, pw = -(-h // wh) * wh, -(-w // ww) * ww
    sh = blk.attn.shift_size[0] if wh < ph else 0
    sw = blk.attn.shift_size[1] if ww < pw else 0
    C = X.shape[-1]
    x = X.reshape(-1, ph // wh, pw // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ph, pw, C)
    if sh or sw:
        x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
    return x[:, :h, :w].permute(0, 3, 1, 2)

# ---- checkpoint layouts (TRANSFORMERS.md §1): key maps onto torchvision's module names ----

# Buffers torchvision computes in __init__: never read from a file (and absent from timm's).
COMPUTED_BUFFERS = ("relative_position_index", "relative_coords_table", "attn_mask")

LAYOUTS = {
    "torchvision": "torchvision Swin state dict (features.{i}.…, norm.*, head.*)",
    "microsoft": "official Microsoft Swin {'model': patch_embed.*, layers.{i}.blocks.{j}.*, "
                 "layers.{i}.downsample.* at the END of stage i, norm.*, head.*}",
    "timm": "timm Swin (patch_embed.*, layers.{i}.blocks.{j}.*, layers.{i}.downsample.* at the START of "
            "stage i, norm.*, head.fc.*)",
}

_BLOCK_RENAMES = (("mlp.fc1.", "mlp.0."), ("mlp.fc2.", "mlp.3."))


def sniff_layout(state) -> str | None:
    """The Swin layout of a flat state dict, from its keys, or None when it is no Swin."""
    if "features.0.0.weight" in state and any(str(k).startswith("features.1.0.attn.") for k in state):
        return "torchvision"
    if "patch_embed.proj.weight" in state and any(str(k).startswith("layers.0.blocks.0.attn.") for k in state):
        return "microsoft" if "layers.0.downsample.reduction.weight" in state else "timm"
    return None


def to_torchvision_keys(state: dict, layout: str) -> dict:
    """Rename a Swin state dict of ``layout`` to torchvision's keys (computed buffers dropped;
    a v2 file's separate q_bias / v_bias become torchvision's qkv.bias with a zero k part)."""
    out = {}
    for k, v in state.items():
        if any(k.endswith(b) or f".{b}" in k for b in COMPUTED_BUFFERS):
            continue
        out[_rename(k, layout)] = v
    for k in [k for k in out if k.endswith(".attn.q_bias")]:
        prefix = k[: -len("q_bias")]
        q, vb = out.pop(k), out.pop(prefix + "v_bias", None)
        if vb is not None:
            out[prefix + "qkv.bias"] = torch.cat([q, torch.zeros_like(q), vb])
        else:
            out[k] = q  # left as is: reported as unexpected (no v_bias)
    return out


def _rename(k: str, layout: str) -> str:
    if layout == "torchvision":
        return k
    if k.startswith("patch_embed.proj."):
        return "features.0.0." + k[len("patch_embed.proj."):]
    if k.startswith("patch_embed.norm."):
        return "features.0.2." + k[len("patch_embed.norm."):]
    if k.startswith("head.fc."):
        return "head." + k[len("head.fc."):]
    parts = k.split(".")
    if parts[0] == "layers" and len(parts) > 2 and parts[1].isdigit():
        i = int(parts[1])
        if parts[2] == "blocks":
            rest = ".".join(parts[4:])
            for a, b in _BLOCK_RENAMES:
                if rest.startswith(a):
                    rest = b + rest[len(a):]
            return f"features.{2 * i + 1}.{parts[3]}.{rest}"
        if parts[2] == "downsample":
            stage = 2 * i + 2 if layout == "microsoft" else 2 * i
            return f"features.{stage}." + ".".join(parts[3:])
    return k
