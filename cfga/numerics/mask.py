"""The SCDA mask of a feature map (method.md §4.1).

Pure functions over tensors. ``F`` is one map, float32 [C, h, w], or a batch, [..., C, h, w]
(each map is treated on its own).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage


def threshold_mask(F: torch.Tensor) -> torch.Tensor:
    """B = S > mean(S) with S = Σ_c F[c] (float32, strict >): F [..., C, h, w] → bool [..., h, w]."""
    S = F.sum(dim=-3)
    return S > S.mean(dim=(-2, -1), keepdim=True)


def largest_component(B: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of bool [h, w]; ties → lowest label (first in raster order).

    An empty ``B`` returns the whole map, as the authors' ``label == 0`` does (method.md §4.1).
    """
    labels, n = ndimage.label(B)  # default structure = 4-connectivity, raster-order labels
    if n == 0:
        return np.ones_like(B, dtype=bool)
    counts = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(counts)) + 1)  # argmax keeps the first of equal counts


def scda_mask(F: torch.Tensor, lcc: bool) -> torch.Tensor:
    """The SCDA selection M of maps F [..., C, h, w] → bool [..., h, w] on F's device.

    ``lcc=True`` (scda protocol) keeps each map's largest 4-connected component (labelled on the
    CPU: one transfer for the whole batch); otherwise M = B.
    """
    B = threshold_mask(F)
    if not lcc:
        return B
    Bn = B.cpu().numpy()
    flat = Bn.reshape(-1, *Bn.shape[-2:])
    M = np.stack([largest_component(b) for b in flat]).reshape(Bn.shape) if flat.shape[0] else Bn
    return torch.from_numpy(M).to(F.device)
