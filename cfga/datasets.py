"""Raw dataset archives (CUB-200-2011, CARS196) -> manifest CSV + extracted images.

The manifest has one row per image, columns ``split,label,class_name,path``; ``path`` is relative
to the extracted dataset root (``CUB_200_2011/`` for CUB, the folder holding ``car_ims/`` for
Cars). Split rule (SPEC section 6, S17): the first half of the classes by class id is train, the
rest test; labels are ``class_id - 1`` and are not renumbered.
"""
from __future__ import annotations

import csv
import gzip
import os
import shutil
import tarfile
import tempfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from cfga.io import md5_file, write_csv

__all__ = [
    "DatasetError",
    "ManifestRow",
    "MANIFEST_COLUMNS",
    "CUB_PREFIX",
    "verify_md5",
    "read_cub_manifest",
    "read_cars_manifest",
    "parse_cars_annotations",
    "split_for_class",
    "extract_images",
    "write_manifest",
    "read_manifest",
    "ingest_dataset",
]

MANIFEST_COLUMNS = ("split", "label", "class_name", "path")
CUB_PREFIX = "CUB_200_2011/"
# Required CUB metadata. train_test_split.txt is deliberately not required: its flag is ignored.
_CUB_REQUIRED = ("images.txt", "image_class_labels.txt", "classes.txt")
# Fields of cars_annos.mat we read; bbox_* and test exist in the real file but are not used.
_CARS_REQUIRED_FIELDS = ("relative_im_path", "class")

# Everything a damaged gzip/tar stream can raise while being read.
_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, OSError)


class DatasetError(Exception):
    """Bad dataset input; the message names the offending file and how to fix it."""


@dataclass(frozen=True)
class ManifestRow:
    """One image: split 'train'|'test', label = class id - 1, path relative to the dataset root."""

    split: str
    label: int
    class_name: str
    path: str


# --------------------------------------------------------------------------------------------
# small helpers


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise DatasetError(
            f"{what} not found: {path}. Download it (see README) or fix the path in the config."
        )


def _corrupt(path: Path, err: BaseException) -> DatasetError:
    return DatasetError(
        f"{path} is truncated or corrupt ({type(err).__name__}: {err}); re-download the archive."
    )


def _safe_relpath(p: str, source: str) -> str:
    """Normalised POSIX relative path; refuses absolute names and '..' (path traversal)."""
    if not p or p.startswith(("/", "\\")) or (len(p) > 1 and p[1] == ":") or "\\" in p:
        raise DatasetError(f"{source}: unsafe or empty image path {p!r}; the file is malformed.")
    parts = [q for q in PurePosixPath(p).parts if q != "."]
    if not parts or ".." in parts:
        raise DatasetError(f"{source}: unsafe image path {p!r} (contains '..'); refusing it.")
    return "/".join(parts)


def _member_name(name: str) -> str:
    # Some tar writers prefix members with './'.
    while name.startswith("./"):
        name = name[2:]
    return name


def split_for_class(class_id: int, n_classes: int) -> str:
    """'train' for the first half of the classes by 1-based id, else 'test' (SPEC section 6)."""
    return "train" if class_id <= n_classes // 2 else "test"


def verify_md5(path: str | os.PathLike, expected: str | None) -> None:
    """Check the md5 of ``path``; no-op when ``expected`` is None."""
    if expected is None:
        return
    path = Path(path)
    _require_file(path, "Archive")
    actual = md5_file(path)
    if actual.lower() != str(expected).strip().lower():
        raise DatasetError(
            f"md5 mismatch for {path}: expected {expected}, actual {actual}. "
            "re-download the archive or remove the md5: entry for your own archive."
        )


