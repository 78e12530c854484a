"""Where CFGA looks: per query, the image with its SCDA mask outline, then the CFGA map of each
CFGA+ layer (``cfga.numerics.cam``) over the image. The layers are the model's own (ResNet:
``cfga_4_1_2``, ``cfga_4_2_2``; Swin, ViT: the two qkv layers), labelled by their registry columns."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from cfga.extraction.maps import ImageMaps
from cfga.outputs.gallery import QUERY, UNKNOWN, Cell, render_grid
from cfga.registry.features import FEATURES

OUTLINE = (255, 230, 0)  # SCDA mask outline: yellow
PANEL = 192  # px, longer side of a heatmap panel
ALPHA = 0.5  # weight of the colour map over the image


def _fit(im: Image.Image, size: int) -> Image.Image:
    scale = size / max(im.size)
    return im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)


def mask_outline(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Boundary pixels (bool [H, W]) of a feature-grid mask [h, w] shown at image size (H, W):
    each grid cell covers its share of the image (nearest), the boundary is 2 px wide."""
    H, W = size
    h, w = mask.shape
    rows = np.minimum((np.arange(H) * h) // H, h - 1)
    cols = np.minimum((np.arange(W) * w) // W, w - 1)
    up = mask[rows][:, cols]
    inner = ndimage.binary_erosion(up, iterations=2, border_value=0)
    return up & ~inner


def overlay(pic: Image.Image, cmap: np.ndarray | None, mask: np.ndarray | None) -> np.ndarray:
    """RGB uint8 panel: the picture, the map (each map scaled to its own maximum, colour map
    ``jet``, weight ALPHA) and the mask outline, at PANEL px."""
    import matplotlib

    small = _fit(pic, PANEL)
    rgb = np.asarray(small, dtype=np.float32) / 255
    size = (small.height, small.width)
    if cmap is not None:
        m = np.asarray(Image.fromarray(cmap.astype(np.float32)).resize((size[1], size[0]), Image.BILINEAR))
        top = float(m.max())
        m = m / top if top > 0 else m
        heat = matplotlib.colormaps["jet"](m)[..., :3]
        rgb = (1 - ALPHA) * rgb + ALPHA * heat
    out = np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8)
    if mask is not None:
        out[mask_outline(mask, size)] = OUTLINE
    return out


def layer_label(name: str) -> str:
    """A CFGA+ layer's short label: its registry column without "CFGA " ("4-1-2", "4-0 qkv",
    "10 qkv"); the feature name itself for a layer the registry does not know (a test-sized ViT)."""
    f = FEATURES.get(name)
    return f.column.removeprefix("CFGA ") if f is not None else name


def heatmap_figure(items: Sequence[ImageMaps], captions: Sequence[str], path: str | os.PathLike,
                   title: str = "") -> None:
    """One row per image: image + SCDA mask outline, then each CFGA+ layer's map (with the outline).
    The items come from one model: its layers (``ImageMaps.cfga_maps``' keys) head the columns."""
    layers = list(items[0].cfga_maps) if items else []
    rows = []
    for it, cap in zip(items, captions):
        row = [Cell(overlay(it.image, None, it.mask), QUERY, cap)]
        for n in layers:
            top = float(it.cfga_maps[n].max())
            row.append(Cell(overlay(it.image, it.cfga_maps[n], it.mask), UNKNOWN, f"max {top:.3g}"))
        rows.append(row)
    heads = [(0, "image, SCDA mask (yellow)")] + [(i + 1, f"CFGA map {layer_label(n)}") for i, n in enumerate(layers)]
    render_grid(rows, path, title, group_titles=heads, thumb=PANEL)
