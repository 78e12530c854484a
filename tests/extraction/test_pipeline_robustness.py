"""extract_features on hostile or odd inputs: odd formats and tiny images, bad images inside a
run, a NaN model, an all-zero layer4 map, constant maps; and determinism.

Every "bad input" test feeds the input, checks the error message names the culprit, and checks
that nothing was written (no feature file, no temp file, no half-filled row). Everything runs on
tiny images with the session's seeded random ResNet-50 (tests/conftest.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import cfga.extraction.pipeline as extract_mod
from cfga import extract_features
from cfga.extraction.pipeline import FeatureError, image_level_features
from cfga.extraction.preprocess import ImageError
from cfga.extraction.store import load_features, save_features
from cfga.numerics.pooling import scda_features
from cfga.registry.features import FEATURES, feature_dim, features_for
from cfga.registry.protocols import get_protocol
from tests.helpers import pil_rgb as _pil_rgb
from tests.helpers import rgb as _rgb


@pytest.fixture
def model(resnet50):
    """The session's seeded random ResNet-50 (fc 1000: fine for the scda and dgpcrl protocols)."""
    return resnet50


@pytest.fixture
def tiny(tiny_images):
    return tiny_images


@pytest.fixture
def dead_layer4(resnet50_copy):
    """A copy of the shared model with layer4's last BN bias at −1e4: layer4's output is all zeros."""
    with torch.no_grad():
        resnet50_copy.layer4[2].bn3.bias.fill_(-1e4)
    return resnet50_copy


def test_odd_images_through_extract_equal_pil_converted_inputs(model, odd, tiny):
    """Paths vs the SPEC's own ``Image.open(p).convert('RGB')`` PIL images: bit-identical rows,
    nothing skipped, every value finite (tiny images included: 1×1 map, scda protocol)."""
    files, _ = odd
    paths = [files[k] for k in ("png_as_jpg", "gif_as_jpg", "i16_png", "p_bytes_transparency",
                                "cmyk_jpg", "rgba_png", "la_png")] + tiny[:2]
    a = extract_features(model, paths, "scda", batch_size=8)
    b = extract_features(model, [Image.fromarray(_pil_rgb(p)) for p in paths], "scda", batch_size=8)
    assert list(a) == list(features_for("scda"))
    for name in a:
        assert a[name].shape == (len(paths), FEATURES[name].dim), name
        assert np.isfinite(a[name]).all(), name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize("protocol", ["scda", "dgpcrl"])
def test_tiny_images_one_by_one_map_give_finite_whole_map_features(model, tiny, protocol, caplog):
    """≤ 32 px → 1×1 layer4 map → S constant → threshold mask B empty. scda (LCC): whole map per
    method.md §4.1; dgpcrl (no LCC): whole-map fallback with a warning (method.md S6). With a whole 1×1 map,
    avg = max = F, so SCDA = Pooling and 'SCDA original' = the two halves each normalised."""
    with caplog.at_level("WARNING", logger="cfga.extraction.pipeline"):
        feats = extract_features(model, tiny, protocol, batch_size=8)
    if protocol == "dgpcrl":
        assert "empty SCDA mask" in caplog.text
    for name, arr in feats.items():
        assert arr.shape == (len(tiny), feature_dim(name, protocol)), name
        assert np.isfinite(arr).all(), name
        norms = np.linalg.norm(arr.astype(np.float64), axis=1)
        expected = {"cfga_plus": (0.0, 1.0, np.sqrt(2)), "scda_original": (0.0, 1.0, np.sqrt(2))}
        ok = expected.get(name, (0.0, 1.0))
        assert all(min(abs(n - e) for e in ok) < 1e-5 for n in norms), (name, norms)
    pooled = feats["pooling"] if protocol == "scda" else feats["embedding"]
    np.testing.assert_allclose(feats["scda"], pooled, rtol=1e-6, atol=1e-7)
    assert (np.linalg.norm(pooled, axis=1) > 0).all()  # the random model is alive on tiny inputs


def test_rows_stay_aligned_when_buckets_reorder_the_work(model, tiny):
    """Inputs [A1, B, A2] (A1/A2 one size, B another): buckets run A1+A2 then B; each row must be
    its own image's, bit-identical to extracting that bucket alone."""
    imgs = [tiny[3], tiny[2], Image.fromarray(_rgb(32, 32, 99))]
    mixed = extract_features(model, imgs, "scda", batch_size=8)
    same = extract_features(model, [imgs[0], imgs[2]], "scda", batch_size=8)
    alone = extract_features(model, [imgs[1]], "scda", batch_size=8)
    for name in mixed:
        np.testing.assert_array_equal(mixed[name][[0, 2]], same[name], err_msg=name)
        np.testing.assert_array_equal(mixed[name][1], alone[name][0], err_msg=name)
    assert not np.array_equal(mixed["pooling"][0], mixed["pooling"][2])


@pytest.mark.parametrize(
    "culprit,words",
    [("empty", ["empty.jpg"]), ("trunc_header", ["trunc_header.jpg"]),
     ("trunc_scan", ["trunc_scan.jpg", "truncated"]), ("bomb", ["bomb.jpg", "too large"])],
)
def test_bad_image_inside_extract_raises_naming_it(model, bad, culprit, words, tmp_path):
    """A bad image is never skipped: extract_features raises (naming it) instead of returning
    fewer rows or a zero row, so the workflow's save_features never runs: no feature file."""
    images = [bad["good"], bad[culprit], bad["good"]]
    target = tmp_path / "features" / "model.npz"
    with pytest.raises(ImageError) as ei:
        feats = extract_features(model, images, "scda", batch_size=8)
        save_features(target, feats, [0, 1, 2], [str(p) for p in images], {})  # the rule's next step
    for w in words:
        assert w in str(ei.value)
    assert not target.parent.exists()


