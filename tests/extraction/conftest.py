"""Image files for the extraction tests: odd but decodable formats, broken and hostile files, and
a set of realistic sizes with a checkpoint of a realistic random ResNet-50 (BN recalibrated)."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import write_sized_images
from tests.helpers import rgb as _rgb
from tests.reference.spec_reference import build_dml_model, jitter_bn


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


@pytest.fixture(scope="session")
def odd(tmp_path_factory):
    return _write_odd_images(tmp_path_factory.mktemp("odd"))


@pytest.fixture(scope="session")
def bad(tmp_path_factory):
    return _write_bad_images(tmp_path_factory.mktemp("bad"))


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    return write_sized_images(tmp_path_factory.mktemp("imgs"))


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, images):
    """A realistic random ResNet-50 (BN recalibrated + jittered), saved as a user's state dict."""
    model = jitter_bn(build_dml_model("resnet50", seed=11), seed=5, images=images[:4])
    path = tmp_path_factory.mktemp("ckpt") / "my_backbone.pth"
    torch.save(model.state_dict(), path)
    return path
