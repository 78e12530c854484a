"""Stanford Online Products (Oh Song et al., CVPR 2016) → manifest rows.

``Stanford_Online_Products.zip`` (or the folder it unpacks to) holds ``Ebay_train.txt`` and
``Ebay_test.txt`` beside the images: a header ``image_id class_id super_class_id path``, then one
image per line, path relative to the folder. They fix the split (11,318 classes and 59,551 images
train, 11,316 classes and 60,502 images test); label = ``class_id − 1``; the test split is
evaluated leave-one-out (every test image a query and a gallery item).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from cfga.data.archives import (
    _safe_relpath,
    copy_images,
    extract_zip_images,
    open_zip,
    read_zip_member,
)
from cfga.data.manifest import DatasetError, ManifestRow, check_evaluable

SOP_DIR = "Stanford_Online_Products"
LISTS = {"train": "Ebay_train.txt", "test": "Ebay_test.txt"}
HEADER = ("image_id", "class_id", "super_class_id", "path")


def parse_ebay_list(text: str, source: str, split: str) -> list[ManifestRow]:
    """Rows of one ``Ebay_{train,test}.txt`` (``source`` names it in errors, with the line)."""
    lines = text.splitlines()
    if not lines or tuple(lines[0].split()) != HEADER:
        got = lines[0] if lines else ""
        raise DatasetError(f"{source} line 1: header must be {' '.join(HEADER)!r}, got {got!r}; "
                           "this is not an SOP list file, re-download the archive.")
    rows = []
    for lineno, line in enumerate(lines[1:], 2):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 4:
            raise DatasetError(f"{source} line {lineno}: expected 4 fields ({' '.join(HEADER)}), got {line!r}; "
                               "re-download the archive.")
        try:
            _, cid, _ = (int(f) for f in fields[:3])
        except ValueError:
            raise DatasetError(f"{source} line {lineno}: ids must be integers, got {line!r}; "
                               "re-download the archive.") from None
        if cid < 1:
            raise DatasetError(f"{source} line {lineno}: class_id {cid} < 1; re-download the archive.")
        path = _safe_relpath(fields[3], f"{source} line {lineno}")
        rows.append(ManifestRow(split, cid - 1, str(cid), path))
    if not rows:
        raise DatasetError(f"{source}: lists no images; re-download the archive.")
    return rows


def _text(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{source}: not a text file ({err}); re-download the archive.") from None


def _combine(parts: dict[str, tuple[str, list[ManifestRow]]]) -> list[ManifestRow]:
    rows = parts["train"][1] + parts["test"][1]
    seen: set[str] = set()
    for r in rows:
        if r.path in seen:
            raise DatasetError(f"{parts['train'][0]} / {parts['test'][0]}: image {r.path} listed twice; "
                               "re-download the archive.")
        seen.add(r.path)
    both = {r.label for r in parts["train"][1]} & {r.label for r in parts["test"][1]}
    if both:
        raise DatasetError(f"{parts['test'][0]}: class_id(s) {sorted(c + 1 for c in both)[:5]} are also in "
                           f"{parts['train'][0]}; the split is by class, re-download the archive.")
    check_evaluable(rows, parts["test"][0], "Re-download the archive.")
    return rows


def _folder_root(path: Path) -> Path:
    for root in (path, path / SOP_DIR):
        if (root / LISTS["train"]).is_file():
            return root
    raise DatasetError(f"{path}: no {LISTS['train']} in it or in {path / SOP_DIR}; point `archive:` at "
                       f"{SOP_DIR}.zip or at the folder it unpacks to.")


def read_sop(archive: str | os.PathLike) -> tuple[list[ManifestRow], Callable[[str | os.PathLike], None]]:
    """→ (manifest rows, a function extracting their images under a destination root)."""
    archive = Path(archive)
    if archive.is_dir():
        root = _folder_root(archive)
        parts = {}
        for split, name in LISTS.items():
            p = root / name
            if not p.is_file():
                raise DatasetError(f"{root}: {name} is missing; re-download the archive.")
            parts[split] = (str(p), parse_ebay_list(_text(p.read_bytes(), str(p)), str(p), split))
        rows = _combine(parts)
        return rows, lambda dest: copy_images(root, rows, dest)
    with open_zip(archive) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        cands = sorted(n[: -len(LISTS["train"])] for n in infos if n.rsplit("/", 1)[-1] == LISTS["train"])
        if len(cands) != 1:
            raise DatasetError(f"{archive}: {'no' if not cands else 'several'} {LISTS['train']} in the zip; "
                               f"this is not {SOP_DIR}.zip, re-download it.")
        prefix = cands[0]
        parts = {}
        for split, name in LISTS.items():
            info = infos.get(prefix + name)
            if info is None:
                raise DatasetError(f"{archive}: {prefix + name} is missing; re-download the archive.")
            src = f"{archive}:{prefix}{name}"
            parts[split] = (src, parse_ebay_list(_text(read_zip_member(zf, info, archive), src), src, split))
    rows = _combine(parts)
    return rows, lambda dest: extract_zip_images(archive, rows, dest, prefix)
