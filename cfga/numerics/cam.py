"""The CFGA map of a layer: where its CFGA vector points in the image (CAM with CFGA weights).

For a CFGA+ layer with CFGA vector v [C_in] (the stored feature of that layer) and the layer's
input activations X [C_in, h, w] of the same forward pass:

    map = ReLU(Σ_i v[i] · X[i])   [h, w],

then upsampled bilinearly (``align_corners=False``) to the image size, as CAM does with a class's
weights. Values are in the units of X; figures rescale each map to its own maximum. Which X a
Transformer's qkv layer has (tokens on the grid): method.md §T9.
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn


def cfga_map(v: torch.Tensor, X: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """ReLU(Σ_i v[i]·X[i]) for v [C], X [C, h, w] → float32 [h, w], or [H, W] when ``size`` = (H, W)."""
    if v.ndim != 1 or X.ndim != 3 or X.shape[0] != v.shape[0]:
        raise ValueError(f"need v [C] and X [C, h, w] with the same C, got {tuple(v.shape)} and {tuple(X.shape)}")
    m = torch.einsum("c,chw->hw", v.float(), X.float()).clamp_min(0)
    if size is not None and tuple(size) != tuple(m.shape):
        m = Fn.interpolate(m[None, None], size=tuple(size), mode="bilinear", align_corners=False)[0, 0]
    return m
