"""A CSV table → manifest rows (open-metric-learning's layout).

Columns ``label,path,split`` and optionally ``is_query,is_gallery`` (both or neither); other
columns are ignored. ``split`` is ``train``, ``validation`` or ``test`` (validation means test);
``path`` is relative to the dataset root; ``label`` an integer, kept as given. Without role
columns every test image is a query and a gallery item (leave-one-out).
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

from cfga.data.archives import _safe_relpath, resolve_inside
from cfga.data.manifest import DatasetError, ManifestRow, _require_file, check_evaluable

REQUIRED_COLUMNS = ("label", "path", "split")
ROLE_COLUMNS = ("is_query", "is_gallery")
SPLITS = {"train": "train", "validation": "test", "test": "test"}
_TRUE = {"true", "1", "1.0", "yes", "t", "y"}
_FALSE = {"false", "0", "0.0", "no", "f", "n"}


def _flag(value: str, column: str, where: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise DatasetError(f"{where}: {column} is {value!r}; write True or False (or 1 / 0).")


def read_csv_manifest(table: str | os.PathLike, root: str | os.PathLike) -> list[ManifestRow]:
    """Manifest of a CSV table whose paths are relative to ``root``, in table order."""
    table, root = Path(table), Path(root)
    _require_file(table, "Table")
    if not root.is_dir():
        raise DatasetError(f"Image root not found: {root}. Fix `root:` in the dataset config.")
    with open(table, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise DatasetError(f"{table} line 1: missing column(s) {', '.join(missing)} (header: {header}); "
                               f"the table needs {','.join(REQUIRED_COLUMNS)} (optional: {','.join(ROLE_COLUMNS)}).")
        roles = [c for c in ROLE_COLUMNS if c in header]
        if len(roles) == 1:
            raise DatasetError(f"{table} line 1: has {roles[0]} but not "
                               f"{(set(ROLE_COLUMNS) - set(roles)).pop()}; give both columns or neither.")
        rows: list[ManifestRow] = []
        first_line: dict[str, int] = {}
        for rec in reader:
            lineno = reader.line_num
            where = f"{table} line {lineno}"
            if None in rec or any(rec[c] is None for c in REQUIRED_COLUMNS):
                raise DatasetError(f"{where}: wrong number of fields; every row needs one value per column.")
            split = SPLITS.get(rec["split"].strip())
            if split is None:
                raise DatasetError(f"{where}: split is {rec['split']!r}; use train, validation or test.")
            try:
                label = int(rec["label"].strip())
            except ValueError:
                raise DatasetError(f"{where}: label {rec['label']!r} is not an integer; use integer class ids.") from None
            path = _safe_relpath(rec["path"].strip(), where)
            if path in first_line:
                raise DatasetError(f"{where}: {path} is listed again (first on line {first_line[path]}); "
                                   "list each image once.")
            first_line[path] = lineno
            resolve_inside(root, path, where)
            q = g = split == "test"
            if roles and split == "test":
                q, g = (_flag(rec[c] or "", c, where) for c in ROLE_COLUMNS)
            rows.append(ManifestRow(split, label, str(label), path, q, g))
    if not rows:
        raise DatasetError(f"{table}: no rows; add one row per image.")
    check_evaluable(rows, str(table), "Fix the table (split / is_query / is_gallery columns) or add images.")
    return rows
