"""Retrieval galleries as PNG grids (PIL only: no axes to draw, the same bytes every run).

One row per query: the query framed blue, then its neighbours framed green (same class) or red
(other class), each with its rank and similarity underneath (plus ✓/✗, for readers who do not
tell green from red). Unknown class (a user's own query): grey frame.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

QUERY = (31, 119, 180)  # blue
SAME = (44, 160, 44)  # green
OTHER = (214, 39, 40)  # red
UNKNOWN = (127, 127, 127)
BACKGROUND = (255, 255, 255)

THUMB = 128  # px, the longer side of a thumbnail
FRAME = 5  # px
CAPTION = 34  # px of text under each cell
GAP = 8  # px between cells
GROUP_GAP = 28  # px between groups of columns (side-by-side figures)


@dataclass(frozen=True)
class Cell:
    """One picture of the grid: a path or an RGB image, its frame colour and caption lines."""

    image: str | os.PathLike | Image.Image | np.ndarray
    color: tuple[int, int, int]
    caption: str = ""


def _font(size: int):
    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        return ImageFont.load_default()


def _as_image(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    with Image.open(image) as im:
        return im.convert("RGB")


def thumbnail(image, color: tuple[int, int, int], size: int = THUMB) -> Image.Image:
    """The image fitted into a size × size square (aspect kept, centred), framed in ``color``."""
    im = _as_image(image)
    scale = size / max(im.size)
    w, h = max(1, round(im.width * scale)), max(1, round(im.height * scale))
    im = im.resize((w, h), Image.BILINEAR)
    box = Image.new("RGB", (size + 2 * FRAME, size + 2 * FRAME), color)
    inner = Image.new("RGB", (size, size), BACKGROUND)
    inner.paste(im, ((size - w) // 2, (size - h) // 2))
    box.paste(inner, (FRAME, FRAME))
    return box


def render_grid(rows: Sequence[Sequence[Cell | None]], path: str | os.PathLike, title: str = "",
                group_titles: Sequence[tuple[int, str]] = (), gaps_after: Sequence[int] = (),
                thumb: int = THUMB) -> None:
    """Write a grid of framed thumbnails with captions as a PNG, atomically.

    rows: cells per row (None leaves a cell empty). group_titles: (first column, text) headers.
    gaps_after: column indices after which a wider gap separates groups.
    """
    from cfga.files import atomic_path

    ncol = max((len(r) for r in rows), default=1)
    cell_w = thumb + 2 * FRAME
    xs, x = [], GAP
    for c in range(ncol):
        xs.append(x)
        x += cell_w + (GROUP_GAP if c in gaps_after else GAP)
    width = x
    head = 34 if title else 8
    head += 24 if group_titles else 0
    row_h = cell_w + CAPTION + GAP
    height = head + len(rows) * row_h + GAP
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font, small, big = _font(12), _font(11), _font(15)
    if title:
        draw.text((GAP, 8), title, fill=(0, 0, 0), font=big)
    for col, text in group_titles:
        draw.text((xs[col], head - 22), text, fill=(0, 0, 0), font=font)
    for r, cells in enumerate(rows):
        y = head + r * row_h
        for c, cell in enumerate(cells):
            if cell is None:
                continue
            canvas.paste(thumbnail(cell.image, cell.color, thumb), (xs[c], y))
            for i, line in enumerate(cell.caption.splitlines()[:2]):
                draw.text((xs[c] + 2, y + cell_w + 2 + 14 * i), line, fill=(0, 0, 0), font=small)
    with atomic_path(path, suffix=".png") as tmp:
        canvas.save(tmp, format="PNG")


def neighbour_cell(image, rank: int, similarity: float, same_class: bool | None, caption: str = "") -> Cell:
    """A neighbour: green/red frame by class (grey when unknown), ``#rank ✓/✗ similarity``."""
    color = UNKNOWN if same_class is None else SAME if same_class else OTHER
    mark = "" if same_class is None else " ✓" if same_class else " ✗"
    text = f"#{rank}{mark}  {similarity:.4g}" + (f"\n{caption}" if caption else "")
    return Cell(image, color, text)


def query_cell(image, caption: str) -> Cell:
    return Cell(image, QUERY, caption)


def _short(text: str, n: int = 22) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _row(root: Path, paths, labels, names, q: int, ns) -> list[Cell]:
    cells = [query_cell(root / paths[q], f"query, label {labels[q]}\n{_short(names.get(int(labels[q]), ''))}")]
    for n in ns:
        cells.append(neighbour_cell(root / paths[n.index], n.rank, n.similarity, n.same_class,
                                    f"label {labels[n.index]}"))
    return cells


def gallery_figure(root: str | os.PathLike, paths: Sequence[str], labels: Sequence[int], class_names: dict,
                   queries: Sequence[int], neighbours, path: str | os.PathLike, title: str) -> None:
    """Gallery of gallery-row queries: images under ``root`` (manifest paths), one row per query."""
    root = Path(root)
    rows = [_row(root, paths, labels, class_names, q, ns) for q, ns in zip(queries, neighbours)]
    render_grid(rows, path, title)


def compare_figure(root: str | os.PathLike, paths: Sequence[str], labels: Sequence[int], class_names: dict,
                   queries: Sequence[int], groups: Sequence[tuple[str, list]], path: str | os.PathLike,
                   title: str) -> None:
    """Two (or more) features side by side on the same queries: query, then each feature's top-k.
    ``groups``: (heading, neighbours per query)."""
    root = Path(root)
    rows, heads, gaps, col = [], [], [], 1
    for heading, neighbours in groups:
        k = len(neighbours[0]) if neighbours else 0
        heads.append((col, heading))
        col += k
        gaps.append(col - 1)
    for i, q in enumerate(queries):
        row = _row(root, paths, labels, class_names, q, [])
        for _, neighbours in groups:
            row += _row(root, paths, labels, class_names, q, neighbours[i])[1:]
        rows.append(row)
    render_grid(rows, path, title, group_titles=[(0, "query"), *heads], gaps_after=[0, *gaps])
