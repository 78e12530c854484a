"""In-Shop Clothes Retrieval (DeepFashion; Liu et al., CVPR 2016) → manifest rows.

``Img/img.zip`` holds ``img/<GENDER>/<category>/id_<item>/<n>_<view>.jpg``;
``Eval/list_eval_partition.txt`` has the image count on line 1, the header
``image_name item_id evaluation_status`` on line 2, then one image per line with status
``train``, ``query`` or ``gallery`` (25,882 / 14,218 / 12,612 images). Label = the item id's
number (``id_00000001`` → 1), shared by an item's query and gallery images. Queries and gallery
items are separate sets (manifest split ``test``, roles from the status). ``images_archive`` may
also be the folder img.zip unpacks to (the one holding ``img/``).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

from cfga.data.archives import _safe_relpath, copy_images, extract_zip_images
from cfga.data.manifest import DatasetError, ManifestRow, _require_file, check_evaluable

HEADER = ("image_name", "item_id", "evaluation_status")
# status → (split, is_query, is_gallery)
STATUSES = {"train": ("train", False, False), "query": ("test", True, False), "gallery": ("test", False, True)}
_ITEM = re.compile(r"id_(\d+)")


def parse_partition(text: str, source: str) -> list[ManifestRow]:
    """Rows of ``list_eval_partition.txt`` (``source`` names it in errors, with the line)."""
    fix = "re-download list_eval_partition.txt (In-Shop Eval/ folder)."
    lines = text.splitlines()
    try:
        count = int(lines[0].strip())
    except (IndexError, ValueError):
        raise DatasetError(f"{source} line 1: expected the image count, got "
                           f"{lines[0] if lines else ''!r}; {fix}") from None
    if len(lines) < 2 or tuple(lines[1].split()) != HEADER:
        raise DatasetError(f"{source} line 2: header must be {' '.join(HEADER)!r}, got "
                           f"{lines[1] if len(lines) > 1 else ''!r}; {fix}")
    rows, seen, item_split = [], {}, {}
    for lineno, line in enumerate(lines[2:], 3):
        fields = line.split()
        if not fields:
            continue
        where = f"{source} line {lineno}"
        if len(fields) != 3:
            raise DatasetError(f"{where}: expected 3 fields ({' '.join(HEADER)}), got {line!r}; {fix}")
        name, item, status = fields
        if status not in STATUSES:
            raise DatasetError(f"{where}: unknown evaluation_status {status!r} (known: {', '.join(STATUSES)}); {fix}")
        m = _ITEM.fullmatch(item)
        if m is None:
            raise DatasetError(f"{where}: item_id {item!r} is not of the form id_<digits>; {fix}")
        path = _safe_relpath(name, where)
        if path in seen:
            raise DatasetError(f"{where}: {path} is listed again (first on line {seen[path]}); {fix}")
        seen[path] = lineno
        split, q, g = STATUSES[status]
        if item_split.setdefault(item, split) != split:
            raise DatasetError(f"{where}: item {item} is both a train item and a query/gallery item; {fix}")
        rows.append(ManifestRow(split, int(m.group(1)), item, path, q, g))
    if len(rows) != count:
        raise DatasetError(f"{source} line 1: says {count} images, the file lists {len(rows)}; "
                           f"the file is truncated or edited, {fix}")
    return rows


def read_inshop(images_archive: str | os.PathLike, partition: str | os.PathLike
                ) -> tuple[list[ManifestRow], Callable[[str | os.PathLike], None]]:
    """→ (manifest rows, a function extracting their images under a destination root)."""
    images_archive, partition = Path(images_archive), Path(partition)
    _require_file(partition, "Partition file")
    if not images_archive.is_dir():
        _require_file(images_archive, "Image archive")
    try:
        text = partition.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{partition}: not a text file ({err}); re-download list_eval_partition.txt.") from None
    rows = parse_partition(text, str(partition))
    check_evaluable(rows, str(partition), "Re-download list_eval_partition.txt.")
    if images_archive.is_dir():
        if not (images_archive / "img").is_dir():
            raise DatasetError(f"{images_archive}: no img/ folder in it; point `images_archive:` at img.zip or at "
                               "the folder it unpacks to (the one holding img/).")
        return rows, lambda dest: copy_images(images_archive, rows, dest)
    return rows, lambda dest: extract_zip_images(images_archive, rows, dest, "")
