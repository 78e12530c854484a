"""Per-image weight gradients and the shipped CFGA step (cfga.numerics.gradients): the fused
per-image path (kernel_responses / cfga_vectors), the batched path, against the whole gradient
and, fuzzed, against the numpy oracle."""
import numpy as np
import pytest
import torch
import torch.nn.functional as Fn
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

import cfga.numerics.gradients as gradients_mod
from cfga.numerics.aggregation import (
    aggregate_response,
    grad_to_vector,
    kernel_response,
)
from cfga.numerics.gradients import (
    centred_tap_columns,
    cfga_vectors,
    kernel_responses,
    live_positions,
    per_sample_weight_grad,
)
from cfga.numerics.pooling import l2_normalize
from tests.reference.spec_reference import reference_grad_to_vector


@pytest.mark.parametrize("k,pad", [(1, 0), (3, 1)])
def test_per_sample_weight_grad_matches_autograd_per_image(k, pad):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 4, k, padding=pad, bias=False)
    X = torch.randn(3, 5, 6, 7)
    Y = conv(X)
    dY = torch.randn_like(Y)
    G = per_sample_weight_grad(X, dY, conv)
    for n in range(3):
        conv.zero_grad()
        conv(X[n : n + 1]).backward(dY[n : n + 1])
        torch.testing.assert_close(G[n], conv.weight.grad, rtol=1e-5, atol=1e-6)

# ---- the extraction's fused path (kernel_responses / cfga_vectors) ---------------------------


def _conv_case(k, pad, c_in=6, c_out=5, seed=0, relu=True):
    g = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(c_in, c_out, k, padding=pad, bias=False)
    X = torch.randn(3, c_in, 5, 7, generator=g)
    if relu:  # like the real inputs (ReLU outputs): the taps share a large common part
        X = X.relu_() + 2.0
    dY = torch.randn(3, c_out, 5, 7, generator=g)
    return conv, X, dY


def test_kernel_responses_1x1_bit_identical_to_full_gradient_path():
    conv, X, dY = _conv_case(1, 0)
    full = kernel_response(per_sample_weight_grad(X, dY, conv))
    got = list(kernel_responses(X, dY, conv))
    assert len(got) == 3
    for n in range(3):
        assert torch.equal(got[n], full[n])
    assert torch.equal(cfga_vectors(X, dY, conv), grad_to_vector(per_sample_weight_grad(X, dY, conv)))


