"""The manifest: one row per image, columns ``split,label,class_name,path,is_query,is_gallery``;
``path`` is relative to the extracted dataset root.

Query/gallery roles (test rows only): CUB, Cars, SOP and class folders evaluate leave-one-out, so
every test image is both a query and a gallery item; In-Shop has separate query and gallery sets;
a CSV table gives them per row. Extraction covers the rows that are a query or a gallery item
(:func:`evaluation_rows`), once each, in manifest order.
"""
from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from cfga.files import write_csv


class DatasetError(Exception):
    """Bad dataset input; the message names the offending file and how to fix it."""


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise DatasetError(
            f"{what} not found: {path}. Download it (see README) or fix the path in the config."
        )


MANIFEST_COLUMNS = ("split", "label", "class_name", "path", "is_query", "is_gallery")
# Manifests written before query/gallery roles existed: every test row is both.
_LEGACY_COLUMNS = MANIFEST_COLUMNS[:4]
SPLITS = ("train", "test")


@dataclass(frozen=True)
class ManifestRow:
    """One image: split 'train'|'test', integer label, path relative to the dataset root.

    ``is_query`` / ``is_gallery``: the image's evaluation roles; left out (None) they are
    ``split == 'test'`` (leave-one-out). A train row has neither role.
    """

    split: str
    label: int
    class_name: str
    path: str
    is_query: bool | None = None
    is_gallery: bool | None = None

    def __post_init__(self):
        test = self.split == "test"
        for name in ("is_query", "is_gallery"):
            value = getattr(self, name)
            object.__setattr__(self, name, test if value is None else bool(value))
        if not test and (self.is_query or self.is_gallery):
            raise ValueError(f"train image {self.path} cannot be a query or gallery item")

    @property
    def evaluated(self) -> bool:
        """Whether extraction covers this image (a query, a gallery item, or both)."""
        return self.is_query or self.is_gallery


def evaluation_rows(rows: Sequence[ManifestRow]) -> list[ManifestRow]:
    """The rows extraction covers, in manifest order: every query or gallery image, once."""
    return [r for r in rows if r.evaluated]


def evaluation_roles(rows: Sequence[ManifestRow]) -> tuple[np.ndarray, np.ndarray]:
    """``is_query``, ``is_gallery``: boolean ``[N]`` over the evaluated rows (:func:`evaluation_rows`
    of ``rows``, i.e. a feature file's rows, in order)."""
    ev = evaluation_rows(rows)
    return (np.array([r.is_query for r in ev], dtype=bool).reshape(-1),
            np.array([r.is_gallery for r in ev], dtype=bool).reshape(-1))


def feature_roles(manifest: str | os.PathLike, paths: Sequence[str], features: str | os.PathLike, *,
                  rows: Sequence[ManifestRow] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The roles (``is_query``, ``is_gallery``, boolean ``[N]``) of a feature file's rows, from the
    manifest it was extracted from: the one source of who is a query and who a gallery item.

    ``paths`` ``[N]``: the feature file's image paths; they must be the manifest's evaluated rows
    in manifest order (else ValueError naming ``features`` and the fix). ``rows``: the manifest's
    rows when the caller has read them already (``manifest`` then only names it).
    """
    rows = read_manifest(manifest) if rows is None else rows
    if [r.path for r in evaluation_rows(rows)] != [str(p) for p in paths]:
        raise ValueError(f"{features} does not hold the images of {manifest} in its order; "
                         "delete the feature file and rerun its extraction")
    return evaluation_roles(rows)


def write_manifest(rows: Sequence[ManifestRow], path: str | os.PathLike) -> None:
    """Write the manifest CSV atomically (roles as 0/1)."""
    write_csv(path, MANIFEST_COLUMNS, [
        (r.split, r.label, r.class_name, r.path, int(r.is_query), int(r.is_gallery)) for r in rows
    ])


def read_manifest(path: str | os.PathLike) -> list[ManifestRow]:
    """Read a manifest CSV written by ``write_manifest`` (or an older one without roles)."""
    path = Path(path)
    _require_file(path, "Manifest")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = tuple(next(reader, None) or ())
        if header not in (MANIFEST_COLUMNS, _LEGACY_COLUMNS):
            raise DatasetError(f"{path}: header must be {','.join(MANIFEST_COLUMNS)}, got {list(header)}; "
                               "regenerate it.")
        rows = []
        for lineno, rec in enumerate(reader, 2):
            if len(rec) != len(header) or rec[0] not in SPLITS or any(f not in ("0", "1") for f in rec[4:]):
                raise DatasetError(f"{path} line {lineno}: malformed row {rec}; regenerate the manifest.")
            try:
                label = int(rec[1])
            except ValueError:
                raise DatasetError(f"{path} line {lineno}: label {rec[1]!r} is not an integer.") from None
            roles = [f == "1" for f in rec[4:]] or [None, None]
            try:
                rows.append(ManifestRow(rec[0], label, rec[2], rec[3], *roles))
            except ValueError as err:
                raise DatasetError(f"{path} line {lineno}: {err}; regenerate the manifest.") from None
    return rows


def check_evaluable(rows: Sequence[ManifestRow], source: str, fix: str = "Fix the annotations or add images.") -> None:
    """Refuse a manifest that cannot be evaluated; messages name ``source``.

    No query or no gallery item is an error. Leave-one-out (every evaluated image both a query
    and a gallery item): a class with a single test image has no positive, Recall@K is undefined
    there, so that is an error too. With separate query and gallery sets a query whose class has
    no gallery item is not an error: the metrics leave it out and count it.
    """
    ev = evaluation_rows(rows)
    if not ev:
        raise DatasetError(f"{source}: no test images (the test split is empty). {fix}")
    for role in ("is_query", "is_gallery"):
        if not any(getattr(r, role) for r in ev):
            raise DatasetError(f"{source}: no test image is a {role[3:]} item. {fix}")
    if not all(r.is_query and r.is_gallery for r in ev):
        return
    counts = Counter((r.label, r.class_name) for r in ev)
    singles = [name for (_, name), n in sorted(counts.items()) if n == 1]
    if singles:
        raise DatasetError(
            f"{source}: test class(es) with only one image, Recall@K is undefined there: "
            f"{', '.join(singles[:10])}{' ...' if len(singles) > 10 else ''}. {fix}"
        )
