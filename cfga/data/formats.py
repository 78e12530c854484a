"""Dataset formats as published → manifest rows, and the ingestion step that dispatches on
``format``: CUB-200-2011 and CARS196 here; class folders (cfga.data.folder), a CSV table
(cfga.data.csv_table), Stanford Online Products (cfga.data.sop), In-Shop (cfga.data.inshop).

CUB/Cars split rule (method.md §6, S17): the first half of the classes by class id is train,
the rest test; labels are ``class_id - 1`` and are not renumbered.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from cfga.data.archives import (
    DatasetError,
    _iter_tar,
    _list_members,
    _member_name,
    _read_member,
    _require_file,
    _safe_relpath,
    copy_images,
    extract_images,
    verify_md5,
)
from cfga.data.csv_table import read_csv_manifest
from cfga.data.folder import read_folder_manifest
from cfga.data.inshop import read_inshop
from cfga.data.manifest import ManifestRow, check_evaluable, write_manifest
from cfga.data.sop import read_sop
from cfga.registry.datasets import FORMATS

CUB_PREFIX = "CUB_200_2011/"


# Required CUB metadata. train_test_split.txt is deliberately not required: its flag is ignored.
_CUB_REQUIRED = ("images.txt", "image_class_labels.txt", "classes.txt")


# Fields of cars_annos.mat we read; bbox_* and test exist in the real file but are not used.
_CARS_REQUIRED_FIELDS = ("relative_im_path", "class")


def split_for_class(class_id: int, n_classes: int) -> str:
    """'train' for the first half of the classes by 1-based id, else 'test' (method.md §6)."""
    return "train" if class_id <= n_classes // 2 else "test"


def _parse_pairs(text: str, source: str, n_fields: int = 2) -> list[list[str]]:
    """Split '<id> <value>' lines; blank lines skipped; the last field may hold spaces."""
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        fields = line.split(None, n_fields - 1)
        if len(fields) != n_fields:
            raise DatasetError(f"{source} line {lineno}: expected {n_fields} fields, got {line!r}.")
        out.append(fields)
    return out


def _int(s: str, source: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise DatasetError(f"{source}: expected an integer id, got {s!r}; the file is malformed.") from None


def _check_test_classes(rows: Sequence[ManifestRow], source: str) -> None:
    check_evaluable(rows, source)


def read_cub_manifest(archive_path: str | os.PathLike) -> list[ManifestRow]:
    """Manifest of ``CUB_200_2011.tgz`` in images.txt order, reading only the metadata members."""
    archive_path = Path(archive_path)
    wanted = {CUB_PREFIX + n: n for n in (*_CUB_REQUIRED, "train_test_split.txt")}
    texts: dict[str, str] = {}
    for member, tf in _iter_tar(archive_path, drain=False):
        name = _member_name(member.name)
        if name in wanted and member.isfile():
            texts[wanted[name]] = _read_member(tf, member, archive_path).decode("utf-8")
            if len(texts) == len(wanted):
                break  # metadata complete: no need to decompress the rest
    missing = [n for n in _CUB_REQUIRED if n not in texts]
    if missing:
        raise DatasetError(
            f"{archive_path}: missing {', '.join(CUB_PREFIX + n for n in missing)}; "
            "this is not a complete CUB_200_2011.tgz, re-download the archive."
        )
    src = lambda n: f"{archive_path}:{CUB_PREFIX}{n}"  # noqa: E731

    classes: dict[int, str] = {}
    for cid_s, name in _parse_pairs(texts["classes.txt"], src("classes.txt")):
        cid = _int(cid_s, src("classes.txt"))
        if cid in classes:
            raise DatasetError(f"{src('classes.txt')}: class id {cid} listed twice.")
        classes[cid] = name
    n_classes = len(classes)
    if sorted(classes) != list(range(1, n_classes + 1)):
        raise DatasetError(
            f"{src('classes.txt')}: class ids must be 1..{n_classes} without gaps; the file is malformed."
        )

    images: dict[int, str] = {}
    for iid_s, rel in _parse_pairs(texts["images.txt"], src("images.txt")):
        iid = _int(iid_s, src("images.txt"))
        if iid in images:
            raise DatasetError(f"{src('images.txt')}: image id {iid} listed twice.")
        images[iid] = _safe_relpath("images/" + rel, src("images.txt"))
    if not images:
        raise DatasetError(f"{src('images.txt')} lists no images; re-download the archive.")

    labels: dict[int, int] = {}
    for iid_s, cid_s in _parse_pairs(texts["image_class_labels.txt"], src("image_class_labels.txt")):
        labels[_int(iid_s, src("image_class_labels.txt"))] = _int(cid_s, src("image_class_labels.txt"))
    if set(labels) != set(images):
        only_img = sorted(set(images) - set(labels))[:5]
        only_lab = sorted(set(labels) - set(images))[:5]
        raise DatasetError(
            f"{src('image_class_labels.txt')}: image ids do not match {src('images.txt')} "
            f"(only in images.txt: {only_img}, only in image_class_labels.txt: {only_lab}); "
            "the metadata files come from different releases, re-download the archive."
        )
    bad = sorted({c for c in labels.values() if c not in classes})
    if bad:
        raise DatasetError(
            f"{src('image_class_labels.txt')}: class ids {bad[:5]} are not in "
            f"{src('classes.txt')} (1..{n_classes}); re-download the archive."
        )

    # train_test_split.txt is read by the authors' files.py but its flag is ignored (method.md S17):
    # the DML protocol splits by class (first half train), so we ignore it too.
    rows = []
    for iid in sorted(images):  # images.txt order is ids ascending
        cid = labels[iid]
        rows.append(ManifestRow(split_for_class(cid, n_classes), cid - 1, classes[cid], images[iid]))
    _check_test_classes(rows, src("image_class_labels.txt"))
    return rows


def _scalar(x):
    """Peel the 1x1 / (1,) nesting loadmat puts around every value (absent with squeeze_me)."""
    while isinstance(x, np.ndarray):
        if x.size != 1:
            if x.size == 0 and x.dtype.kind in "US":
                return ""
            raise ValueError(f"expected one value, got an array of shape {x.shape}")
        x = x.reshape(-1)[0]
    if isinstance(x, bytes):
        x = x.decode("utf-8")
    return x


def _struct_columns(ann) -> dict[str, list]:
    """Struct array (record ndarray or mat_struct objects, any squeeze layout) -> field columns."""
    if isinstance(ann, np.ndarray) and ann.dtype.names is None and ann.dtype == object and ann.size == 1:
        inner = ann.reshape(-1)[0]
        if isinstance(inner, np.ndarray) and inner.dtype.names is not None:
            ann = inner
    if isinstance(ann, np.ndarray) and ann.dtype.names is not None:
        flat = ann.reshape(-1)
        return {f: list(flat[f]) for f in ann.dtype.names}
    items = list(np.asarray(ann, dtype=object).reshape(-1)) if isinstance(ann, np.ndarray) else [ann]
    if not items or not all(hasattr(s, "_fieldnames") for s in items):
        raise ValueError("'annotations' is not a MATLAB struct array")
    names = items[0]._fieldnames
    return {f: [getattr(s, f, None) for s in items] for f in names}


def parse_cars_annotations(mat: Mapping, source: str = "cars_annos.mat") -> tuple[list[dict], list[str]]:
    """Parse a loadmat() dict of cars_annos.mat (any squeeze_me / struct_as_record layout).

    Returns (annotations in file order as dicts with 'relative_im_path' str and 'class' int,
    class_names list). Raises DatasetError naming ``source``.
    """
    for key in ("annotations", "class_names"):
        if key not in mat:
            raise DatasetError(
                f"{source}: no variable {key!r}; this is not the CARS196 cars_annos.mat, re-download it."
            )
    try:
        cols = _struct_columns(mat["annotations"])
    except ValueError as err:
        raise DatasetError(f"{source}: {err}; re-download cars_annos.mat.") from None
    missing = [f for f in _CARS_REQUIRED_FIELDS if f not in cols]
    if missing:
        raise DatasetError(
            f"{source}: 'annotations' lacks field(s) {missing} (has {sorted(cols)}); re-download cars_annos.mat."
        )
    cn = mat["class_names"]
    cn_items = [cn] if isinstance(cn, (str, bytes)) else list(np.asarray(cn, dtype=object).reshape(-1))
    try:
        class_names = [str(_scalar(c)) for c in cn_items]
        paths = [str(_scalar(p)) for p in cols["relative_im_path"]]
        classes = [int(_scalar(c)) for c in cols["class"]]
    except (ValueError, TypeError) as err:
        raise DatasetError(f"{source}: malformed annotations ({err}); re-download cars_annos.mat.") from None
    if not class_names:
        raise DatasetError(f"{source}: 'class_names' is empty; re-download cars_annos.mat.")
    n = len(class_names)
    bad = [(i + 1, c) for i, c in enumerate(classes) if not 1 <= c <= n]
    if bad:
        raise DatasetError(
            f"{source}: annotation class out of range 1..{n} (entry, class): {bad[:5]}; "
            "re-download cars_annos.mat."
        )
    return [{"relative_im_path": p, "class": c} for p, c in zip(paths, classes)], class_names


def _load_mat(path: Path) -> dict:
    import scipy.io

    _require_file(path, "Annotation file")
    try:
        return scipy.io.loadmat(str(path))
    except NotImplementedError as err:  # MATLAB v7.3 (HDF5)
        raise DatasetError(f"{path}: {err}; save it as a MATLAB v5 file (the original format).") from None
    except Exception as err:  # scipy raises assorted errors on garbage input
        raise DatasetError(f"{path} is not a readable MATLAB file ({err}); re-download it.") from None


def read_cars_manifest(
    images_archive: str | os.PathLike, annotations_mat: str | os.PathLike
) -> list[ManifestRow]:
    """Manifest of CARS196 (``car_ims.tgz`` + ``cars_annos.mat``) in .mat order."""
    images_archive, annotations_mat = Path(images_archive), Path(annotations_mat)
    _require_file(images_archive, "Image archive")
    anns, class_names = parse_cars_annotations(_load_mat(annotations_mat), str(annotations_mat))
    n_classes = len(class_names)
    # The .mat 'test' flag is ignored like CUB's train_test_split.txt: the protocol is the class
    # split 1..98 / 99..196 (method.md §6).
    rows, seen = [], set()
    for a in anns:
        p = _safe_relpath(a["relative_im_path"], str(annotations_mat))
        if p in seen:
            raise DatasetError(f"{annotations_mat}: image {p} listed twice; re-download cars_annos.mat.")
        seen.add(p)
        cid = a["class"]
        rows.append(ManifestRow(split_for_class(cid, n_classes), cid - 1, class_names[cid - 1], p))
    if not rows:
        raise DatasetError(f"{annotations_mat}: no annotations; re-download cars_annos.mat.")
    _check_test_classes(rows, str(annotations_mat))
    members = _list_members(images_archive)
    absent = [r.path for r in rows if r.path not in members]
    if absent:
        raise DatasetError(
            f"{images_archive}: {len(absent)} image(s) named in {annotations_mat} are not in the "
            f"archive (e.g. {absent[:3]}); the two files do not match, re-download car_ims.tgz."
        )
    return rows


def _cfg_path(cfg: Mapping, key: str, fmt: str) -> Path:
    if not cfg.get(key):
        raise DatasetError(f"dataset config (format {fmt}) needs '{key}: <path>'.")
    return Path(cfg[key])


def _md5s(cfg: Mapping, fmt: str) -> dict[str, str]:
    """The config's md5 entries as {file key: md5}, checked against the format's md5 style."""
    f = FORMATS[fmt]
    # a folder of one's own (no published name) has no checksum; an archive that may be unpacked does
    md5, kind, keys = cfg.get("md5"), f.md5, [k for k in f.files if not (k in f.dirs and f.files[k] is None)]
    if md5 is None:
        return {}
    if kind == "none":
        raise DatasetError(f"dataset config (format {fmt}): a folder has no md5; remove 'md5'.")
    if kind == "single":
        if not isinstance(md5, str):
            raise DatasetError(f"dataset config (format {fmt}): 'md5' must be a string (the archive's md5).")
        return {keys[0]: md5}
    if not isinstance(md5, Mapping) or set(md5) - set(keys):
        raise DatasetError(
            f"dataset config (format {fmt}): 'md5' must be a mapping with keys {' and/or '.join(keys)}."
        )
    return dict(md5)


def _verified(cfg: Mapping, fmt: str, what: Mapping[str, str]) -> dict[str, Path]:
    """The format's input paths (``what``: key → description), each present, md5s checked."""
    paths = {k: _cfg_path(cfg, k, fmt) for k in what}
    md5 = _md5s(cfg, fmt)
    for k, desc in what.items():
        if k in FORMATS[fmt].dirs and paths[k].is_dir():
            if k in md5:
                raise DatasetError(f"dataset config (format {fmt}): {paths[k]} is a folder, an md5 applies to "
                                   f"the archive only; remove md5 {k}.")
            continue
        if k in FORMATS[fmt].dirs and fmt in ("folder", "csv"):
            raise DatasetError(f"{desc} not found: {paths[k]} (a folder). Fix `{k}:` in the dataset config.")
        _require_file(paths[k], desc)
    for k, digest in md5.items():
        verify_md5(paths[k], digest)
    return paths


