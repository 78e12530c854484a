"""Pixel-exact preprocessing (SPEC §2) and image decoding errors."""
import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from cfga.extraction.preprocess import (
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
