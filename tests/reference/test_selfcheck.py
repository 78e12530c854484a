"""Self-checks of the independent spec oracle (tests/reference/spec_reference.py).

Hand-computed tiny cases for every rule of SPEC.md the oracle implements, plus a small
end-to-end run per protocol. Nothing here imports the ``cfga`` package.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.reference import spec_reference as ref  # noqa: E402

SQRT2 = math.sqrt(2.0)


def _rand_img(h, w, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return img if mode == "RGB" else img.convert(mode)


# ----------------------------------------------------------------------------------------------
# Section 2: preprocessing
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hw, protocol, expected",
    [
        ((375, 500), "scda", (256, 341)),
        ((512, 769), "scda", (256, 384)),  # 384.5 -> 384 (half to even)
        ((512, 771), "scda", (256, 386)),  # 385.5 -> 386 (half to even)
        ((100, 150), "scda", (100, 150)),  # no upsampling
        ((256, 300), "scda", (256, 300)),  # m == 256: untouched
        ((500, 375), "scda", (341, 256)),  # portrait
        ((512, 769), "dgpcrl", (280, 421)),
        ((280, 300), "dgpcrl", (280, 300)),
        ((100, 150), "dgpcrl", (100, 150)),
        ((375, 500), "ms", (227, 227)),
        ((100, 150), "ms", (227, 227)),  # upsampled, then cropped
        ((375, 500), "proxy_anchor", (224, 224)),
        ((40, 30), "proxy_anchor", (224, 224)),
    ],
)
def test_preprocess_sizes(hw, protocol, expected):
    h, w = hw
    x = ref.preprocess(_rand_img(h, w), protocol)
    assert x.dtype == torch.float32
    assert tuple(x.shape) == (1, 3) + expected


def test_size_rules_by_hand():
    assert ref.scda_resize_size(375, 500, 256) == (256, 341)
    assert ref.scda_resize_size(512, 769, 256) == (256, 384)
    assert ref.scda_resize_size(512, 771, 256) == (256, 386)
    assert ref.scda_resize_size(100, 150, 256) == (100, 150)
    assert ref.scda_resize_size(512, 769, 280) == (280, 421)
    # torchvision Resize(256): long side truncated, upsampling, untouched at 256.
    assert ref.dml_resize_size(512, 771) == (256, 385)  # 385.5 truncated (round would be 386)
    assert ref.dml_resize_size(512, 769) == (256, 384)
    assert ref.dml_resize_size(375, 500) == (256, 341)
    assert ref.dml_resize_size(100, 150) == (256, 384)
    assert ref.dml_resize_size(150, 100) == (384, 256)
    assert ref.dml_resize_size(256, 999) == (256, 999)
    assert ref.dml_resize_size(300, 300) == (256, 256)
    # CenterCrop offsets, half to even.
    assert ref.center_crop_offsets(256, 256, 227) == (14, 14)  # 14.5 -> 14
    assert ref.center_crop_offsets(256, 300, 227) == (14, 36)  # 36.5 -> 36
    assert ref.center_crop_offsets(256, 341, 227) == (14, 57)
    assert ref.center_crop_offsets(256, 256, 224) == (16, 16)
    assert ref.center_crop_offsets(256, 385, 224) == (16, 80)  # 80.5 -> 80


def _normalise_np(arr_uint8):
    x = arr_uint8.astype(np.float32) / np.float32(255)
    mean = np.array(ref.IMAGENET_MEAN, np.float32)
    std = np.array(ref.IMAGENET_STD, np.float32)
    return ((x - mean) / std).transpose(2, 0, 1)


@pytest.mark.parametrize("protocol, crop, left", [("ms", 227, 36), ("proxy_anchor", 224, 38)])
def test_center_crop_pixels(protocol, crop, left):
    # 256 x 300: Resize(256) leaves it untouched, so the crop is a pure slice of the input.
    img = _rand_img(256, 300, seed=3)
    arr = np.asarray(img)
    top = 14 if crop == 227 else 16
    x = ref.preprocess(img, protocol)[0].numpy()
    expected = _normalise_np(arr[top : top + crop, left : left + crop])
    np.testing.assert_array_equal(x, expected)


def test_scda_small_image_untouched_pixels():
    img = _rand_img(100, 150, seed=4)
    x = ref.preprocess(img, "scda")[0].numpy()
    np.testing.assert_array_equal(x, _normalise_np(np.asarray(img)))


def test_preprocess_matches_torchvision_pipelines():
    """Cross-check against torchvision's own PIL transforms (an independent implementation)."""
    import torchvision.transforms as T
    import torchvision.transforms.functional as TVF

    norm = T.Normalize(ref.IMAGENET_MEAN, ref.IMAGENET_STD)
    for i, (h, w) in enumerate([(375, 500), (512, 771), (100, 150), (300, 257), (256, 300)]):
        img = _rand_img(h, w, seed=10 + i)
        for protocol, crop in (("ms", 227), ("proxy_anchor", 224)):
            tv = T.Compose([T.Resize(256), T.CenterCrop(crop), T.ToTensor(), norm])(img)
            torch.testing.assert_close(ref.preprocess(img, protocol)[0], tv, rtol=0, atol=0)
        for protocol, short in (("scda", 256), ("dgpcrl", 280)):
            H, W = ref.scda_resize_size(h, w, short)
            im2 = img if (H, W) == (h, w) else TVF.resize(img, [H, W], T.InterpolationMode.BILINEAR)
            tv = norm(TVF.to_tensor(im2))
            torch.testing.assert_close(ref.preprocess(img, protocol)[0], tv, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P"])
def test_preprocess_modes(mode, tmp_path):
    img = _rand_img(60, 70, seed=5, mode=mode)
    path = tmp_path / ("x.png" if mode != "CMYK" else "x.jpg")
    img.save(path)
    x = ref.preprocess(str(path), "scda")
    assert tuple(x.shape) == (1, 3, 60, 70)
    # Path and in-memory image give the same tensor for lossless formats.
    if mode != "CMYK":
        torch.testing.assert_close(x, ref.preprocess(img, "scda"), rtol=0, atol=0)


def test_cap_700_dead_and_alive():
    x = torch.zeros(1, 3, 256, 700)
    assert ref.cap_700(x) is x  # min side 256: never fires
    y = ref.cap_700(torch.rand(1, 3, 701, 800))
    assert tuple(y.shape) == (1, 3, int(701 * (700 / 701)), int(800 * (700 / 701)))
    # It never fires through preprocess (largest short side is 280).
    assert ref.preprocess(_rand_img(900, 1000), "dgpcrl").shape[-2] == 280


# ----------------------------------------------------------------------------------------------
# Section 4.1: mask
# ----------------------------------------------------------------------------------------------


def test_lcc_tie_goes_to_first_component_in_raster_order():
    B = np.array(
        [
            [0, 0, 1, 1],
            [1, 0, 0, 0],
            [1, 0, 0, 0],
        ],
        dtype=bool,
    )
    # Two components of size 2; the one whose first cell comes first in raster order wins.
    expected = np.array([[0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(ref.reference_lcc(B), expected)
    # Now the vertical pair starts first in raster order and wins the tie.
    B2 = np.array([[1, 0, 0, 0], [1, 0, 1, 1]], dtype=bool)
    expected2 = np.array([[1, 0, 0, 0], [1, 0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(ref.reference_lcc(B2), expected2)


def test_lcc_four_connectivity_and_largest():
    B = np.array(
        [
            [1, 0, 0, 1],
            [0, 1, 0, 1],
            [0, 0, 1, 1],
        ],
        dtype=bool,
    )
    # Diagonal cells are NOT connected: the right-hand L-shape (4 cells) is the largest.
    expected = np.array([[0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 1, 1]], dtype=bool)
    np.testing.assert_array_equal(ref.reference_lcc(B), expected)


def test_lcc_empty_gives_whole_map():
    M = ref.reference_lcc(np.zeros((2, 3), bool))
    assert M.all() and M.shape == (2, 3)


def test_lcc_matches_scipy_on_random_masks():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = rng.integers(1, 9, size=2)
        B = rng.random((h, w)) < rng.random()
        lab, n = ndimage.label(B)
        if n == 0:
            exp = np.ones_like(B)
        else:
            counts = [(lab == k).sum() for k in range(1, n + 1)]
            exp = lab == (int(np.argmax(counts)) + 1)  # argmax: first maximum
        np.testing.assert_array_equal(ref.reference_lcc(B), exp)


def test_mask_strict_threshold_and_empty():
    # S = [[0, 2], [2, 0]] summed over 2 channels: mean 1, strict > keeps the two 2's,
    # which are diagonal -> LCC keeps the first one only.
    F = torch.tensor([[[0.0, 1.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]])[None]
    M, a = ref.reference_mask(F, lcc=False)
    np.testing.assert_array_equal(M, [[False, True], [True, False]])
    assert a == 2
    M, a = ref.reference_mask(F, lcc=True)
    np.testing.assert_array_equal(M, [[False, True], [False, False]])
    assert a == 1
    # Constant map: empty B. LCC -> whole map; no LCC -> ValueError.
    Fc = torch.ones(1, 3, 2, 2)
    M, a = ref.reference_mask(Fc, lcc=True)
    assert M.all() and a == 4
    with pytest.raises(ValueError):
        ref.reference_mask(Fc, lcc=False)
    # 1x1 map (input <= 32 px): always empty B.
    M, a = ref.reference_mask(torch.rand(1, 5, 1, 1), lcc=True)
    assert M.all() and a == 1


# ----------------------------------------------------------------------------------------------
# Section 4.5: the back-propagated scalar
# ----------------------------------------------------------------------------------------------


def test_maxpool_gradient_goes_to_first_argmax():
    x = torch.ones(1, 2, 2, 3, requires_grad=True)
    torch.nn.AdaptiveMaxPool2d(1)(x).sum().backward()
    g = x.grad[0].reshape(2, -1)
    expected = torch.zeros(2, 6)
    expected[:, 0] = 1.0
    torch.testing.assert_close(g, expected, rtol=0, atol=0)


def test_scalar_value_and_gradient():
    torch.manual_seed(0)
    F = torch.rand(1, 4, 3, 3, requires_grad=True)
    M = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 1]], dtype=bool)
    a = 4
    L = ref.reference_scalar(F, M)
    Fm = F.detach()[0].numpy().astype(np.float64) * M
    expected = Fm.reshape(4, -1).max(1).sum() + Fm.reshape(4, -1).sum(1).sum() / a
    assert abs(L.item() - expected) < 1e-5
    L.backward()
    g = F.grad[0].numpy().reshape(4, -1)
    for c in range(4):
        fm = Fm[c].reshape(-1)
        exp = M.reshape(-1).astype(np.float64) / a
        exp[int(np.argmax(fm))] += 1.0  # first argmax, inside the mask (F > 0)
        np.testing.assert_allclose(g[c], exp, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Section 5: CFGA transform
# ----------------------------------------------------------------------------------------------


def test_grad_to_vector_1x1_by_hand():
    G = np.array([[-4.0, 1.0], [2.0, -1.0], [0.0, 3.0]], np.float32)[:, :, None, None]
    # r = |G| = [[4,1],[2,1],[0,3]]; colmean = [2, 5/3]; rowmean = [2.5, 1.5, 1.5].
    # keep: (0,0) 4>2 & 4>2.5; (1,0) 2>2 is False (strict); (2,1) 3>5/3 & 3>1.5.
    # v = [4/3, 3/3] -> [0.8, 0.6].
    v = ref.reference_grad_to_vector(G)
    assert v.dtype == np.float32 and v.shape == (2,)
    np.testing.assert_allclose(v, [0.8, 0.6], rtol=1e-6)


def _single(s):
    k = np.zeros(9, np.float32)
    k[4] = s
    return k  # range |s|, unbiased std |s|/3 -> r = 4|s|/3


def _pair(s):
    k = np.zeros(9, np.float32)
    k[0], k[8] = s, -s
    return k  # range 2|s|, unbiased std |s|/2 -> r = 2.5|s|


def _const(c):
    return np.full(9, c, np.float32)  # r = 0 (no abs in the 3x3 branch)


def test_grad_to_vector_3x3_by_hand():
    kernels = [
        [_single(9.0), _const(5.0), _pair(1.0)],  # r = 12, 0, 2.5
        [_single(-18.0), _const(-7.0), _pair(3.0)],  # r = 24, 0, 7.5
        [_single(3.0), _pair(2.0), _single(22.5)],  # r = 4, 5, 30
    ]
    G = np.stack([np.stack(row) for row in kernels]).reshape(3, 3, 3, 3)
    # colmean = [40/3, 5/3, 40/3]; rowmean = [14.5/3, 10.5, 13]
    # kept: (1,0) 24; (2,2) 30.  (2,1): 5 > 5/3 but 5 < 13 -> dropped.
    # v = [24/3, 0, 30/3] = [8, 0, 10]
    v = ref.reference_grad_to_vector(G)
    np.testing.assert_allclose(v, np.array([8.0, 0.0, 10.0]) / math.sqrt(164.0), rtol=1e-6, atol=1e-7)


def test_grad_to_vector_zero_and_dims():
    assert not ref.reference_grad_to_vector(np.zeros((4, 3, 3, 3), np.float32)).any()
    assert not ref.reference_grad_to_vector(np.zeros((4, 3, 1, 1), np.float32)).any()
    rng = np.random.default_rng(1)
    for shape, dim in [((512, 2048, 1, 1), 2048), ((512, 512, 3, 3), 512), ((2048, 512, 1, 1), 512)]:
        v = ref.reference_grad_to_vector(rng.standard_normal(shape).astype(np.float32))
        assert v.shape == (dim,) and v.dtype == np.float32
        assert (v >= 0).all()
        assert abs(float(np.linalg.norm(v)) - 1.0) < 1e-5


# ----------------------------------------------------------------------------------------------
# Section 8: metrics
# ----------------------------------------------------------------------------------------------

# Five points with norm 5: labels 0,0,1,1,1. Query 0 has a negative (x2) exactly as similar
# as its best positive (x1): 15 == 15 -> the tie favours the query.
X5 = np.array([[5, 0], [3, 4], [3, -4], [0, -5], [-3, 4]], np.float64)
Y5 = np.array([0, 0, 1, 1, 1])


def test_recall_hand_example_with_tie():
    # q0: P={25,15}, t=15, negatives {15, 0, -15} -> n=0 (tie not counted)
    # q1: t=15, negatives {-7,-20,7} -> n=0
    # q2: P={25,20,-25}, t=20, negatives {15,-7} -> n=0
    # q3: P={25,20,-20}, t=20, negatives {0,-20} -> n=0
    # q4: P={25,-25,-20}, t=-20, negatives {-15, 7} -> n=2
    r = ref.reference_recall_at_k(X5, Y5, ks=(1, 2, 4, 8))
    assert r == {1: 0.8, 2: 0.8, 4: 1.0, 8: 1.0}
    # Same with float32 input (the oracle computes in float64 anyway).
    assert ref.reference_recall_at_k(X5.astype(np.float32), Y5, ks=(1,))[1] == 0.8


def test_recall_singleton_class_raises():
    with pytest.raises(IndexError):
        ref.reference_recall_at_k(X5, np.array([0, 0, 1, 1, 2]), ks=(1,))


def test_recall_second_largest_literal_and_binary_ties():
    # Duplicated points: self-sim ties with the duplicate; t is still the 2nd largest value.
    X = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], np.float64)
    y = np.array([0, 0, 1, 1])
    assert ref.reference_recall_at_k(X, y, ks=(1,)) == {1: 1.0}
    # All items identical: every negative ties with t -> never counted -> all hits.
    X = np.ones((6, 3))
    y = np.array([0, 0, 1, 1, 2, 2])
    assert ref.reference_recall_at_k(X, y, ks=(1,)) == {1: 1.0}


def test_map_at_r_hand_example():
    x = np.array([1.0, 0.2, 0.9, 0.5, -0.3, 0.7])[:, None]
    y = np.array([0, 0, 0, 1, 1, 1])
    # AP@R per query: 0.5, 1.0, 0.5, 0.0, 0.25, 0.0  -> mean 0.375
    assert ref.reference_map_at_r(x, y) == pytest.approx(0.375, abs=1e-12)


def test_map_at_r_ties_by_index_and_lone_queries():
    X = np.ones((3, 1))
    y = np.array([0, 1, 0])
    # q0: others x1 (no), x2 (yes) tie -> index order -> AP = 0; q2: x0 first -> AP = 1;
    # q1 has no other item of its label -> left out.
    assert ref.reference_map_at_r(X, y) == pytest.approx(0.5)


def _tie_free_unit_data(seed, n=60, d=8, n_cls=6):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    y = np.repeat(np.arange(n_cls), n // n_cls)
    rng.shuffle(y)
    return X.astype(np.float32), y


def test_map_at_r_matches_pml_on_tie_free_data():
    pml = pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning.distances import DotProductSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    del pml
    for seed in range(3):
        X, y = _tie_free_unit_data(seed)
        calc = AccuracyCalculator(
            include=("mean_average_precision_at_r", "precision_at_1"),
            knn_func=CustomKNN(DotProductSimilarity()),
            device=torch.device("cpu"),
        )
        # reference=None -> query = reference, ref_includes_query=True: PML asks for k+1
        # neighbours and removes the column whose index equals the query's own index.
        res = calc.get_accuracy(torch.from_numpy(X), torch.from_numpy(y))
        assert ref.reference_map_at_r(X, y) == pytest.approx(res["mean_average_precision_at_r"], abs=1e-9)
        # On tie-free data PML's precision_at_1 equals the reference R@1 (SPEC 8.3).
        assert ref.reference_recall_at_k(X, y, ks=(1,))[1] == pytest.approx(res["precision_at_1"], abs=1e-9)


# ----------------------------------------------------------------------------------------------
# End to end: seeded ResNet-50 ("model B"), one 64x80 JPEG, every protocol
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_b_and_jpeg(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "rand_64x80.jpg"
    _rand_img(64, 80, seed=7).save(path, quality=90)
    model = ref.build_dml_model("resnet50", seed=0, protocol="ms")
    ref.jitter_bn(model, seed=1, images=[str(path)])
    return model, str(path)


DIMS = {
    "pooling": 4096,
    "scda": 4096,
    "scda_original": 4096,
    "cfga_4_1_1": 2048,
    "cfga_4_1_2": 512,
    "cfga_4_1_3": 512,
    "cfga_4_2_1": 2048,
    "cfga_4_2_2": 512,
    "cfga_4_2_3": 512,
    "cfga_plus": 1024,
}


@pytest.mark.parametrize("protocol", ref.PROTOCOLS)
def test_end_to_end_features(model_b_and_jpeg, protocol):
    model, path = model_b_and_jpeg
    # The jittered model has a good fraction of positive layer4 activations.
    with torch.no_grad():
        F = ref.trunk_forward(model, ref.preprocess(path, protocol))
    frac = float((F > 0).float().mean())
    assert 0.3 < frac < 0.95, frac

    feats = ref.reference_features(model, path, protocol)
    assert tuple(feats) == ref.expected_keys(protocol)
    expected_keys = {
        "scda": {"pooling", "scda", "scda_original"},
        "dgpcrl": {"pooling", "embedding", "scda", "scda_original"},
        "ms": {"embedding", "scda", "scda_original"},
        "proxy_anchor": {"embedding"},
    }[protocol] | {k for k, _ in ref.CFGA_LAYERS} | {"cfga_plus"}
    assert set(feats) == expected_keys
    for k, v in feats.items():
        assert v.dtype == np.float32 and v.ndim == 1, k
        dim = DIMS.get(k, 512 if protocol in ("ms", "proxy_anchor") else 4096)
        assert v.shape == (dim,), (k, v.shape)
        assert np.isfinite(v).all(), k
        norm = float(np.linalg.norm(v.astype(np.float64)))
        target = SQRT2 if k in ("scda_original", "cfga_plus") else 1.0
        assert abs(norm - target) < 1e-5, (k, norm)
        if k != "embedding" or protocol == "dgpcrl":
            assert (v >= 0).all(), k
        assert np.count_nonzero(v) > 0.2 * v.size, k  # non-degenerate
    if protocol == "dgpcrl":
        np.testing.assert_array_equal(feats["embedding"], feats["pooling"])
    np.testing.assert_array_equal(feats["cfga_plus"], np.concatenate([feats["cfga_4_1_2"], feats["cfga_4_2_2"]]))


@pytest.mark.slow
def test_end_to_end_deterministic_and_no_grad_accumulation(model_b_and_jpeg):
    model, path = model_b_and_jpeg
    a = ref.reference_features(model, path, "ms")
    b = ref.reference_features(model, path, "ms")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # Precomputed tensors are accepted and give the same result.
    c = ref.reference_features(model, ref.preprocess(path, "ms"), "ms")
    for k in a:
        np.testing.assert_array_equal(a[k], c[k])


def test_build_dml_model_is_seeded_and_leaves_global_rng():
    state = torch.random.get_rng_state()
    m1 = ref.build_dml_model("resnet50", 3, "proxy_anchor")
    assert torch.equal(state, torch.random.get_rng_state())
    assert isinstance(m1.fc, torch.nn.Linear) and tuple(m1.fc.weight.shape) == (512, 2048)
    assert not m1.training
    m2 = ref.build_dml_model("resnet50", 3, "proxy_anchor")
    torch.testing.assert_close(m1.layer4[2].conv2.weight, m2.layer4[2].conv2.weight, rtol=0, atol=0)
    torch.testing.assert_close(m1.fc.weight, m2.fc.weight, rtol=0, atol=0)
    m3 = ref.build_dml_model("resnet50", 3, "scda")
    assert m3.fc.out_features == 1000
