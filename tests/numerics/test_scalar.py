"""The CFGA scalar L (cfga.numerics.scalar, method.md §4.5) and its gradient."""
import torch

from cfga.numerics.scalar import cfga_scalar


def test_scalar_gradient_first_argmax_and_coef_over_hw():
    F = torch.tensor([[[[2.0, 2.0], [1.0, 0.0]]]], requires_grad=True)  # tie at the max
    mask = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]]])
    coef = torch.tensor([4 / 3])
    L = cfga_scalar(F, mask, coef)
    (g,) = torch.autograd.grad(L, F)
    base = (4 / 3) / 4
    expected = torch.tensor([[[[1 + base, base], [base, 0.0]]]])  # max grad to the FIRST argmax only
    assert torch.allclose(g, expected)
