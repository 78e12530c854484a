"""CFGA: a conv weight gradient → one vector indexed by input channel (method.md §5).

Pure, batched tensor functions: a leading batch dim B holds independent images.
"""
from __future__ import annotations

import torch

from cfga.numerics.pooling import l2_normalize


def kernel_response(G: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """Per-kernel response r of gradients G [B, C_out, C_in, k, k] → [B, C_out, C_in].

    1×1: |g|. k×k: max g + max(−g) + unbiased std over the k² taps (no abs; method.md §5.1, S8).
    ``inplace`` lets the 1×1 case overwrite G (the extraction's gradients are scratch).
    """
    if G.shape[-1] == 1 and G.shape[-2] == 1:
        return G[..., 0, 0].abs_() if inplace else G[..., 0, 0].abs()
    taps = G.flatten(-2)
    n = taps.shape[-1]
    mx, mn = taps.amax(dim=-1), taps.amin(dim=-1)
    # Two-pass std instead of torch.std (Welford; slower on CPU, BENCHMARKS.md): same up to ~1 ulp,
    # well inside method.md S13's tolerance. A constant kernel gets exactly 0, as torch.std gives.
    centred = taps - taps.mean(dim=-1, keepdim=True)
    std = centred.square_().sum(dim=-1).div_(n - 1).sqrt_()
    std.masked_fill_(mx == mn, 0.0)
    return (mx + mn.neg()).add_(std)  # max g + max(−g) + std, in that order; max(−g) == −min g


def aggregate_response(r: torch.Tensor, *, inplace: bool = False, scratch: torch.Tensor | None = None,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """Selected mean over output channels: r [..., C_out, C_in] → v [..., C_in] (method.md §5.2).

    keep = r > mean over C_out (column) AND r > mean over C_in (row), both strict; v averages
    r·keep over C_out, unselected cells counting as zeros. r is never modified (``inplace`` is
    accepted for compatibility and ignored).

    Both strict tests are one test against the larger mean, done as float multiply-adds (a float
    0/1 keep times r, the reference's own ``r * keep``): bool masks and ``masked_fill`` cost
    more on CPU (BENCHMARKS.md). A NaN in r propagates (0·NaN = NaN) instead of vanishing.

    ``scratch`` (r's shape) and ``out`` (v's shape) let a caller looping over images reuse the
    same memory for every image; the values are the same.
    """
    colmean = r.mean(dim=-2, keepdim=True)
    rowmean = r.mean(dim=-1, keepdim=True)
    # The full-size threshold becomes the 0/1 keep in place.
    keep = torch.maximum(colmean, rowmean, out=scratch)
    torch.gt(r, keep, out=keep)
    return torch.mean(keep.mul_(r), dim=-2, out=out)


def grad_to_vector(G: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """Full CFGA transform: G [B, C_out, C_in, k, k] → unit vectors [B, C_in] (zeros if v = 0).

    ``inplace`` allows overwriting G (saves a pass over a 4–19 MB tensor per image).
    """
    # r is a fresh tensor (or G's own storage when inplace): aggregating in place is safe.
    r = kernel_response(G, inplace=inplace)
    return l2_normalize(aggregate_response(r, inplace=True))
