"""The manifest: one row per image, columns ``split,label,class_name,path``; ``path`` is relative
to the extracted dataset root.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cfga.files import write_csv


class DatasetError(Exception):
    """Bad dataset input; the message names the offending file and how to fix it."""


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise DatasetError(
            f"{what} not found: {path}. Download it (see README) or fix the path in the config."
        )


MANIFEST_COLUMNS = ("split", "label", "class_name", "path")


@dataclass(frozen=True)
class ManifestRow:
    """One image: split 'train'|'test', label = class id - 1, path relative to the dataset root."""

    split: str
    label: int
    class_name: str
    path: str


def write_manifest(rows: Sequence[ManifestRow], path: str | os.PathLike) -> None:
    """Write the manifest CSV (columns split,label,class_name,path) atomically."""
    write_csv(path, MANIFEST_COLUMNS, [(r.split, r.label, r.class_name, r.path) for r in rows])


def read_manifest(path: str | os.PathLike) -> list[ManifestRow]:
    """Read a manifest CSV written by ``write_manifest``."""
    path = Path(path)
    _require_file(path, "Manifest")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or tuple(header) != MANIFEST_COLUMNS:
            raise DatasetError(f"{path}: header must be {','.join(MANIFEST_COLUMNS)}, got {header}; regenerate it.")
        rows = []
        for lineno, rec in enumerate(reader, 2):
            if len(rec) != 4 or rec[0] not in ("train", "test"):
                raise DatasetError(f"{path} line {lineno}: malformed row {rec}; regenerate the manifest.")
            try:
                label = int(rec[1])
            except ValueError:
                raise DatasetError(f"{path} line {lineno}: label {rec[1]!r} is not an integer.") from None
            rows.append(ManifestRow(rec[0], label, rec[2], rec[3]))
    return rows
