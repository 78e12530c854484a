"""The back-propagated scalar L of CFGA (method.md §4.5), in the authors' float order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn


def cfga_scalar(F: torch.Tensor, mask: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of L = Σ_c max_p(F·M) + Σ_c coef·mean_p(F·M) (method.md §4.5).

    F [B, C, h, w]; mask float32 [B, 1, h, w]; coef float32 [B] = (h·w)/|M|. The average term is
    ``coef · AdaptiveAvgPool`` exactly as the authors wrote it, so dL/dF has their float order, and
    adaptive max-pool sends the gradient to the first argmax only (method.md S22).
    """
    Fm = F * mask
    gmp = Fn.adaptive_max_pool2d(Fm, 1)
    gap = coef.view(-1, 1, 1, 1) * Fn.adaptive_avg_pool2d(Fm, 1)
    return gmp.sum() + gap.sum()


def masked_scalar(F: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of L = Σ_c max_{p∈M} F[c,p] + Σ_c (Σ_{p∈M} F[c,p]) / |M| for a *signed*
    map (method.md §T4): F [B, C, h, w], mask bool [B, h, w], none empty.

    The max runs over the masked cells only (a cell outside M must not count as 0) and sends its
    gradient to the first maximum in row-major order (``argmax``'s documented tie rule), as
    adaptive max-pool does for method.md S22. No gradient flows through the mask.
    """
    Ff = F.flatten(2)
    m = mask.flatten(1)[:, None, :]  # [B, 1, hw]
    idx = Ff.detach().masked_fill(~m, float("-inf")).argmax(dim=-1, keepdim=True)
    mx = Ff.gather(-1, idx)
    a = m.sum(dim=-1, keepdim=True).to(F.dtype)
    avg = (Ff * m.to(F.dtype)).sum(dim=-1, keepdim=True) / a
    return mx.sum() + avg.sum()