@pytest.mark.parametrize("relu", [True, False])
def test_kernel_responses_3x3_match_full_gradient_path(relu):
    """Range + std from the tap-centred inputs equal method.md §5.1 on the whole gradient (float rounding
    aside)."""
    conv, X, dY = _conv_case(3, 1, relu=relu)
    G = per_sample_weight_grad(X, dY, conv).double()
    flat = G.flatten(-2)
    ref = flat.amax(-1) - flat.amin(-1) + flat.std(-1)  # float64 oracle
    got = torch.stack(list(kernel_responses(X, dY, conv))).double()
    torch.testing.assert_close(got, ref, rtol=2e-6, atol=0)
    v = cfga_vectors(X, dY, conv)
    torch.testing.assert_close(v, grad_to_vector(per_sample_weight_grad(X, dY, conv)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("k,pad,dil,stride", [(3, 1, 1, 1), (3, 0, 1, 1), (3, 2, 2, 1), (5, 2, 1, 1), (3, 1, 1, 2)])
def test_centred_tap_columns_are_unfold_minus_the_tap_mean(k, pad, dil, stride):
    """The shifted-window columns (stride 1) and the unfold fallback (stride 2) hold unfold's
    numbers, centred over the taps, in tap-major rows."""
    conv = torch.nn.Conv2d(4, 2, k, padding=pad, dilation=dil, stride=stride, bias=False)
    X = torch.randn(2, 4, 7, 9).relu_() + 1.0
    cols = Fn.unfold(X, k, dilation=dil, padding=pad, stride=stride).view(2, 4, k * k, -1).double()
    ref = (cols - cols.mean(dim=2, keepdim=True)).transpose(1, 2).reshape(2, k * k * 4, -1)
    got = centred_tap_columns(X, conv)
    assert got.shape == ref.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="zero padding"):
        centred_tap_columns(X, torch.nn.Conv2d(4, 2, 3, padding=1, padding_mode="reflect"))


def test_kernel_responses_3x3_constant_kernels_are_zero():
    """X constant over every 3×3 window's taps (no padding, constant map) → every kernel's gradient
    is constant → r = 0 exactly (std too), so the vector is all zeros, as the oracle's."""
    conv = torch.nn.Conv2d(4, 3, 3, padding=0, bias=False)
    X = torch.full((2, 4, 6, 6), 0.1)
    dY = torch.randn(2, 3, 4, 4)
    r = torch.stack(list(kernel_responses(X, dY, conv)))
    assert torch.equal(r, torch.zeros_like(r))
    assert not cfga_vectors(X, dY, conv).any()


@pytest.mark.parametrize("k,pad", [(1, 0), (3, 1)])
def test_cfga_vectors_propagate_nan_and_keep_images_apart(k, pad):
    conv, X, dY = _conv_case(k, pad)
    clean = cfga_vectors(X, dY, conv)
    dY[1, 2, 0, 0] = float("nan")
    v = cfga_vectors(X, dY, conv)
    assert torch.isnan(v[1]).all()  # a NaN gradient is reported, never turned into zeros
    assert torch.equal(v[0], clean[0]) and torch.equal(v[2], clean[2])  # other images untouched


@pytest.mark.parametrize("k,pad", [(1, 0), (3, 1)])
def test_batched_path_matches_the_per_image_path(k, pad, monkeypatch):
    """The GPU's batched CFGA step (one bmm per conv, chunked) gives the per-image path's vectors:
    whatever the chunking (here 1 and 2 images per chunk, and all 3), NaNs stay in their image."""
    conv, X, dY = _conv_case(k, pad)
    per_image = cfga_vectors(X, dY, conv, batched=False)
    r_ref = torch.stack(list(kernel_responses(X, dY, conv)))
    for elems in (1, conv.weight[0].numel() * 5 * 2, 2**28):  # chunks of 1, 2 and 3 images
        monkeypatch.setattr(gradients_mod, "BATCHED_MAX_ELEMENTS", elems)
        r = gradients_mod.batched_kernel_responses(X, dY, conv)
        torch.testing.assert_close(r, r_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cfga_vectors(X, dY, conv, batched=True), per_image, rtol=0, atol=1e-6)
    dY[1, 2, 0, 0] = float("nan")
    v = cfga_vectors(X, dY, conv, batched=True)
    assert torch.isnan(v[1]).all()
    torch.testing.assert_close(v[[0, 2]], per_image[[0, 2]], rtol=0, atol=1e-6)


def test_live_positions_keep_every_position_with_a_nonzero_or_nan_gradient():
    dYf = torch.zeros(3, 2, 5)
    dYf[0, 1, [1, 3]] = 1.0
    dYf[1, 0, 2] = float("nan")
    dYf[2] = 1.0
    live = live_positions(dYf, below=1.0)
    assert live[0].tolist() == [1, 3] and live[1].tolist() == [2]
    assert live[2] is None  # nothing to skip: the product runs on the matrices themselves
    assert live_positions(dYf, below=0.3)[0] is None  # 2 of 5 live: not below 30 %, not worth a copy


@pytest.mark.parametrize("k,pad", [(1, 0), (3, 1)])
def test_skipping_zero_gradient_positions_changes_nothing(k, pad, monkeypatch):
    """Positions where dY_n is exactly zero (outside the SCDA mask) are left out of image n's
    product; the responses are those of the full product (bit-identical with this machine's MKL;
    the tolerance allows another BLAS to order its sums differently). An all-zero image → zeros."""
    conv, X, dY = _conv_case(k, pad, c_in=16, c_out=12)
    dY[0, :, :, :3] = 0.0  # image 0: 15 of 35 positions live
    dY[1, :, 2:, :] = 0.0  # image 1: 14 of 35 live
    dY[1, 3, 4, 6] = -0.0  # a negative zero is a zero
    dY[2] = 0.0
    monkeypatch.setattr(gradients_mod, "SKIP_ZERO_POSITIONS_BELOW", {"1x1": 0.0, "kxk": 0.0})
    dense = torch.stack(list(kernel_responses(X, dY, conv)))
    monkeypatch.setattr(gradients_mod, "SKIP_ZERO_POSITIONS_BELOW", {"1x1": 1.0, "kxk": 1.0})
    calls = []
    real = gradients_mod._at
    monkeypatch.setattr(gradients_mod, "_at", lambda t, idx: calls.append(idx is not None) or real(t, idx))
    skipped = torch.stack(list(kernel_responses(X, dY, conv)))
    assert sum(calls) == 6  # images 0-2, two operands each, all gathered
    torch.testing.assert_close(skipped, dense, rtol=1e-6, atol=0)
    assert not skipped[2].any() and not cfga_vectors(X, dY, conv)[2].any()
    ref = kernel_response(per_sample_weight_grad(X, dY, conv))
    torch.testing.assert_close(skipped, ref, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("k,pad", [(1, 0), (3, 1)])
def test_cfga_vectors_reusing_one_buffer_equal_fresh_responses(k, pad):
    """cfga_vectors writes every image's r over one buffer (kernel_responses(out=...)) and
    aggregates into preallocated rows: the same bits as fresh tensors image by image."""
    conv, X, dY = _conv_case(k, pad, c_in=16, c_out=12)
    dY[1, :, :, :2] = 0.0  # one image through the live-position path as well
    fresh = torch.stack([aggregate_response(r) for r in kernel_responses(X, dY, conv)])
    assert torch.equal(cfga_vectors(X, dY, conv), l2_normalize(fresh))
    buf = torch.empty(12, 16)
    seen = [r.data_ptr() for r in kernel_responses(X, dY, conv, out=buf)]
    assert seen == [buf.data_ptr()] * 3


def test_grouped_convs_are_refused_by_every_gradient_path():
    conv = torch.nn.Conv2d(4, 4, 1, groups=2, bias=False)
    X, dY = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3)
    for path in (per_sample_weight_grad, lambda *a: list(kernel_responses(*a)),
                 gradients_mod.batched_kernel_responses):
        with pytest.raises(ValueError, match="grouped"):
            path(X, dY, conv)


# ----------------------------------------------------------------------------------------------
# hypothesis fuzz of the shipped path (kernel_responses / cfga_vectors) against the plain
# grad_to_vector of the whole gradient, itself checked against the numpy oracle
# ----------------------------------------------------------------------------------------------

# Hypothesis draws a gradient grid (small integers × a scale, tie-heavy structures). conv_case_for
# builds an input X and an output gradient dY whose per-image weight gradient is exactly that grid
# (× 9 for k = 3): the shipped path, which never forms the gradient, runs on (X, dY); the whole
# gradient per_sample_weight_grad(X, dY) goes through the plain grad_to_vector as the reference.

# Dyadic scales keep the arithmetic of small-integer grids exact (sums, the mean of a constant
# kernel); 0.1, 1e-3 and 3.7 are not representable, so rounding enters.
DYADIC = [1.0, 2.0**-10, 2.0**-20, 2.0**4]
SCALES = DYADIC + [0.1, 1e-3, 3.7]


@st.composite
def gradients(draw, k, scales=tuple(SCALES)):
    B = draw(st.integers(1, 3))
    c_out = draw(st.integers(1, 16))
    c_in = draw(st.integers(1, 16))
    m = draw(st.integers(0, 3))  # grid {-m..m}: small → many exact ties; m = 0 → all zeros
    kind = draw(st.sampled_from(["free", "equal_kernels", "constant_taps", "one_kernel_per_row"]))
    if kind == "free":
        grid = draw(hnp.arrays(np.int8, (B, c_out, c_in, k, k), elements=st.integers(-m, m)))
    elif kind == "equal_kernels":  # every kernel of an image identical
        one = draw(hnp.arrays(np.int8, (B, 1, 1, k, k), elements=st.integers(-m, m)))
        grid = np.broadcast_to(one, (B, c_out, c_in, k, k))
    elif kind == "constant_taps":  # each kernel all-equal (3×3: range = std = 0)
        one = draw(hnp.arrays(np.int8, (B, c_out, c_in, 1, 1), elements=st.integers(-m, m)))
        grid = np.broadcast_to(one, (B, c_out, c_in, k, k))
    else:  # all kernels of an output row identical
        one = draw(hnp.arrays(np.int8, (B, c_out, 1, k, k), elements=st.integers(-m, m)))
        grid = np.broadcast_to(one, (B, c_out, c_in, k, k))
    scale = draw(st.sampled_from(scales))
    event(f"k={k} kind={kind} scale={'dyadic' if scale in DYADIC else 'inexact'}")
    return np.ascontiguousarray(grid.astype(np.float32) * np.float32(scale))


def conv_case_for(G):
    """(X, dY, conv) whose per-image weight gradient is G [B, C_out, C_in, k, k] exactly (k = 1),
    or 9·G (k = 3, padding 1, as layer4's conv2).

    k = 1: one output position per input channel and X one-hot over positions, so
    dY[b, o, i] · 1 is the only product in G[b, o, i].
    k = 3: one isolated input pixel of value 9 per (channel i, tap t), 3 columns from the next;
    the output position whose window holds it at tap t carries dY[b, :, p] = G[b, :, i, t] and
    every other dY is zero (so the shipped path skips those positions). Centred over its taps such
    a window is 8 at t and −1 elsewhere, exact in float32, as the whole gradient is."""
    B, c_out, c_in, k, _ = G.shape
    Gt = torch.from_numpy(np.ascontiguousarray(G))
    if k == 1:
        X = torch.eye(c_in).expand(B, c_in, c_in).reshape(B, c_in, 1, c_in).contiguous()
        dY = Gt.reshape(B, c_out, 1, c_in).clone()
        return X, dY, nn.Conv2d(c_in, c_out, 1, bias=False)
    n = c_in * 9
    X = torch.zeros(B, c_in, 3, 3 * n)
    dY = torch.zeros(B, c_out, 3, 3 * n)
    for j in range(n):
        i, (a, b) = j // 9, divmod(j % 9, 3)
        X[:, i, 1, 3 * j + 1] = 9.0
        dY[:, :, 2 - a, 3 * j + 2 - b] = Gt[:, :, i, a, b]
    return X, dY, nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)


