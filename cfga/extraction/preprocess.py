"""Pixel-exact image preprocessing of the authors' loaders (method.md §2).

All resizing is PIL's antialiased BILINEAR on the PIL image, rounding is Python's ``round``
(half to even), as in the authors' ``dataloader_test`` and friends.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

from cfga.registry.protocols import Resize

ImageLike = Union[str, os.PathLike, Image.Image]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Decompression-bomb guard: PIL's own limit turned into an error (not a warning), so a
# malicious or corrupt file cannot eat the node's memory.
MAX_IMAGE_PIXELS = 178_956_970


class ImageError(ValueError):
    """An image file that cannot be decoded; the message names the file and the fix."""




def scda_size(h: int, w: int, short: int = 256) -> tuple[int, int]:
    """Target (H, W) of the no-upsampling rule: ``int(round(h * (short / m)))`` with m = min(h, w)."""
    m = min(h, w)
    if m <= short:
        return h, w
    scale = short / m  # computed first, then multiplied, as the authors wrote it
    return int(round(h * scale)), int(round(w * scale))


def torchvision_resize_size(h: int, w: int, short: int) -> tuple[int, int]:
    """Target (H, W) of torchvision ``Resize(short)``: long side ``int(short * long / short_side)``."""
    if min(h, w) == short:
        return h, w
    if h <= w:
        return short, int(short * w / h)
    return int(short * h / w), short


def center_crop_box(h: int, w: int, size: int) -> tuple[int, int]:
    """(top, left) of torchvision ``CenterCrop(size)``: ``int(round((H - size) / 2))``."""
    return int(round((h - size) / 2.0)), int(round((w - size) / 2.0))


def output_size(h: int, w: int, resize: Resize) -> tuple[int, int]:
    """Network input (H, W) for a decoded image of size (h, w); cheap, used for bucketing."""
    if resize.crop is not None:
        return resize.crop, resize.crop
    if resize.upsample:
        return torchvision_resize_size(h, w, resize.short)
    return scda_size(h, w, resize.short)


@contextlib.contextmanager
def _decode_guard():
    """PIL settings for reading one file: cfga's pixel limit, with the bomb *warning* an error too.

    Every other warning PIL emits while it still decodes the image (palette transparency in bytes,
    odd EXIF, ...) is shown but never escalated by a strict caller filter (``-W error``): method.md §2's
    ``convert('RGB')`` accepts those images, so they must not become ImageErrors.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


def _open(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found; re-run the dataset ingestion rule") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"{path}: {err}; the file is too large to be a dataset image") from None
    except Exception as err:  # PIL raises UnidentifiedImageError, OSError, SyntaxError...
        raise ImageError(
            f"{path}: not a readable image ({type(err).__name__}: {err}); "
            "re-download or re-extract the dataset archive"
        ) from None
    return img


def load_rgb(image: ImageLike) -> Image.Image:
    """Decode ``image`` fully and ``convert('RGB')`` (L, P, CMYK, RGBA all via PIL; alpha dropped)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    with _decode_guard():
        img = _open(path)
        try:
            img.load()
            rgb = img.convert("RGB")
        except Image.DecompressionBombWarning as err:
            raise ImageError(f"{path}: {err}; the file is too large to be a dataset image") from None
        except Exception as err:
            raise ImageError(
                f"{path}: image data is truncated or corrupt ({type(err).__name__}: {err}); "
                "re-download or re-extract the dataset archive"
            ) from None
        finally:
            img.close()
    return rgb


def peek_size(image: ImageLike) -> tuple[int, int]:
    """(h, w) of an image from its header only (no decoding)."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    path = Path(image)
    with _decode_guard():  # same pixel limit as load_rgb, so both accept/refuse the same files
        img = _open(path)
    try:
        return img.height, img.width
    finally:
        img.close()


def resize_image(img: Image.Image, resize: Resize) -> Image.Image:
    """Apply a protocol's resize (and crop) to an RGB PIL image."""
    h, w = img.height, img.width
    if resize.upsample:
        th, tw = torchvision_resize_size(h, w, resize.short)
    else:
        th, tw = scda_size(h, w, resize.short)
    if (th, tw) != (h, w):
        img = img.resize((tw, th), Image.BILINEAR)
    if resize.crop is not None:
        c = resize.crop
        top, left = center_crop_box(img.height, img.width, c)
        img = img.crop((left, top, left + c, top + c))
    return img


_MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)


def to_normalized_tensor(img: Image.Image) -> torch.Tensor:
    """``ToTensor`` then ImageNet ``Normalize``: uint8 [H, W, 3] → float32 [3, H, W]."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    x = arr.permute(2, 0, 1).contiguous().float().div(255)
    return x.sub_(_MEAN).div_(_STD)


def cap_700(x: torch.Tensor) -> torch.Tensor:
    """The authors' "700 cap" (method.md S1): dead code after the loaders, kept for fidelity.

    ``x`` is [B, 3, H, W]; when min(H, W) > 700 it is resized bilinearly (align_corners=True) so
    the short side becomes 700.
    """
    h, w = x.shape[-2:]
    m = min(h, w)
    if m <= 700:
        return x
    s = 700 / m
    return torch.nn.functional.interpolate(
        x, size=(int(h * s), int(w * s)), mode="bilinear", align_corners=True
    )


def preprocess(image: ImageLike, resize: Resize) -> torch.Tensor:
    """Decode, convert to RGB, resize/crop, normalise: → float32 [3, H, W]."""
    return to_normalized_tensor(resize_image(load_rgb(image), resize))
