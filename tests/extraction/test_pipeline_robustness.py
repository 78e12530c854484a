"""Robustness: hostile or odd images, degenerate numerics, a fuzzed CFGA transform, determinism.

Every "bad input" test feeds the input, checks the error message names the culprit, and checks that
nothing was written (no feature file, no temp file, no half-filled row). Everything runs on tiny
images with one random ResNet-50 built once per module, on one CPU thread.
"""
from __future__ import annotations

import struct
import time
import warnings
import zlib

import cfga.extraction.pipeline as extract_mod
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image, ImageFile

from cfga import extract_features
from cfga.extraction.pipeline import FeatureError, image_level_features
from cfga.extraction.preprocess import MAX_IMAGE_PIXELS, ImageError, load_rgb, peek_size
from cfga.extraction.store import load_features, save_features
from cfga.numerics.aggregation import (
    aggregate_response,
    grad_to_vector,
    kernel_response,
)
from cfga.numerics.mask import scda_mask
from cfga.numerics.pooling import l2_normalize, pooling_feature, scda_features
from cfga.registry.features import FEATURES, feature_dim, features_for
from cfga.registry.protocols import get_protocol
from tests.reference.spec_reference import build_dml_model, reference_grad_to_vector

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------
# image writers
# ----------------------------------------------------------------------------------------------


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _pil_rgb(path) -> np.ndarray:
    """What SPEC §2 says the loader does, verbatim."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _png_header_bomb(path, w, h):
    """A valid 1×1 PNG whose IHDR is patched to claim w×h (CRC fixed): 60-odd bytes on disk."""
    Image.new("L", (1, 1)).save(path, format="PNG", optimize=True)
    b = bytearray(path.read_bytes())
    assert b[12:16] == b"IHDR"
    b[16:24] = struct.pack(">II", w, h)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(b))
    return path


def _write_odd_images(root):
    """Decodable but unusual files (all must load exactly as PIL's convert('RGB') does)."""
    out = {}
    # PNG and GIF behind a .jpg name: PIL sniffs the content, so does the loader.
    out["png_as_jpg"] = root / "png_as.jpg"
    Image.fromarray(_rgb(40, 48, 1)).save(out["png_as_jpg"], format="PNG")
    out["gif_as_jpg"] = root / "gif_as.jpg"
    Image.fromarray(_rgb(40, 48, 2)).convert("P").save(out["gif_as_jpg"], format="GIF")
    # 16-bit grayscale (I;16): values straddling 255 to expose clip-vs-rescale.
    g16 = np.tile(np.array([0, 1, 100, 255, 256, 1000, 40000, 65535], np.uint16), (40, 6))
    out["i16_png"] = root / "gray16.png"
    Image.fromarray(g16).save(out["i16_png"], format="PNG")
    # Palette with a single transparent index, and palette with per-entry alpha bytes (tRNS).
    pal = Image.fromarray(_rgb(40, 48, 3)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    out["p_index_transparency"] = root / "p_index.png"
    pal.save(out["p_index_transparency"], transparency=3)
    out["p_bytes_transparency"] = root / "p_bytes.png"
    pal.save(out["p_bytes_transparency"], transparency=bytes([0, 64, 128] + [255] * 13))
    out["cmyk_jpg"] = root / "cmyk.jpg"
    Image.fromarray(_rgb(40, 48, 4)).convert("CMYK").save(out["cmyk_jpg"], quality=90)
    rgba = np.dstack([_rgb(40, 48, 5), np.tile(np.array([0, 1, 128, 255], np.uint8), (40, 12))])
    out["rgba_png"] = root / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(out["rgba_png"])
    la = np.dstack([_rgb(40, 48, 6)[..., 0], np.tile(np.array([0, 255], np.uint8), (40, 24))])
    out["la_png"] = root / "la.png"
    Image.fromarray(la, "LA").save(out["la_png"])
    out["plain_jpg"] = root / "plain.jpg"
    Image.fromarray(_rgb(40, 48, 7)).save(out["plain_jpg"], quality=90)
    return out, rgba


TINY_SIZES = [(1, 1), (2, 3), (17, 9), (32, 32), (31, 20)]  # (h, w), all ≤ 32 px → 1×1 layer4 map


def _write_tiny(root):
    paths = []
    for i, (h, w) in enumerate(TINY_SIZES):
        p = root / f"tiny_{h}x{w}.png"
        Image.fromarray(_rgb(h, w, 10 + i)).save(p)
        paths.append(p)
    return paths


def _write_bad_images(root):
    good = root / "good.jpg"
    Image.fromarray(_rgb(64, 64, 20)).save(good, quality=95)
    raw = good.read_bytes()
    out = {"good": good}
    out["empty"] = root / "empty.jpg"
    out["empty"].write_bytes(b"")
    out["trunc_header"] = root / "trunc_header.jpg"  # cut inside the JPEG headers
    out["trunc_header"].write_bytes(raw[:150])
    out["trunc_scan"] = root / "trunc_scan.jpg"  # headers intact (peek_size works), scan data cut
    out["trunc_scan"].write_bytes(raw[: len(raw) // 2])
    out["trunc_eoi"] = root / "trunc_eoi.jpg"  # only the last 2 bytes (EOI marker) missing
    out["trunc_eoi"].write_bytes(raw[:-2])
    out["bomb"] = _png_header_bomb(root / "bomb.jpg", 20000, 20000)  # 4e8 px > 2 × limit
    out["bomb_warn"] = _png_header_bomb(root / "bomb_warn.png", 15000, 15000)  # 2.25e8: limit..2×limit
    return out


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    return _write_odd_images(tmp_path_factory.mktemp("odd"))


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return _write_bad_images(tmp_path_factory.mktemp("bad"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _write_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def model():
    """One seeded random ResNet-50 (fc 1000: fine for the scda and dgpcrl protocols)."""
    return build_dml_model("resnet50", seed=3)


@pytest.fixture
def dead_layer4(model):
    """The module model with layer4's last BN bias at −1e4: layer4's output is all zeros.
    Restored afterwards (bit-exact) so other tests see the original model."""
    bn = model.layer4[2].bn3
    saved = bn.bias.detach().clone()
    with torch.no_grad():
        bn.bias.fill_(-1e4)
    try:
        yield model
    finally:
        with torch.no_grad():
            bn.bias.copy_(saved)


# ----------------------------------------------------------------------------------------------
# 1. images: load_rgb
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["png_as_jpg", "gif_as_jpg", "p_index_transparency", "p_bytes_transparency", "cmyk_jpg",
     "rgba_png", "la_png", "plain_jpg"],
)
def test_odd_formats_load_exactly_like_pil_convert(odd, name):
    files, _ = odd
    got = load_rgb(files[name])
    assert got.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(got), _pil_rgb(files[name]))


def test_content_is_sniffed_not_the_extension(odd):
    files, _ = odd
    with Image.open(files["png_as_jpg"]) as im:
        assert im.format == "PNG"
    with Image.open(files["gif_as_jpg"]) as im:
        assert im.format == "GIF"


def test_rgba_alpha_is_dropped_not_composited(odd):
    files, rgba = odd
    got = np.asarray(load_rgb(files["rgba_png"]))
    # Fully transparent pixels (alpha 0) keep their colour: no compositing onto black or white.
    np.testing.assert_array_equal(got, rgba[..., :3])
    assert (rgba[..., 3] == 0).any()


def test_la_alpha_is_dropped_and_gray_is_replicated(odd):
    files, _ = odd
    got = np.asarray(load_rgb(files["la_png"]))
    with Image.open(files["la_png"]) as im:
        gray = np.asarray(im)[..., 0]
    for c in range(3):
        np.testing.assert_array_equal(got[..., c], gray)


def test_palette_transparency_is_not_refused_when_warnings_are_errors(odd):
    """PIL warns ('Palette images with Transparency expressed in bytes should be converted to RGBA')
    and converts. Under strict warning filters (pytest -W error, PYTHONWARNINGS=error) that warning
    must not turn a valid image into an ImageError 'truncated or corrupt'; only the
    decompression-bomb warning is an error."""
    files, _ = odd
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = load_rgb(files["p_bytes_transparency"])
    np.testing.assert_array_equal(np.asarray(got), _pil_rgb(files["p_bytes_transparency"]))


def test_16bit_grayscale_follows_pil(odd):
    """Decision (SPEC §2 prescribes ``Image.open(path).convert('RGB')``, nothing else): a 16-bit
    grayscale PNG gets exactly what this Pillow's convert('RGB') gives. Pillow (13.x here) clips
    I;16 to 8 bits (≥ 255 → 255, no rescale), so a real 16-bit scan comes out almost white: that is
    what the authors' loader fed the network, and rescaling would silently diverge from it. Should
    a Pillow version refuse the conversion, cfga must refuse too, with an ImageError naming the file
    (never a bare PIL exception, never a made-up rescale)."""
    files, _ = odd
    p = files["i16_png"]
    with Image.open(p) as im:
        assert im.mode.startswith("I")  # 'I;16' (or 'I' on some Pillow versions)
    try:
        expected = _pil_rgb(p)
    except Exception:  # pragma: no cover - depends on the Pillow version
        with pytest.raises(ImageError, match="gray16.png"):
            load_rgb(p)
        return
    got = np.asarray(load_rgb(p))
    np.testing.assert_array_equal(got, expected)
    # document the Pillow behaviour this pins: clip, not rescale
    assert got[0, :8, 0].tolist() == [0, 1, 100, 255, 255, 255, 255, 255]


@pytest.mark.parametrize("size", TINY_SIZES)
def test_tiny_images_load(tiny, size):
    p = tiny[TINY_SIZES.index(size)]
    got = load_rgb(p)
    assert (got.height, got.width) == size
    np.testing.assert_array_equal(np.asarray(got), _pil_rgb(p))


@pytest.mark.parametrize(
    "name,words",
    [("empty", ["empty.jpg"]), ("trunc_header", ["trunc_header.jpg"]),
     ("trunc_scan", ["trunc_scan.jpg", "truncated"])],
)
def test_broken_files_raise_image_error_naming_the_file(bad, name, words):
    with pytest.raises(ImageError) as ei:
        load_rgb(bad[name])
    for w in words:
        assert w in str(ei.value)


def test_missing_eoi_marker_is_handled_like_pil(bad):
    """A JPEG missing only its EOI marker: cfga does whatever PIL's convert does (decode or raise)."""
    p = bad["trunc_eoi"]
    try:
        expected = _pil_rgb(p)
    except Exception:
        with pytest.raises(ImageError, match="trunc_eoi.jpg"):
            load_rgb(p)
        return
    np.testing.assert_array_equal(np.asarray(load_rgb(p)), expected)  # pragma: no cover


@pytest.fixture
def decode_spy(monkeypatch):
    """Records every pixel decode (ImageFile.load); a bomb must be refused from its header."""
    calls = []
    real = ImageFile.ImageFile.load

    def spy(self):
        calls.append(getattr(self, "filename", "?"))
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


@pytest.mark.parametrize("name", ["bomb", "bomb_warn"])
def test_decompression_bomb_refused_from_the_header(bad, decode_spy, name):
    p = bad[name]
    assert p.stat().st_size < 200  # the bomb is a few dozen bytes on disk
    old_limit = Image.MAX_IMAGE_PIXELS
    t0 = time.perf_counter()
    for fn in (load_rgb, peek_size):
        with pytest.raises(ImageError) as ei:
            fn(p)
        msg = str(ei.value)
        assert p.name in msg
        assert "too large" in msg, msg  # cfga's words, not PIL's (which vary by version)
    assert time.perf_counter() - t0 < 1.0
    assert decode_spy == []  # no pixel buffer was ever allocated
    assert Image.MAX_IMAGE_PIXELS == old_limit  # the global limit is restored
    assert 15000 * 15000 > MAX_IMAGE_PIXELS


# ----------------------------------------------------------------------------------------------
# 1b. images through extract_features
# ----------------------------------------------------------------------------------------------


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
    SPEC §4.1; dgpcrl (no LCC): whole-map fallback with a warning (SPEC S6). With a whole 1×1 map,
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


def test_bad_image_in_a_dataloader_worker_still_names_it(model, bad):
    """With workers (the CUDA default) the error crosses a process boundary: still an ImageError,
    still naming the file. The culprit comes first so no forward pass runs."""
    with pytest.raises(ImageError) as ei:
        extract_features(model, [bad["trunc_scan"], bad["good"]], "scda", num_workers=1)
    assert "trunc_scan.jpg" in str(ei.value)


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


def test_nan_model_is_reported_not_zeroed(model, tiny):
    """A corrupted checkpoint (one NaN BN weight in layer4) must raise FeatureError naming an image,
    not yield all-zero (finite-looking) features. The SPEC's zero-norm rule covers norm == 0 only;
    the reference (numpy v / ‖v‖) propagates NaN."""
    bn = model.layer4[2].bn3
    saved = bn.weight.detach().clone()
    with torch.no_grad():
        bn.weight[0] = float("nan")
    try:
        with pytest.raises(FeatureError):
            extract_features(model, tiny[3:4], "scda")
    finally:
        with torch.no_grad():
            bn.weight.copy_(saved)


# ----------------------------------------------------------------------------------------------
# 2. numerics: zero maps, empty masks, zero gradients, non-finite refusal
# ----------------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("shape", [(4, 1, 1), (4, 3, 5)])
def test_zero_map_pure_functions(shape):
    F = torch.zeros(shape)
    assert scda_mask(F, lcc=True).all()  # empty B → whole map (SPEC §4.1)
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


@pytest.mark.parametrize("protocol", ["scda", "dgpcrl", "ms"])
def test_constant_map_uses_whole_map_in_every_protocol(protocol):
    """A constant (non-zero) map: B is empty for every protocol; the features must equal the
    whole-map ones (LCC: SPEC §4.1; no LCC: the S6 fallback), finite, unit norm."""
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


def test_l2_normalize_zero_and_tiny_match_the_oracle_rule():
    """Zero norm → zeros (SPEC §4.2). A vector so small that Σv² underflows float32 (≲1e-19) also
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


def _good_feats(n=2):
    return {"pooling": np.ones((n, 4096), np.float32) / 64.0}


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_save_features_refuses_non_finite_and_leaves_nothing(tmp_path, bad_value):
    feats = _good_feats()
    feats["pooling"][1, 7] = bad_value
    target = tmp_path / "out" / "model.npz"
    with pytest.raises(ValueError, match="non-finite") as ei:
        save_features(target, feats, [0, 1], ["a.jpg", "b.jpg"], {})
    assert "pooling" in str(ei.value) and str(target) in str(ei.value)
    assert not target.exists()
    assert not target.parent.exists() or list(target.parent.iterdir()) == []  # no temp file


def test_save_features_refusal_keeps_the_previous_file(tmp_path):
    target = tmp_path / "model.npz"
    save_features(target, _good_feats(), [0, 1], ["a.jpg", "b.jpg"], {"v": 1})
    before = target.read_bytes()
    feats = _good_feats()
    feats["pooling"][0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        save_features(target, feats, [0, 1], ["a.jpg", "b.jpg"], {"v": 2})
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz"]


def test_save_features_refuses_misaligned_paths(tmp_path):
    """Rows, labels and paths must line up; a short paths list would silently shift every path."""
    target = tmp_path / "model.npz"
    with pytest.raises(ValueError, match="paths"):
        save_features(target, _good_feats(), [0, 1], ["a.jpg"], {})
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# 3. hypothesis fuzz of the gradient → vector transform against the numpy oracle
# ----------------------------------------------------------------------------------------------

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
    entries by at most a few ulp. Zeros must be exactly zero on both sides."""
    out = grad_to_vector(torch.from_numpy(G)).numpy()
    ref = np.stack([reference_grad_to_vector(G[b]) for b in range(G.shape[0])])
    _check_norms_and_finite(out)
    np.testing.assert_array_equal(out == 0, ref == 0)
    np.testing.assert_array_max_ulp(out, ref, maxulp=4)


def _oracle_r(G):
    """The oracle's per-kernel response (SPEC §5.1 with torch.std), [C_out, C_in]."""
    g = torch.from_numpy(G)
    flat = g.flatten(-2)
    return flat.max(dim=-1).values + (-flat).max(dim=-1).values + flat.std(dim=-1)


def _keep(r):
    return (r > r.mean(dim=0, keepdim=True)) & (r > r.mean(dim=1, keepdim=True))


def _has_constant_nonzero_kernel(G):
    flat = G.reshape(*G.shape[:3], -1)
    return bool(((flat == flat[..., :1]).all(-1) & (flat[..., 0] != 0)).any())


@FUZZ
@given(gradients(k=3))
def test_fuzz_3x3_equals_oracle_up_to_ties(G):
    """k = 3: cfga's two-pass float32 std differs from torch.std (the oracle's; double-accumulated
    on CPU) by ≤ 1 ulp in ~7-30 % of kernels, even on integer grids (torch's float32 sqrt is not
    always correctly rounded on this CPU). Hence:
    * r agrees to 1e-6 relative;
    * when both selections coincide the vectors agree up to normalisation rounding (1e-6, and the
      same zero pattern) — always the case when r is bit-identical;
    * otherwise a strict '>' flipped on a near-tie: every flipped cell lies within 1e-6 (relative)
      of its threshold (SPEC S13's accepted ~1e-8..1e-4 band), and the output is still unit/zero.
    Constant non-zero kernels at an inexact scale are a known defect (spurious std), tested apart
    in test_3x3_constant_kernel_has_zero_response; they are excluded here."""
    inexact = not any(np.array_equal(G, (G / np.float32(s)).round() * np.float32(s)) for s in DYADIC)
    assume(not (inexact and _has_constant_nonzero_kernel(G)))
    out = grad_to_vector(torch.from_numpy(G)).numpy()
    _check_norms_and_finite(out)
    r_cfga = kernel_response(torch.from_numpy(G))
    for b in range(G.shape[0]):
        ref = reference_grad_to_vector(G[b])
        ro, rc = _oracle_r(G[b]), r_cfga[b]
        torch.testing.assert_close(rc, ro, rtol=1e-6, atol=0)
        ko, kc = _keep(ro), _keep(rc)
        if torch.equal(ro, rc):
            event("k=3 r bit-identical")
        if torch.equal(ko, kc):
            event("k=3 same selection")
            np.testing.assert_array_equal(out[b] == 0, ref == 0)
            np.testing.assert_allclose(out[b], ref, rtol=0, atol=1e-6)
        else:
            event("k=3 selection flipped on a near-tie")
            thr = torch.maximum(ro.mean(dim=0, keepdim=True), ro.mean(dim=1, keepdim=True))
            flipped = ko != kc
            gap = (ro - thr).abs()[flipped]
            assert (gap <= 1e-6 * thr.expand_as(ro)[flipped]).all(), (gap, thr)


@FUZZ
@given(gradients(k=3, scales=tuple(DYADIC)))
def test_fuzz_3x3_dyadic_constant_kernels_are_exact(G):
    """On dyadic integer grids a constant kernel's mean is exact, so its r is exactly 0 on both
    sides, and all-equal / constant-tap cases (the tie-heavy ones) match the oracle's zero pattern."""
    flat = G.reshape(*G.shape[:3], -1)
    const = (flat == flat[..., :1]).all(-1)
    r = kernel_response(torch.from_numpy(G)).numpy()
    assert (r[const] == 0).all()
    if const.all():
        out = grad_to_vector(torch.from_numpy(G)).numpy()
        ref = np.stack([reference_grad_to_vector(G[b]) for b in range(G.shape[0])])
        assert not out.any() and not ref.any()


def test_3x3_constant_kernel_has_zero_response():
    """One kernel of nine equal taps (0.1), every other kernel zero: SPEC §5.1 gives r = 0
    everywhere → no selection → the zero vector (the oracle's answer). (Fixed: a constant kernel has std exactly 0.)"""
    G = np.zeros((1, 2, 2, 3, 3), np.float32)
    G[0, 0, 0] = 0.1
    assert not reference_grad_to_vector(G[0]).any()
    assert kernel_response(torch.from_numpy(G))[0, 0, 0].item() == 0.0
    assert not grad_to_vector(torch.from_numpy(G)).any()


@settings(max_examples=60, deadline=None)
@given(gradients(k=1), st.sampled_from([2.0**-30, 2.0**20]))
def test_fuzz_1x1_is_scale_invariant(G, s):
    """SPEC §5 is scale-invariant (r ∝ G, selection unchanged, then normalised)."""
    a = grad_to_vector(torch.from_numpy(G))
    b = grad_to_vector(torch.from_numpy(G * np.float32(s)))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.xfail(strict=True, reason="known limitation (cfga/aggregation.py kernel_response): the "
                   "float32 two-pass std squares the taps and underflows below ~1e-19 (std → 0), unlike "
                   "torch.std; a float64 std would fix it at ~4x the cost of this step. Real layer4 "
                   "gradients are far above that scale.")
def test_3x3_tiny_gradients_keep_their_std():
    taps = torch.tensor([2.0, 5, 3, 1, -4, 3, 3, -1, -3])
    for s in (1e-22, 1e-25, 1e-30):
        G = (taps.double() * s).float().view(1, 1, 1, 3, 3)
        torch.testing.assert_close(kernel_response(G)[0], _oracle_r(G[0].numpy()), rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------------
# 4. determinism
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