def _shipped(G):
    """The whole gradient, the shipped per-kernel responses and vectors of conv_case_for(G)."""
    X, dY, conv = conv_case_for(G)
    whole = per_sample_weight_grad(X, dY, conv)
    k = G.shape[-1]
    assert torch.equal(whole, torch.from_numpy(G) * (1 if k == 1 else 9))  # the construction is exact
    r = torch.stack(list(kernel_responses(X, dY, conv)))
    return whole, r, cfga_vectors(X, dY, conv)


def _check_norms_and_finite(out):
    assert np.isfinite(out).all()
    norms = np.linalg.norm(out.astype(np.float64), axis=1)
    assert np.all((norms == 0) | (np.abs(norms - 1) < 1e-6)), norms


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(gradients(k=1))
def test_fuzz_1x1_equals_oracle_exactly(G):
    """k = 1: r = |g| is exact and both sides take the same float32 torch means, so the selection is
    identical; only the final normalisation differs (torch vector_norm vs numpy norm), which moves
    entries by at most a few ulp. Zeros must be exactly zero on both sides. The shipped path gives
    the reference's bits."""
    whole, r, v = _shipped(G)
    out = grad_to_vector(whole).numpy()
    ref = np.stack([reference_grad_to_vector(G[b]) for b in range(G.shape[0])])
    _check_norms_and_finite(out)
    np.testing.assert_array_equal(out == 0, ref == 0)
    np.testing.assert_array_max_ulp(out, ref, maxulp=4)
    assert torch.equal(r, kernel_response(whole))
    assert np.array_equal(v.numpy(), out)


