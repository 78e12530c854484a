"""The ViT family (vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14; torchvision layout;
TRANSFORMERS.md §1, §2, §5).

F is the patch tokens after ``encoder.ln``, [B, C, h, w] (row-major patches); the class token
comes out beside it. The CFGA layers are ``self_attention.in_proj_weight`` (qkv),
``self_attention.out_proj.weight`` (proj), ``mlp.0`` (fc1) and ``mlp.3`` (fc2) of the encoder's
last two layers; autograd starts at the input of layer L−2.

Those two layers run through ``_encoder_block``: torchvision's ``EncoderBlock`` forward with
``nn.MultiheadAttention``'s self-attention path written out (packed in-projection, scaled dot
product attention, out-projection), so that the projections' inputs and outputs are tensors
here. The reference test compares it with torchvision's own forward and backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn
import torchvision
from torch import nn

ARCHS = {name: getattr(torchvision.models, name) for name in ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32",
                                                             "vit_h_14")}


def cfga_blocks(net: nn.Module) -> tuple[nn.Module, nn.Module]:
    layers = net.encoder.layers
    if len(layers) < 2:
        raise ValueError(f"expected a ViT with at least 2 encoder layers, got {len(layers)}")
    return layers[-2], layers[-1]


def cfga_weights(net: nn.Module) -> list[torch.Tensor]:
    return [w for b in cfga_blocks(net) for w in (b.self_attention.in_proj_weight, b.self_attention.out_proj.weight,
                                                  b.mlp[0].weight, b.mlp[3].weight)]


def channels(net: nn.Module) -> int:
    return net.hidden_dim


def block_count(net: nn.Module) -> int:
    return len(net.encoder.layers)


def trunk(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] → the input of layer L−2, [B, 1 + h·w, C] (class token first)."""
    x = net._process_input(x)
    x = torch.cat([net.class_token.expand(x.shape[0], -1, -1), x], dim=1)
    x = net.encoder.dropout(x + net.encoder.pos_embedding)
    for blk in list(net.encoder.layers)[:-2]:
        x = blk(x)
    return x


def _encoder_block(blk: nn.Module, inp: torch.Tensor, io: list) -> torch.Tensor:
    """``blk(inp)`` of a torchvision EncoderBlock in eval mode, appending (X, Y) of qkv, proj,
    fc1, fc2 to ``io``."""
    attn = blk.self_attention
    if not attn.batch_first or attn._qkv_same_embed_dim is False or attn.bias_k is not None or attn.add_zero_attn:
        raise ValueError("unsupported ViT attention: expected torchvision's batch-first packed self-attention")
    B, T, C = inp.shape
    H = attn.num_heads
    x = blk.ln_1(inp)
    qkv = Fn.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    io.append((x.detach(), qkv))
    q, k, v = (t.reshape(B, T, H, C // H).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    a = Fn.scaled_dot_product_attention(q, k, v, dropout_p=attn.dropout if attn.training else 0.0)
    a = a.transpose(1, 2).reshape(B, T, C)
    y = Fn.linear(a, attn.out_proj.weight, attn.out_proj.bias)
    io.append((a.detach(), y))
    x = blk.dropout(y) + inp
    z = blk.ln_2(x)
    for i, m in enumerate(blk.mlp):
        out = m(z)
        if i in (0, 3):
            io.append((z.detach(), out))
        z = out
    return x + z


def tail(net: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Layers L−2, L−1 and ``encoder.ln`` with autograd from h → (F [B, C, h, w], class token
    [B, C], [(X, Y)] of the eight CFGA linears as [B, T, ·])."""
    io: list = []
    b0, b1 = cfga_blocks(net)
    T = net.encoder.ln(_encoder_block(b1, _encoder_block(b0, h, io), io))
    B, n, C = T.shape
    g = net.image_size // net.patch_size
    F = T[:, 1:].reshape(B, g, g, C).permute(0, 3, 1, 2)
    return F, T[:, 0], io



def qkv_input_map(blk: nn.Module, X: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The qkv input X [B, 1 + h·w, C] (``ln_1`` of the layer's input, as ``_encoder_block``
    records it) on the patch grid ``size`` = (h, w) → [B, C, h, w]: the class token dropped, the
    patch tokens row-major as in F (method.md §T9). ``blk`` is unused (Swin needs its windows)."""
    h, w = size
    return X[:, 1:].reshape(X.shape[0], h, w, X.shape[-1]).permute(0, 3, 1, 2)

# ---- checkpoint layouts (TRANSFORMERS.md §1): key maps onto torchvision's module names ----

COMPUTED_BUFFERS: tuple[str, ...] = ()

LAYOUTS = {
    "torchvision": "torchvision ViT state dict (class_token, conv_proj.*, encoder.*, heads.*)",
    "timm": "timm ViT (cls_token, pos_embed, patch_embed.proj.*, blocks.{j}.attn.qkv.*, blocks.{j}.mlp.fc1.*, "
            "norm.*, head.*)",
}

_TIMM_BLOCK = (("norm1.", "ln_1."), ("norm2.", "ln_2."), ("attn.qkv.weight", "self_attention.in_proj_weight"),
               ("attn.qkv.bias", "self_attention.in_proj_bias"), ("attn.proj.", "self_attention.out_proj."),
               ("mlp.fc1.", "mlp.0."), ("mlp.fc2.", "mlp.3."))
_TIMM_TOP = {"cls_token": "class_token", "pos_embed": "encoder.pos_embedding",
             "patch_embed.proj.weight": "conv_proj.weight", "patch_embed.proj.bias": "conv_proj.bias",
             "norm.weight": "encoder.ln.weight", "norm.bias": "encoder.ln.bias",
             "head.weight": "heads.head.weight", "head.bias": "heads.head.bias"}


def sniff_layout(state) -> str | None:
    if "class_token" in state and "encoder.pos_embedding" in state:
        return "torchvision"
    if "cls_token" in state and "blocks.0.attn.qkv.weight" in state:
        return "timm"
    return None


def to_torchvision_keys(state: dict, layout: str) -> dict:
    if layout == "torchvision":
        return dict(state)
    out = {}
    for k, v in state.items():
        out[_rename_timm(k)] = v
    return out


def _rename_timm(k: str) -> str:
    if k in _TIMM_TOP:
        return _TIMM_TOP[k]
    parts = k.split(".", 2)
    if parts[0] == "blocks" and len(parts) == 3 and parts[1].isdigit():
        rest = parts[2]
        for a, b in _TIMM_BLOCK:
            if rest.startswith(a):
                return f"encoder.layers.encoder_layer_{parts[1]}.{b}{rest[len(a):]}"
    return k
