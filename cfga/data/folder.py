"""Class folders → manifest rows, read as torchvision's ``ImageFolder`` reads them.

One sub-directory of ``root`` per class; class names sorted by code point; label = index in that
sorted list; a class's images found recursively in its tree (torchvision's order: directories
sorted by path, files sorted by name); image extensions case-insensitive; hidden entries
(``.DS_Store``, ``._*``, ``.git/``...) skipped, files at the top level ignored. Split: the first
⌊n/2⌋ classes train, the rest test (leave-one-out), unless ``split: {train: [..], test: [..]}``
lists class names (classes listed in neither are left out).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from cfga.data.archives import _safe_relpath
from cfga.data.manifest import DatasetError, ManifestRow, check_evaluable

# torchvision.datasets.folder.IMG_EXTENSIONS
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _hidden(name: str) -> bool:
    return name.startswith(".")  # .DS_Store, ._AppleDouble, .git, .ipynb_checkpoints


def _inside(real: Path, real_root: Path) -> bool:
    return real == real_root or real_root in real.parents


def find_classes(root: Path) -> list[str]:
    """Class folder names under ``root``, sorted by code point."""
    if not root.is_dir():
        raise DatasetError(f"Image folder not found: {root}. Fix `root:` in the dataset config.")
    classes = sorted(e.name for e in os.scandir(root) if not _hidden(e.name) and e.is_dir())
    if not classes:
        raise DatasetError(f"{root}: no class folders (one sub-directory per class expected); "
                           "put each class's images in a folder of its own.")
    return classes


def class_images(root: Path, cls: str) -> list[str]:
    """Image paths of class ``cls`` relative to ``root`` (``cls/…``), in torchvision's order.

    Symlinks are followed only while they stay inside ``root``; one leading out is an error.
    """
    real_root = root.resolve()
    top = root / cls
    seen: set[Path] = set()
    found: list[tuple[str, list[str]]] = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        real_dir = Path(dirpath).resolve()
        if not _inside(real_dir, real_root):
            raise DatasetError(f"{dirpath} resolves to {real_dir}, outside the dataset root {real_root} "
                               "(a symlink?); copy the images into the root.")
        if real_dir in seen:
            raise DatasetError(f"{dirpath}: directory {real_dir} is reached twice (a symlink loop?); "
                               "remove the symlink.")
        seen.add(real_dir)
        dirnames[:] = [d for d in dirnames if not _hidden(d)]
        names = []
        for f in filenames:
            if _hidden(f) or not f.lower().endswith(IMG_EXTENSIONS):
                continue
            p = Path(dirpath) / f
            try:
                real = p.resolve(strict=True)
            except (FileNotFoundError, RuntimeError):
                raise DatasetError(f"{p} is a broken symlink; remove it or restore its target.") from None
            if not _inside(real, real_root):
                raise DatasetError(f"{p} resolves to {real}, outside the dataset root {real_root} "
                                   "(a symlink?); copy the file into the root.")
            names.append(f)
        found.append((dirpath, sorted(names)))
    out = []
    for dirpath, names in sorted(found):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        out += [_safe_relpath(f"{rel_dir}/{n}", str(root)) for n in names]
    return out


def _split_of(classes: Sequence[str], override: Mapping | None, root: Path) -> dict[str, str]:
    if override is None:
        half = len(classes) // 2
        return {c: ("train" if i < half else "test") for i, c in enumerate(classes)}
    if not isinstance(override, Mapping) or set(override) - {"train", "test"}:
        raise DatasetError("dataset config (format folder): 'split' must be {train: [class names], test: [class names]}.")
    out: dict[str, str] = {}
    for split in ("train", "test"):
        for c in override.get(split) or []:
            c = str(c)
            if c not in classes:
                raise DatasetError(f"dataset config (format folder): split.{split} names class {c!r}, which is not "
                                   f"a folder of {root}; fix the name.")
            if c in out:
                raise DatasetError(f"dataset config (format folder): class {c!r} is in both split.train and "
                                   "split.test; list it once.")
            out[c] = split
    return out


def read_folder_manifest(root: str | os.PathLike, split: Mapping | None = None) -> list[ManifestRow]:
    """Manifest of the class folders under ``root`` (see the module docstring)."""
    root = Path(root)
    classes = find_classes(root)
    splits = _split_of(classes, split, root)
    rows = []
    empty = []
    for label, cls in enumerate(classes):
        if cls not in splits:
            continue
        paths = class_images(root, cls)
        if not paths:
            empty.append(cls)
        rows += [ManifestRow(splits[cls], label, cls, p) for p in paths]
    if empty:
        raise DatasetError(f"{root}: class folder(s) without images ({', '.join(empty[:10])}); image extensions "
                           f"read: {', '.join(IMG_EXTENSIONS)} (any case). Add images or remove the folders.")
    check_evaluable(rows, str(root), "Add images to those class folders, or move them to the train split "
                                     "(config `split:`).")
    return rows
