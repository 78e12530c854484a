"""Each numeric function of cfga on tiny inputs checked by hand."""
import numpy as np
import pytest
import torch
import torch.nn.functional as Fn
import torchvision

import cfga.backbones.resnet as resnet_mod
import cfga.numerics.gradients as gradients_mod
from cfga.backbones.resnet import stem_max_pool, trunk_to_layer4_0
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
from cfga.numerics.mask import largest_component, scda_mask
from cfga.numerics.pooling import l2_normalize, pooling_feature, scda_features
from cfga.numerics.scalar import cfga_scalar
from cfga.registry.features import (
    FEATURES,
    PROTOCOL_FEATURES,
    TABLE5_COLUMNS,
    features_for,
)


def test_l2_normalize_zero_stays_zero():
    v = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    out = l2_normalize(v)
    assert torch.allclose(out[0], torch.tensor([0.6, 0.8]))
    assert torch.equal(out[1], torch.zeros(2))


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


def test_scalar_gradient_first_argmax_and_coef_over_hw():
    F = torch.tensor([[[[2.0, 2.0], [1.0, 0.0]]]], requires_grad=True)  # tie at the max
    mask = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]]])
    coef = torch.tensor([4 / 3])
    L = cfga_scalar(F, mask, coef)
    (g,) = torch.autograd.grad(L, F)
    base = (4 / 3) / 4
    expected = torch.tensor([[[[1 + base, base], [base, 0.0]]]])  # max grad to the FIRST argmax only
    assert torch.allclose(g, expected)


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


def test_feature_registry_is_consistent():
    assert features_for("scda") == PROTOCOL_FEATURES["scda"]
    assert set(TABLE5_COLUMNS) <= set(FEATURES)
    assert FEATURES["cfga_plus"].dim == FEATURES["cfga_4_1_2"].dim + FEATURES["cfga_4_2_2"].dim
    assert [FEATURES[f].dim for f in ("cfga_4_1_1", "cfga_4_1_2", "cfga_4_1_3")] == [2048, 512, 512]
    with pytest.raises(ValueError, match="unknown protocol"):
        features_for("nope")


# ---- the extraction's fused path (cfga.gradients.kernel_responses / cfga_vectors) -------------


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
    """Range + std from the tap-centred inputs equal SPEC §5.1 on the whole gradient (float rounding
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


def _resnet_with_trained_looking_norms(arch):
    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return net.eval()


@pytest.mark.parametrize("arch", ["resnet50", "resnet18"])
def test_trunk_with_in_place_norms_is_bit_identical_to_the_modules(arch):
    net = _resnet_with_trained_looking_norms(arch)
    x = torch.randn(2, 3, 48, 64)
    x0 = x.clone()
    with torch.no_grad():
        ref = net.layer4[0](net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x))))))))
        got = trunk_to_layer4_0(net, x)
    assert got.numpy().tobytes() == ref.numpy().tobytes()
    assert torch.equal(x, x0)  # the input is never written over


def test_trunk_falls_back_to_the_modules_where_in_place_norms_would_be_wrong(monkeypatch):
    """Autograd on, a training-mode norm, or a block torchvision did not build: the modules run."""
    net = _resnet_with_trained_looking_norms("resnet50")
    x = torch.randn(1, 3, 48, 64)
    calls = []
    monkeypatch.setattr(resnet_mod, "_bn_", lambda *a: calls.append(1) or a[1])
    with torch.no_grad():
        trunk_to_layer4_0(net, x)
    assert calls  # the in-place path was taken
    calls.clear()
    with torch.enable_grad():
        trunk_to_layer4_0(net, x)
    net.layer2[1].bn2.train()
    with torch.no_grad():
        trunk_to_layer4_0(net, x)
    net.layer2[1].bn2.eval()

    class Custom(torchvision.models.resnet.Bottleneck):
        pass

    net.layer3[0].__class__ = Custom
    with torch.no_grad():
        trunk_to_layer4_0(net, x)
    assert not calls


def test_aggregate_response_propagates_nan():
    r = torch.tensor([[[1.0, 4.0, 1.0], [3.0, float("nan"), 1.0]]])
    assert torch.isnan(aggregate_response(r)).any()


def test_stem_max_pool_is_bit_identical_to_the_module():
    pool = torch.nn.MaxPool2d(3, 2, 1)
    x = torch.randn(2, 8, 15, 17)
    x[0, 0, 3, 3] = float("nan")
    x[1, 1] = -0.0
    x[1, 2, 4, 4] = float("inf")
    assert stem_max_pool(pool, x).numpy().tobytes() == pool(x).numpy().tobytes()
    assert stem_max_pool(pool, x).is_contiguous()


def test_grouped_convs_are_refused_by_every_gradient_path():
    conv = torch.nn.Conv2d(4, 4, 1, groups=2, bias=False)
    X, dY = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3)
    for path in (per_sample_weight_grad, lambda *a: list(kernel_responses(*a)),
                 gradients_mod.batched_kernel_responses):
        with pytest.raises(ValueError, match="grouped"):
            path(X, dY, conv)
