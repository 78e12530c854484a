"""SCDA mask and the image-level features built on it (SPEC §4.1–§4.3).

Pure functions over tensors. ``F`` is the ``layer4`` output of ONE image, float32 [C, h, w],
non-negative (it follows a ReLU).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage


def l2_normalize(v: torch.Tensor) -> torch.Tensor:
    """v / ‖v‖₂ along the last dim; a zero-norm vector stays all zeros (SPEC §4.2)."""
    n = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    # `!= 0`, not `> 0`: a NaN norm must propagate (and be caught), never turn into zeros.
    nz = n != 0
    return torch.where(nz, v / torch.where(nz, n, torch.ones_like(n)), torch.zeros_like(v))


def threshold_mask(F: torch.Tensor) -> torch.Tensor:
    """B = S > mean(S) with S = Σ_c F[c] (float32, strict >): bool [h, w]."""
    S = torch.sum(F.unsqueeze(0), dim=1)[0]
    return S > torch.mean(S)


def largest_component(B: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of bool [h, w]; ties → lowest label (first in raster order).

    An empty ``B`` returns the whole map, as the authors' ``label == 0`` does (SPEC §4.1).
    """
    labels, n = ndimage.label(B)  # default structure = 4-connectivity, raster-order labels
    if n == 0:
        return np.ones_like(B, dtype=bool)
    counts = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(counts)) + 1)  # argmax keeps the first of equal counts


def scda_mask(F: torch.Tensor, lcc: bool) -> torch.Tensor:
    """The SCDA selection M for one map F [C, h, w] → bool [h, w] on F's device.

    ``lcc=True`` (scda protocol) keeps the largest 4-connected component; otherwise M = B.
    """
    B = threshold_mask(F)
    if not lcc:
        return B
    return torch.from_numpy(largest_component(B.cpu().numpy())).to(F.device)


def scda_features(F: torch.Tensor, mask: torch.Tensor, *, float64: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scda, scda_original) for one map F [C, h, w] and mask [h, w] → two [2C] vectors.

    avg_M = Σ_p F·M / |M|, max_M = max_p F·M, order [avg, max]. ``scda`` concatenates then
    normalises; ``scda_original`` normalises each half (norm √2). The LCC protocol does this in
    float64 (the authors' int mask promotes), the others in float32.
    """
    dtype = torch.float64 if float64 else torch.float32
    m = mask.to(dtype)
    Fm = F.to(dtype).flatten(1) * m.flatten()
    a = m.sum()
    avg = Fm.sum(dim=1) / a.clamp_min(1)  # empty mask: zeros (then the zero-norm rule), not NaN
    mx = Fm.amax(dim=1)
    scda = l2_normalize(torch.cat([avg, mx]))
    original = torch.cat([l2_normalize(avg), l2_normalize(mx)])
    return scda, original


def pooling_feature(F: torch.Tensor) -> torch.Tensor:
    """Pooling (SPEC §4.3): L2([GAP(F); GMP(F)]) over the whole map, float32 → [2C]."""
    flat = F.flatten(1)
    return l2_normalize(torch.cat([flat.mean(dim=1), flat.amax(dim=1)]))
