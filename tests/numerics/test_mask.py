"""The SCDA mask (cfga.numerics.mask, method.md §4.1): strict threshold, largest 4-connected component."""
import numpy as np
import torch

from cfga.numerics.mask import largest_component, scda_mask


def test_threshold_is_strict_and_lcc_picks_largest_then_first():
    F = torch.zeros(1, 3, 4)
    F[0, 0, 0] = 5  # single cell component (first in raster order)
    F[0, 2, 0:2] = 5  # two-cell component
    F[0, 0, 3] = 1  # below mean? mean = 16/12 = 1.33 → not selected
    assert scda_mask(F, lcc=False).sum() == 3
    M = scda_mask(F, lcc=True)
    assert M.sum() == 2 and M[2, 0] and M[2, 1]


def test_lcc_tie_goes_to_first_component():
    B = np.array([[0, 1, 0, 0], [0, 0, 0, 1]], dtype=bool)
    M = largest_component(B)
    assert M[0, 1] and not M[1, 3]


def test_lcc_uses_4_connectivity():
    B = np.array([[1, 0], [0, 1]], dtype=bool)  # diagonal: two components under 4-connectivity
    assert largest_component(B).sum() == 1


def test_empty_mask_with_lcc_is_whole_map():
    F = torch.ones(2, 1, 1)  # 1×1 map (input ≤ 32 px): S is constant, B is empty
    assert scda_mask(F, lcc=True).all()
