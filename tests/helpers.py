"""Small helpers shared by the test modules (fixtures live in conftest.py files)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]

# classes and images per class of the small synthetic archives of tests/data (about formats, not sizes)
SYNTHETIC_CLASSES, SYNTHETIC_IMAGES_PER_CLASS = 4, 3

# (h, w), all ≤ 32 px → a 1×1 layer4 map
TINY_SIZES = [(1, 1), (2, 3), (17, 9), (32, 32), (31, 20)]


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A seeded random uint8 RGB image [h, w, 3]."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two float arrays; two all-zero rows count as equal (cosine 1)."""
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = (a * b).sum(1) / np.where(both_zero, 1, na * nb)
    return np.where(both_zero, 1.0, cos)


def pil_rgb(path) -> np.ndarray:
    """What method.md §2 says the loader does, verbatim."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# (h, w, mode): above and below 256 on the short side, odd sizes that round half to even, L and
# CMYK JPEGs, three images of one size (so a batch really holds several), a tiny image (1×1 map).
SIZES = [
    (300, 400, "RGB"), (300, 400, "RGB"), (300, 400, "L"), (180, 240, "RGB"), (512, 769, "RGB"),
    (400, 300, "CMYK"), (100, 150, "RGB"), (281, 281, "RGB"), (24, 30, "RGB"),
]


def write_sized_images(root, seed=0):
    """The images of SIZES as JPEGs (img0.jpg …), seeded; image 1 is flat with one rectangle."""
    rng = np.random.default_rng(seed)
    paths = []
    for i, (h, w, mode) in enumerate(SIZES):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img = Image.fromarray(arr)
        if i == 1:  # flat image with one rectangle: exact ties in the maps (method.md S22)
            img = Image.new("RGB", (w, h), (120, 130, 140))
            ImageDraw.Draw(img).rectangle([w // 4, h // 4, w // 2, h // 2], fill=(250, 10, 10))
        p = root / f"img{i}.jpg"
        img.convert(mode).save(p, quality=90)
        paths.append(p)
    return paths


def assert_nothing_left(out: Path) -> None:
    """``out`` is absent or empty (a failed step left no file behind)."""
    assert not out.exists() or list(out.iterdir()) == [], list(out.iterdir())