def _oracle_r(G):
    """The oracle's per-kernel response (method.md §5.1 with torch.std), [C_out, C_in]."""
    g = torch.from_numpy(G)
    flat = g.flatten(-2)
    return flat.max(dim=-1).values + (-flat).max(dim=-1).values + flat.std(dim=-1)


def _keep(r):
    return (r > r.mean(dim=0, keepdim=True)) & (r > r.mean(dim=1, keepdim=True))


def _has_constant_nonzero_kernel(G):
    flat = G.reshape(*G.shape[:3], -1)
    return bool(((flat == flat[..., :1]).all(-1) & (flat[..., 0] != 0)).any())


def _on_a_dyadic_grid(G):
    """G is a drawn grid's small integers (|m| ≤ 3) times a dyadic scale, where float arithmetic
    (sums, the mean of a constant kernel) is exact; an inexact scale can still give values that
    are multiples of some power of two (3 × 3.7 = 11.1 is one of 2**-20), hence the bound."""
    return any(np.array_equal(G, (G / np.float32(s)).round() * np.float32(s)) and np.abs(G / np.float32(s)).max() <= 3
               for s in DYADIC)


def _check_against_oracle(G, r, out, what):
    """Image by image: r within 1e-6 of the oracle's; same selection → the oracle's vector; a
    flipped selection only on near-ties (method.md S13's accepted band)."""
    for b in range(G.shape[0]):
        ref = reference_grad_to_vector(G[b])
        ro, rc = _oracle_r(G[b]), r[b]
        torch.testing.assert_close(rc, ro, rtol=1e-6, atol=0)
        ko, kc = _keep(ro), _keep(rc)
        if torch.equal(ro, rc):
            event(f"k=3 {what}: r bit-identical")
        if torch.equal(ko, kc):
            event(f"k=3 {what}: same selection")
            np.testing.assert_array_equal(out[b] == 0, ref == 0)
            np.testing.assert_allclose(out[b], ref, rtol=0, atol=1e-6)
        else:
            event(f"k=3 {what}: selection flipped on a near-tie")
            thr = torch.maximum(ro.mean(dim=0, keepdim=True), ro.mean(dim=1, keepdim=True))
            flipped = ko != kc
            gap = (ro - thr).abs()[flipped]
            assert (gap <= 1e-6 * thr.expand_as(ro)[flipped]).all(), (gap, thr)


