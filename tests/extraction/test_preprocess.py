"""Pixel-exact preprocessing (method.md §2) and image decoding: odd formats load exactly as PIL's
convert('RGB'), broken files and decompression bombs raise an ImageError naming the file."""
import warnings

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image, ImageFile

from cfga.extraction.preprocess import (
    MAX_IMAGE_PIXELS,
    ImageError,
    cap_700,
    center_crop_box,
    load_rgb,
    output_size,
    peek_size,
    preprocess,
    scda_size,
    torchvision_resize_size,
)
from cfga.registry.protocols import Resize
from tests.helpers import TINY_SIZES
from tests.helpers import pil_rgb as _pil_rgb


@pytest.mark.parametrize(
    "hw,expected",
    [((375, 500), (256, 341)), ((512, 769), (256, 384)), ((512, 771), (256, 386)),
     ((100, 150), (100, 150)), ((256, 300), (256, 300)), ((281, 281), (256, 256))],
)
def test_scda_size_examples(hw, expected):
    assert scda_size(*hw) == expected


def test_dgpcrl_rule_uses_280():
    assert scda_size(512, 769, short=280) == (280, 421)


def test_torchvision_resize_truncates_and_upsamples():
    assert torchvision_resize_size(375, 500, 256) == (256, 341)  # 341.33 truncated
    assert torchvision_resize_size(100, 150, 256) == (256, 384)
    assert torchvision_resize_size(256, 999, 256) == (256, 999)
    assert center_crop_box(256, 341, 227) == (14, 57)  # 14.5 → 14 (half to even), 57.0


def test_preprocess_equals_torchvision_pipeline_on_pil():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8))
    ref = T.Compose([T.Resize((256, 341)), T.ToTensor(),
                     T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])(img)
    assert torch.equal(preprocess(img, Resize(256)), ref)


def test_small_image_not_upsampled_and_size_from_header(tmp_path):
    p = tmp_path / "small.jpg"
    Image.new("RGB", (150, 100), (10, 20, 30)).save(p)
    assert peek_size(p) == (100, 150)
    assert output_size(100, 150, Resize(256)) == (100, 150)
    assert preprocess(p, Resize(256)).shape == (3, 100, 150)


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P"])
def test_modes_convert_to_rgb(tmp_path, mode):
    img = Image.new(mode, (40, 30))
    p = tmp_path / f"x.{ 'png' if mode in ('RGBA', 'P') else 'jpg'}"
    img.save(p)
    assert load_rgb(p).mode == "RGB"


def test_cap_700_is_dead_below_700():
    x = torch.zeros(1, 3, 256, 341)
    assert cap_700(x) is x
    assert cap_700(torch.zeros(1, 3, 800, 1000)).shape[-2:] == (700, 875)


def test_bad_images_raise_naming_the_file(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty.jpg"):
        load_rgb(empty)
    good = tmp_path / "good.jpg"
    Image.new("RGB", (64, 64), (200, 0, 0)).save(good, quality=95)
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ImageError, match="trunc.jpg"):
        load_rgb(trunc)
    with pytest.raises(ImageError, match="missing.jpg"):
        load_rgb(tmp_path / "missing.jpg")


# ----------------------------------------------------------------------------------------------
# hostile or odd image files: load_rgb, peek_size
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
    """Decision (method.md §2 prescribes ``Image.open(path).convert('RGB')``, nothing else): a 16-bit
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
def test_tiny_images_load(tiny_images, size):
    p = tiny_images[TINY_SIZES.index(size)]
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
    for fn in (load_rgb, peek_size):
        with pytest.raises(ImageError) as ei:
            fn(p)
        msg = str(ei.value)
        assert p.name in msg
        assert "too large" in msg, msg  # cfga's words, not PIL's (which vary by version)
    assert decode_spy == []  # refused from the header: no pixel buffer was ever allocated
    assert Image.MAX_IMAGE_PIXELS == old_limit  # the global limit is restored
    assert 15000 * 15000 > MAX_IMAGE_PIXELS
