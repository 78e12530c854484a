"""Gradient → vector on whole gradients (cfga.numerics.aggregation, method.md §5): the per-kernel
response, the strict selection and mean, the plain ``grad_to_vector`` (the reference the shipped
per-image path of cfga.numerics.gradients is compared with)."""
import numpy as np
import pytest
import torch

from cfga.numerics.aggregation import (
    aggregate_response,
    grad_to_vector,
    kernel_response,
)
from tests.reference.spec_reference import reference_grad_to_vector


def test_kernel_response_1x1_is_abs():
    G = torch.tensor([[[[[-2.0]], [[3.0]]]]])  # [B=1, C_out=1, C_in=2, 1, 1]
    assert torch.equal(kernel_response(G), torch.tensor([[[2.0, 3.0]]]))


def test_kernel_response_3x3_range_plus_unbiased_std_no_abs():
    taps = torch.arange(9, dtype=torch.float32) - 6.0  # -6..2: max 2, max(-g) 6, std of 0..8 = sqrt(7.5)
    G = taps.view(1, 1, 1, 3, 3)
    r = kernel_response(G)
    assert r.shape == (1, 1, 1)
    assert r.item() == pytest.approx(2 + 6 + np.sqrt(7.5), rel=1e-6)


def test_aggregate_strict_selection_and_mean_over_outputs():
    # r [C_out=2, C_in=3]
    r = torch.tensor([[[1.0, 4.0, 1.0], [3.0, 2.0, 1.0]]])
    # colmeans: [2, 3, 1]; rowmeans: [2, 2]
    # keep: (0,1): 4>3 & 4>2 → yes; (1,0): 3>2 & 3>2 → yes; (0,2)/(1,2): 1>1 is false (strict)
    v = aggregate_response(r)
    assert torch.allclose(v, torch.tensor([[3 / 2, 4 / 2, 0.0]]))


def test_grad_to_vector_all_equal_gives_zeros():
    G = torch.ones(2, 4, 3, 1, 1)  # every r equal → no strict selection → v = 0 → zeros
    assert torch.equal(grad_to_vector(G), torch.zeros(2, 3))


def test_aggregate_response_propagates_nan():
    r = torch.tensor([[[1.0, 4.0, 1.0], [3.0, float("nan"), 1.0]]])
    assert torch.isnan(aggregate_response(r)).any()


@pytest.mark.parametrize("k", [1, 3])
def test_zero_gradient_gives_zero_vector(k):
    G = torch.zeros(2, 5, 4, k, k)
    r = kernel_response(G)
    assert torch.equal(r, torch.zeros(2, 5, 4))
    v = aggregate_response(r)
    assert torch.equal(v, torch.zeros(2, 4))
    out = grad_to_vector(G)
    assert torch.equal(out, torch.zeros(2, 4))
    for b in range(2):
        assert np.array_equal(reference_grad_to_vector(G[b].numpy()), np.zeros(4, np.float32))


def test_3x3_constant_kernel_has_zero_response():
    """One kernel of nine equal taps (0.1), every other kernel zero: method.md §5.1 gives r = 0
    everywhere → no selection → the zero vector (the oracle's answer). (Fixed: a constant kernel has std exactly 0.)"""
    G = np.zeros((1, 2, 2, 3, 3), np.float32)
    G[0, 0, 0] = 0.1
    assert not reference_grad_to_vector(G[0]).any()
    assert kernel_response(torch.from_numpy(G))[0, 0, 0].item() == 0.0
    assert not grad_to_vector(torch.from_numpy(G)).any()