@FUZZ
@given(gradients(k=3))
def test_fuzz_3x3_equals_oracle_up_to_ties(G):
    """k = 3: cfga's two-pass float32 std differs from torch.std (the oracle's; double-accumulated
    on CPU) by ≤ 1 ulp in ~7-30 % of kernels, even on integer grids (torch's float32 sqrt is not
    always correctly rounded on this CPU). Hence, for the whole-gradient reference and for the
    shipped path alike:
    * r agrees to 1e-6 relative;
    * when both selections coincide the vectors agree up to normalisation rounding (1e-6, and the
      same zero pattern) — always the case when r is bit-identical;
    * otherwise a strict '>' flipped on a near-tie: every flipped cell lies within 1e-6 (relative)
      of its threshold (method.md S13's accepted ~1e-8..1e-4 band), and the output is still unit/zero.
    Constant non-zero kernels at an inexact scale are a known defect (spurious std), tested apart
    in test_3x3_constant_kernel_has_zero_response; they are excluded here."""
    assume(not (not _on_a_dyadic_grid(G) and _has_constant_nonzero_kernel(G)))
    whole, r, v = _shipped(G)
    G = whole.numpy()  # 9 × the drawn grid
    out = grad_to_vector(whole).numpy()
    _check_norms_and_finite(out)
    _check_against_oracle(G, kernel_response(whole), out, "whole gradient")
    _check_norms_and_finite(v.numpy())
    _check_against_oracle(G, r, v.numpy(), "shipped")


@FUZZ
@given(gradients(k=3, scales=tuple(DYADIC)))
def test_fuzz_3x3_dyadic_constant_kernels_are_exact(G):
    """On dyadic integer grids a constant kernel's mean is exact, so its r is exactly 0 on both
    sides (and on the shipped path, whose tap-centred inputs are exact here), and all-equal /
    constant-tap cases (the tie-heavy ones) match the oracle's zero pattern."""
    whole, r_shipped, v = _shipped(G)
    G = whole.numpy()
    flat = G.reshape(*G.shape[:3], -1)
    const = (flat == flat[..., :1]).all(-1)
    r = kernel_response(whole).numpy()
    assert (r[const] == 0).all()
    assert (r_shipped.numpy()[const] == 0).all()
    if const.all():
        out = grad_to_vector(whole).numpy()
        ref = np.stack([reference_grad_to_vector(G[b]) for b in range(G.shape[0])])
        assert not out.any() and not ref.any() and not v.any()


@settings(max_examples=60, deadline=None)
@given(gradients(k=1), st.sampled_from([2.0**-30, 2.0**20]))
def test_fuzz_1x1_is_scale_invariant(G, s):
    """method.md §5 is scale-invariant (r ∝ G, selection unchanged, then normalised)."""
    a = grad_to_vector(torch.from_numpy(G))
    b = grad_to_vector(torch.from_numpy(G * np.float32(s)))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    va, vb = _shipped(G)[2], _shipped(G * np.float32(s))[2]
    torch.testing.assert_close(va, vb, rtol=0, atol=1e-6)
    torch.testing.assert_close(va, a, rtol=0, atol=1e-6)


@pytest.mark.parametrize("path", ["shipped", "whole_gradient"])
@pytest.mark.xfail(strict=True, reason="known limitation: the float32 sums of squares of the std "
                   "(the shipped _centred_tap_response, as the two-pass std of "
                   "cfga.numerics.aggregation.kernel_response) underflow below ~1e-19 (std → 0), "
                   "unlike torch.std; a float64 std would fix it at a cost. Real layer4 gradients are "
                   "far above that scale.")
def test_3x3_tiny_gradients_keep_their_std(path):
    taps = torch.tensor([2.0, 5, 3, 1, -4, 3, 3, -1, -3])
    for s in (1e-22, 1e-25, 1e-30):
        G = (taps.double() * s).float().view(1, 1, 1, 3, 3)
        if path == "shipped":
            X, dY, conv = conv_case_for(G.numpy())
            r = next(kernel_responses(X, dY, conv))
            whole = per_sample_weight_grad(X, dY, conv)[0]
        else:
            r, whole = kernel_response(G)[0], G[0]
        torch.testing.assert_close(r, _oracle_r(whole.numpy()), rtol=1e-6, atol=0)