def _iter_tar(path: Path, drain: bool = True) -> Iterator[tuple[tarfile.TarInfo, tarfile.TarFile]]:
    """Stream the members of a .tgz once, in archive order.

    gzip.GzipFile (not tarfile's own stream) does the decompression because it raises on a
    truncated stream and checks the CRC; ``drain`` reads to the end of the gzip stream so the
    CRC check runs even though tar stops at its end-of-archive marker. Read a member's bytes with
    ``_read_member`` before advancing.
    """
    _require_file(path, "Archive")
    with open(path, "rb") as raw:
        if raw.read(2) != b"\x1f\x8b":
            raise DatasetError(f"{path} is not a gzip-compressed tar (.tgz); re-download the archive.")
        raw.seek(0)
        gz = gzip.GzipFile(fileobj=raw, mode="rb")
        try:
            tf = tarfile.open(fileobj=gz, mode="r|")
        except _READ_ERRORS as err:
            raise _corrupt(path, err) from err
        with tf:
            it = iter(tf)
            while True:
                try:
                    member = next(it)
                except StopIteration:
                    break
                except _READ_ERRORS as err:
                    raise _corrupt(path, err) from err
                yield member, tf
            if drain:
                try:
                    while gz.read(1 << 20):
                        pass
                except _READ_ERRORS as err:
                    raise _corrupt(path, err) from err