def plan_ingest(cfg: Mapping) -> tuple[list[ManifestRow], Callable[[str | os.PathLike], None]]:
    """Check the inputs of dataset config ``cfg`` (md5 first), read its manifest rows; → (rows, a
    function that extracts or copies exactly those images under a destination root)."""
    fmt = cfg.get("format")
    if fmt not in FORMATS:
        raise DatasetError(f"dataset config: unknown format {fmt!r}; use one of {', '.join(FORMATS)}.")
    if fmt == "cub":
        archive = _verified(cfg, fmt, {"archive": "Archive"})["archive"]
        rows = read_cub_manifest(archive)
        return rows, lambda dest: extract_images(archive, rows, dest, CUB_PREFIX)
    if fmt == "cars":
        p = _verified(cfg, fmt, {"images_archive": "Image archive", "annotations": "Annotation file"})
        rows = read_cars_manifest(p["images_archive"], p["annotations"])
        return rows, lambda dest: extract_images(p["images_archive"], rows, dest, "")
    if fmt == "folder":
        root = _verified(cfg, fmt, {"root": "Image folder"})["root"]
        rows = read_folder_manifest(root, cfg.get("split"))
        return rows, lambda dest: copy_images(root, rows, dest)
    if fmt == "csv":
        p = _verified(cfg, fmt, {"table": "Table", "root": "Image root"})
        rows = read_csv_manifest(p["table"], p["root"])
        return rows, lambda dest: copy_images(p["root"], rows, dest)
    if fmt == "sop":
        return read_sop(_verified(cfg, fmt, {"archive": "Archive"})["archive"])
    p = _verified(cfg, fmt, {"images_archive": "Image archive", "partition": "Partition file"})
    return read_inshop(p["images_archive"], p["partition"])


def ingest_dataset(cfg: Mapping, manifest_path: str | os.PathLike, dest_root: str | os.PathLike) -> list[ManifestRow]:
    """Verify md5s, build the manifest, extract its images under ``dest_root``, write the manifest.

    ``cfg``: ``{format: cub, archive, md5?}``,
    ``{format: cars, images_archive, annotations, md5?: {images_archive?, annotations?}}``,
    ``{format: folder, root, split?: {train: [..], test: [..]}}``,
    ``{format: csv, table, root, md5?: {table}}``, ``{format: sop, archive (zip or folder), md5?}``,
    ``{format: inshop, images_archive, partition, md5?: {images_archive?, partition?}}``.
    The manifest is written last, so it exists only if the extraction completed.
    """
    if cfg.get("split") is not None and cfg.get("format") != "folder":
        raise DatasetError(f"dataset config (format {cfg.get('format')}): 'split' is for class folders only; "
                           "the format's own files fix the split.")
    rows, extract = plan_ingest(cfg)
    extract(dest_root)
    try:
        write_manifest(rows, manifest_path)
    except BaseException:
        # The images alone would look like a finished ingest to a later run.
        shutil.rmtree(dest_root, ignore_errors=True)
        raise
    return rows
