"""The back-propagated scalar L of CFGA (SPEC §4.5), in the authors' float order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as Fn


def cfga_scalar(F: torch.Tensor, mask: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of L = Σ_c max_p(F·M) + Σ_c coef·mean_p(F·M) (SPEC §4.5).

    F [B, C, h, w]; mask float32 [B, 1, h, w]; coef float32 [B] = (h·w)/|M|. The average term is
    ``coef · AdaptiveAvgPool`` exactly as the authors wrote it, so dL/dF has their float order, and
    adaptive max-pool sends the gradient to the first argmax only (SPEC S22).
    """
    Fm = F * mask
    gmp = Fn.adaptive_max_pool2d(Fm, 1)
    gap = coef.view(-1, 1, 1, 1) * Fn.adaptive_avg_pool2d(Fm, 1)
    return gmp.sum() + gap.sum()