def test_non_finite_feature_names_the_right_image(monkeypatch, tmp_path):
    """FeatureError must name the image whose row is non-finite, not the batch's first image."""
    paths = []
    for i, v in enumerate([10, 250, 10]):  # the bright one (index 1) gets a NaN row
        p = tmp_path / f"img{i}.png"
        Image.new("RGB", (24, 24), (v, v, v)).save(p)
        paths.append(p)

    def fake_batch_features(net, x, protocol):
        bright = x.mean(dim=(1, 2, 3)) > 1.0
        out = {}
        for name in protocol.features:
            v = torch.zeros(x.shape[0], feature_dim(name, protocol.name))
            v[bright, 0] = float("nan")
            out[name] = v
        return out

    monkeypatch.setattr(extract_mod, "batch_features", fake_batch_features)
    net = torch.nn.Linear(1, 1).eval()
    with pytest.raises(FeatureError, match="img1.png"):
        extract_features(net, paths, "scda", batch_size=8)


def test_nan_model_is_reported_not_zeroed(resnet50_copy, tiny):
    """A corrupted checkpoint (one NaN BN weight in layer4) must raise FeatureError naming an image,
    not yield all-zero (finite-looking) features. The SPEC's zero-norm rule covers norm == 0 only;
    the reference (numpy v / ‖v‖) propagates NaN."""
    model = resnet50_copy
    with torch.no_grad():
        model.layer4[2].bn3.weight[0] = float("nan")
    with pytest.raises(FeatureError):
        extract_features(model, tiny[3:4], "scda")


def test_all_zero_layer4_map_gives_all_zero_features(dead_layer4, tiny, tmp_path):
    """layer4's output ≡ 0 (ReLU of a hugely negative BN bias): the LCC mask is the whole map, every
    feature obeys the zero-norm rule (all zeros, no NaN), and the result can be saved."""
    imgs = [tiny[3], Image.fromarray(_rgb(64, 80, 5))]
    for protocol in ("scda", "dgpcrl"):
        feats = extract_features(dead_layer4, imgs, protocol, batch_size=8)
        for name, arr in feats.items():
            assert arr.shape[0] == len(imgs), name
            assert np.isfinite(arr).all(), (protocol, name)
            assert not arr.any(), (protocol, name)
    out = tmp_path / "zeros.npz"
    save_features(out, feats, [0, 1], ["a.jpg", "b.jpg"], {"note": "zeros"})
    loaded, labels, paths, meta = load_features(out)
    assert all(np.array_equal(loaded[k], feats[k]) for k in feats)


@pytest.mark.parametrize("protocol", ["scda", "dgpcrl", "ms"])
def test_constant_map_uses_whole_map_in_every_protocol(protocol):
    """A constant (non-zero) map: B is empty for every protocol; the features must equal the
    whole-map ones (LCC: method.md §4.1; no LCC: the S6 fallback), finite, unit norm."""
    F = torch.full((4, 2, 3), 0.5)
    F[1] = 2.0
    feats, mask = image_level_features(F, get_protocol(protocol))
    assert mask.all()
    whole = scda_features(F, torch.ones(2, 3, dtype=torch.bool), float64=protocol == "scda")
    torch.testing.assert_close(feats["scda"], whole[0].float(), rtol=0, atol=0)
    for name, v in feats.items():
        assert torch.isfinite(v).all(), name
        n = torch.linalg.vector_norm(v.double()).item()
        assert min(abs(n - 1), abs(n - np.sqrt(2))) < 1e-5, (name, n)

# ----------------------------------------------------------------------------------------------
# determinism
# ----------------------------------------------------------------------------------------------


def test_extract_twice_is_bit_identical(model, tmp_path):
    paths = []
    for i, (h, w) in enumerate([(40, 48), (40, 48), (56, 36)]):
        p = tmp_path / f"d{i}.jpg"
        Image.fromarray(_rgb(h, w, 30 + i)).save(p, quality=90)
        paths.append(p)
    assert torch.get_num_threads() == 1
    a = extract_features(model, paths, "scda", batch_size=8)
    b = extract_features(model, paths, "scda", batch_size=8)
    assert list(a) == list(b)
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name
    assert np.linalg.norm(a["cfga_4_1_2"], axis=1).min() > 0  # not trivially all zeros


@pytest.mark.parametrize("protocol", ["scda", "dgpcrl", "ms"])
def test_image_level_features_batch_equals_one_map_at_a_time(protocol):
    """The batched call (one mask transfer, batched reductions) gives every image its own features,
    bit for bit, including the empty-mask fallback for a constant map that shares the batch."""
    g = torch.Generator().manual_seed(3)
    F = torch.rand(4, 6, 5, 7, generator=g) ** 4
    F[2] = 0.5  # constant map: B is empty → whole map, for this image only
    proto = get_protocol(protocol)
    feats, masks = image_level_features(F, proto)
    assert masks[2].all() and not masks[0].all()
    for b in range(4):
        one, mask = image_level_features(F[b], proto)
        assert torch.equal(masks[b], mask)
        for name, v in one.items():
            assert feats[name][b].numpy().tobytes() == v.numpy().tobytes(), (b, name)