def _read_member(tf: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> bytes:
    try:
        fh = tf.extractfile(member)
        if fh is None:
            raise DatasetError(f"{path}: member {member.name} is not a regular file.")
        data = fh.read()
    except _READ_ERRORS as err:
        raise _corrupt(path, err) from err
    if len(data) != member.size:
        raise _corrupt(path, EOFError(f"short read of {member.name}"))
    return data


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
    counts = Counter((r.label, r.class_name) for r in rows if r.split == "test")
    if not counts:
        raise DatasetError(f"{source}: no test images (classes of the second half are empty).")
    singles = [name for (_, name), n in sorted(counts.items()) if n == 1]
    if singles:
        raise DatasetError(
            f"{source}: test class(es) with only one image, Recall@K is undefined there: "
            f"{', '.join(singles[:10])}{' ...' if len(singles) > 10 else ''}. "
            "Fix the annotations or add images."
        )


# --------------------------------------------------------------------------------------------
# CUB-200-2011


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

    # train_test_split.txt is read by the authors' files.py but its flag is ignored (SPEC S17):
    # the DML protocol splits by class (first half train), so we ignore it too.
    rows = []
    for iid in sorted(images):  # images.txt order is ids ascending
        cid = labels[iid]
        rows.append(ManifestRow(split_for_class(cid, n_classes), cid - 1, classes[cid], images[iid]))
    _check_test_classes(rows, src("image_class_labels.txt"))
    return rows


# --------------------------------------------------------------------------------------------
# CARS196


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


def _list_members(path: Path) -> set[str]:
    return {_member_name(m.name) for m, _ in _iter_tar(path, drain=True) if m.isfile()}


def read_cars_manifest(
    images_archive: str | os.PathLike, annotations_mat: str | os.PathLike
) -> list[ManifestRow]:
    """Manifest of CARS196 (``car_ims.tgz`` + ``cars_annos.mat``) in .mat order."""
    images_archive, annotations_mat = Path(images_archive), Path(annotations_mat)
    _require_file(images_archive, "Image archive")
    anns, class_names = parse_cars_annotations(_load_mat(annotations_mat), str(annotations_mat))
    n_classes = len(class_names)
    # The .mat 'test' flag is ignored like CUB's train_test_split.txt: the protocol is the class
    # split 1..98 / 99..196 (SPEC section 6).
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


# --------------------------------------------------------------------------------------------
# extraction and manifest files


def extract_images(
    archive_path: str | os.PathLike,
    rows: Sequence[ManifestRow],
    dest_root: str | os.PathLike,
    strip_prefix: str = "",
) -> None:
    """Extract exactly the manifest's images so that ``dest_root / row.path`` exists.

    Member names lose ``strip_prefix`` ('CUB_200_2011/' for CUB, '' for Cars). One streaming
    pass; writes into a temp dir beside ``dest_root`` and renames it on success (replacing an
    old ``dest_root``), so a failure leaves nothing half-extracted.
    """
    from tqdm import tqdm

    archive_path, dest_root = Path(archive_path), Path(dest_root)
    _require_file(archive_path, "Archive")
    prefix = strip_prefix.strip("/")
    prefix = prefix + "/" if prefix else ""
    wanted: set[str] = set()
    for r in rows:
        p = _safe_relpath(r.path, "manifest")
        if p in wanted:
            raise DatasetError(f"manifest lists {p} twice")
        wanted.add(p)

    dest_root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest_root.name}.", suffix=".tmp", dir=dest_root.parent))
    try:
        found: set[str] = set()
        made: set[Path] = set()
        with tqdm(total=len(wanted), desc=f"extract {archive_path.name}", unit="img", mininterval=2.0) as bar:
            for member, tf in _iter_tar(archive_path, drain=True):
                name = _member_name(member.name)
                if not name.startswith(prefix):
                    continue
                rel = name[len(prefix):]
                if rel not in wanted:
                    continue  # unknown members (attributes/, parts/, ...) and anything unsafe
                if not member.isfile():
                    raise DatasetError(f"{archive_path}: {member.name} is not a regular file; re-download.")
                data = _read_member(tf, member, archive_path)
                target = tmp / rel
                if target.parent not in made:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    made.add(target.parent)
                target.write_bytes(data)
                if rel not in found:
                    found.add(rel)
                    bar.update()
        missing = sorted(wanted - found)
        if missing:
            raise DatasetError(
                f"{archive_path}: {len(missing)} image(s) of the manifest are not in the archive "
                f"(e.g. {missing[:3]}); re-download the archive."
            )
        if dest_root.is_symlink() or dest_root.is_file():
            dest_root.unlink()
        elif dest_root.exists():
            shutil.rmtree(dest_root)
        os.replace(tmp, dest_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


# --------------------------------------------------------------------------------------------
# top level


def _cfg_path(cfg: Mapping, key: str, fmt: str) -> Path:
    if not cfg.get(key):
        raise DatasetError(f"dataset config (format {fmt}) needs '{key}: <path>'.")
    return Path(cfg[key])


def ingest_dataset(cfg: Mapping, manifest_path: str | os.PathLike, dest_root: str | os.PathLike) -> list[ManifestRow]:
    """Verify md5s, build the manifest, extract its images under ``dest_root``, write the manifest.

    ``cfg``: ``{format: cub, archive, md5?}`` or
    ``{format: cars, images_archive, annotations, md5?: {images_archive?, annotations?}}``.
    The manifest is written last, so it exists only if the extraction completed.
    """
    fmt = cfg.get("format")
    md5 = cfg.get("md5")
    if fmt == "cub":
        archive = _cfg_path(cfg, "archive", fmt)
        if md5 is not None and not isinstance(md5, str):
            raise DatasetError("dataset config (format cub): 'md5' must be a string (the archive's md5).")
        _require_file(archive, "Archive")
        verify_md5(archive, md5)
        rows = read_cub_manifest(archive)
        extract: Callable[[], None] = lambda: extract_images(archive, rows, dest_root, CUB_PREFIX)  # noqa: E731
    elif fmt == "cars":
        images, annos = _cfg_path(cfg, "images_archive", fmt), _cfg_path(cfg, "annotations", fmt)
        md5 = md5 or {}
        if not isinstance(md5, Mapping) or set(md5) - {"images_archive", "annotations"}:
            raise DatasetError(
                "dataset config (format cars): 'md5' must be a mapping with keys images_archive and/or annotations."
            )
        _require_file(images, "Image archive")
        _require_file(annos, "Annotation file")
        verify_md5(images, md5.get("images_archive"))
        verify_md5(annos, md5.get("annotations"))
        rows = read_cars_manifest(images, annos)
        extract = lambda: extract_images(images, rows, dest_root, "")  # noqa: E731
    else:
        raise DatasetError(f"dataset config: unknown format {fmt!r}; use 'cub' or 'cars'.")
    extract()
    try:
        write_manifest(rows, manifest_path)
    except BaseException:
        # The images alone would look like a finished ingest to a later run.
        shutil.rmtree(dest_root, ignore_errors=True)
        raise
    return rows
