"""Pooling, SCDA features and the L2 normalisation (cfga.numerics.pooling, method.md §4.2-4.3), zero
maps and empty masks included."""
import numpy as np
import pytest
import torch

from cfga.numerics.mask import scda_mask
from cfga.numerics.pooling import l2_normalize, pooling_feature, scda_features


def test_l2_normalize_zero_stays_zero():
    v = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    out = l2_normalize(v)
    assert torch.allclose(out[0], torch.tensor([0.6, 0.8]))
    assert torch.equal(out[1], torch.zeros(2))


def test_scda_features_hand_computed():
    F = torch.tensor([[[1.0, 3.0]], [[2.0, 0.0]]])  # C=2, 1×2
    M = torch.tensor([[True, True]])
    scda, orig = scda_features(F, M, float64=True)
    avg, mx = np.array([2.0, 1.0]), np.array([3.0, 2.0])
    cat = np.concatenate([avg, mx])
    np.testing.assert_allclose(scda.numpy(), cat / np.linalg.norm(cat), rtol=1e-12)
    np.testing.assert_allclose(
        orig.numpy(), np.concatenate([avg / np.linalg.norm(avg), mx / np.linalg.norm(mx)]), rtol=1e-12
    )
    # masked mean divides by |M|, not h·w
    scda1, _ = scda_features(F, torch.tensor([[False, True]]), float64=True)
    cat1 = np.array([3.0, 0.0, 3.0, 0.0])
    np.testing.assert_allclose(scda1.numpy(), cat1 / np.linalg.norm(cat1), rtol=1e-12)


def test_pooling_is_gap_then_gmp_concatenated_then_normalised():
    F = torch.tensor([[[1.0, 3.0]], [[2.0, 0.0]]])
    cat = np.array([2.0, 1.0, 3.0, 2.0])
    np.testing.assert_allclose(pooling_feature(F).numpy(), cat / np.linalg.norm(cat), rtol=1e-6)


@pytest.mark.parametrize("shape", [(4, 1, 1), (4, 3, 5)])
def test_zero_map_pure_functions(shape):
    F = torch.zeros(shape)
    assert scda_mask(F, lcc=True).all()  # empty B → whole map (method.md §4.1)
    assert not scda_mask(F, lcc=False).any()  # no LCC: B stays empty
    for mask in (scda_mask(F, lcc=True), torch.zeros(shape[1:], dtype=torch.bool)):
        for f64 in (True, False):
            scda, orig = scda_features(F, mask, float64=f64)
            assert torch.isfinite(scda).all() and torch.isfinite(orig).all()
            assert not scda.any() and not orig.any()
    p = pooling_feature(F)
    assert torch.isfinite(p).all() and not p.any()


def test_empty_mask_on_a_nonzero_map_gives_zeros_not_nan():
    F = torch.rand(4, 3, 3)
    scda, orig = scda_features(F, torch.zeros(3, 3, dtype=torch.bool), float64=False)
    assert torch.isfinite(scda).all() and torch.isfinite(orig).all()
    assert not scda.any() and not orig.any()


def test_l2_normalize_zero_and_tiny_match_the_oracle_rule():
    """Zero norm → zeros (method.md §4.2). A vector so small that Σv² underflows float32 (≲1e-19) also
    gets norm 0 and becomes zeros: the numpy float32 oracle (v / np.linalg.norm(v)) does the same,
    so this pins agreement with the reference, not a mathematical ideal."""
    v = np.array([[0.0, 0.0, 0.0], [1e-30, 0.0, 0.0], [3e-39, 0.0, 0.0], [3e-19, 4e-19, 0.0],
                  [3.0, 4.0, 0.0]], np.float32)
    out = l2_normalize(torch.from_numpy(v)).numpy()
    assert np.isfinite(out).all()
    for row, got in zip(v, out):
        n = np.linalg.norm(row)
        expected = np.zeros_like(row) if n == 0 else row / n
        np.testing.assert_array_max_ulp(got, expected, maxulp=2)
    assert not out[0].any() and not out[1].any() and not out[2].any()
    np.testing.assert_allclose(out[4], [0.6, 0.8, 0.0], rtol=1e-6)
