"""Image-level features of a feature map: masked SCDA pooling and mask-free Pooling (method.md §4.2, §4.3).

Pure functions over tensors. ``F`` is one map, float32 [C, h, w], or a batch, [..., C, h, w]
(each map is treated on its own); non-negative on a ResNet (it follows a ReLU).
"""
from __future__ import annotations

import torch


def l2_normalize(v: torch.Tensor) -> torch.Tensor:
    """v / ‖v‖₂ along the last dim; a zero-norm vector stays all zeros (method.md §4.2)."""
    n = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    # `!= 0`, not `> 0`: a NaN norm must propagate (and be caught), never turn into zeros.
    nz = n != 0
    return torch.where(nz, v / torch.where(nz, n, torch.ones_like(n)), torch.zeros_like(v))


def scda_features(F: torch.Tensor, mask: torch.Tensor, *, float64: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scda, scda_original) for maps F [..., C, h, w] and masks [..., h, w] → two [..., 2C].

    avg_M = Σ_p F·M / |M|, max_M = max_p F·M, order [avg, max]. ``scda`` concatenates then
    normalises; ``scda_original`` normalises each half (norm √2). The LCC protocol does this in
    float64 (the authors' int mask promotes), the others in float32.
    """
    dtype = torch.float64 if float64 else torch.float32
    m = mask.to(dtype).flatten(-2).unsqueeze(-2)  # [..., 1, hw]
    Fm = F.to(dtype).flatten(-2) * m
    a = m.sum(dim=-1)  # [..., 1]
    avg = Fm.sum(dim=-1) / a.clamp_min(1)  # empty mask: zeros (then the zero-norm rule), not NaN
    mx = Fm.amax(dim=-1)
    scda = l2_normalize(torch.cat([avg, mx], dim=-1))
    original = torch.cat([l2_normalize(avg), l2_normalize(mx)], dim=-1)
    return scda, original


def pooling_feature(F: torch.Tensor) -> torch.Tensor:
    """Pooling (method.md §4.3): L2([GAP(F); GMP(F)]) over each whole map, float32: [..., C, h, w] → [..., 2C]."""
    flat = F.flatten(-2)
    return l2_normalize(torch.cat([flat.mean(dim=-1), flat.amax(dim=-1)], dim=-1))


def masked_scda_features(F: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scda, scda_original) of a *signed* map (method.md §T3), in float64: F [..., C, h, w],
    mask bool [..., h, w] (none empty) → two [..., 2C]. avg_M and max_M run over the masked cells
    only; on a map F ≥ 0 they equal ``scda_features``' values."""
    Ff = F.double().flatten(-2)
    m = mask.flatten(-2).unsqueeze(-2)  # [..., 1, hw]
    avg = (Ff * m).sum(dim=-1) / m.sum(dim=-1)
    mx = Ff.masked_fill(~m, float("-inf")).amax(dim=-1)
    scda = l2_normalize(torch.cat([avg, mx], dim=-1))
    original = torch.cat([l2_normalize(avg), l2_normalize(mx)], dim=-1)
    return scda, original


def pooling_feature64(F: torch.Tensor) -> torch.Tensor:
    """``pooling_feature`` in float64 (method.md §T3): [..., C, h, w] → [..., 2C] float64."""
    return pooling_feature(F.double())
