"""Datasets written in the layouts they are published in, for the format tests: class folders,
an open-metric-learning CSV table, Stanford_Online_Products.zip, In-Shop's img.zip +
list_eval_partition.txt. Images are tiny real JPEGs (distinct per image unless ``same``)."""
from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path
from typing import Sequence

import pytest
from PIL import Image

from cfga.data.archives import DatasetError
from cfga.data.formats import ingest_dataset


def jpeg(seed: int = 0, size: tuple[int, int] = (12, 9)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (seed * 37 % 256, seed * 91 % 256, seed * 13 % 256)).save(buf, format="JPEG")
    return buf.getvalue()


def write_folder(root: Path, classes: dict[str, Sequence[str]]) -> Path:
    """``root/<class>/<relative file>`` for each class; every file a JPEG."""
    for k, (cls, files) in enumerate(classes.items()):
        for i, f in enumerate(files):
            p = root / cls / f
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(jpeg(k * 100 + i))
    return root


def write_csv_table(path: Path, header: Sequence[str], rows: Sequence[Sequence]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def _zip_dirs(zf: zipfile.ZipFile, names: Sequence[str], done: set[str]) -> None:
    """Directory entries before their files, as `zip -r` writes them."""
    for name in names:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i]) + "/"
            if d not in done:
                done.add(d)
                zf.writestr(zipfile.ZipInfo(d), b"")


# Stanford Online Products: 12 super-classes, folder names as published.
SOP_SUPER = ["bicycle", "cabinet", "chair", "coffee_maker", "fan", "kettle", "lamp", "mug", "sofa", "stapler",
             "table", "toaster"]


def sop_lists(train_counts: Sequence[int], test_counts: Sequence[int]) -> tuple[str, str, list[str]]:
    """(Ebay_train.txt, Ebay_test.txt, image paths) for classes with these image counts
    (class ids 1.. train then test, as published; image ids run on across both files)."""
    texts, paths, iid, cid = [], [], 0, 0
    for counts in (train_counts, test_counts):
        lines = ["image_id class_id super_class_id path"]
        for n in counts:
            cid += 1
            sup = cid % len(SOP_SUPER)
            product = 111085122871 + cid * 7
            for k in range(n):
                iid += 1
                p = f"{SOP_SUPER[sup]}_final/{product}_{k}.JPG"
                paths.append(p)
                lines.append(f"{iid} {cid} {sup + 1} {p}")
        texts.append("\n".join(lines) + "\n")
    return texts[0], texts[1], paths


def write_sop_zip(path: Path, train_counts: Sequence[int], test_counts: Sequence[int], *, images: bool = True,
                  edits: dict[str, bytes | None] | None = None, extra: dict[str, bytes] | None = None) -> Path:
    """``Stanford_Online_Products.zip``: ``Stanford_Online_Products/`` with Ebay_{train,test,info}.txt
    and ``<super>_final/<product>_<k>.JPG``. ``edits``: member (without the folder) → bytes or
    None (left out); ``extra``: full member names added as they are (hostile names included)."""
    train, test, paths = sop_lists(train_counts, test_counts)
    members = {"Ebay_train.txt": train.encode(), "Ebay_test.txt": test.encode(),
               "Ebay_info.txt": b"image_id class_id super_class_id path\n"}
    if images:
        members.update({p: jpeg(i) for i, p in enumerate(paths)})
    members.update(edits or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        done: set[str] = set()
        for name, data in members.items():
            if data is None:
                continue
            full = f"Stanford_Online_Products/{name}"
            _zip_dirs(zf, [full], done)
            zf.writestr(full, data)
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return path


def inshop_partition(train_items: Sequence[int], test_items: Sequence[tuple[int, int]],
                     first_item: int = 1) -> tuple[str, list[str]]:
    """(list_eval_partition.txt, image paths): train items with these image counts, then test
    items with (query, gallery) counts; item ids run on from ``first_item``, as published."""
    cats = ["WOMEN/Dresses", "MEN/Denim", "WOMEN/Blouses_Shirts", "MEN/Jackets_Vests"]
    rows, item = [], first_item
    for n in train_items:
        rows += [(item, "train", k) for k in range(n)]
        item += 1
    for q, g in test_items:
        rows += [(item, "query", k) for k in range(q)] + [(item, "gallery", q + k) for k in range(g)]
        item += 1
    lines = [str(len(rows)), "image_name item_id evaluation_status"]
    paths = []
    for item, status, k in rows:
        p = f"img/{cats[item % len(cats)]}/id_{item:08d}/{k + 1:02d}_{k % 4 + 1}_{('front', 'side', 'back', 'full')[k % 4]}.jpg"
        paths.append(p)
        lines.append(f"{p}{' ' * (60 - len(p))}id_{item:08d}     {status}")  # column-aligned as published
    return "\n".join(lines) + "\n", paths


def write_inshop(dirpath: Path, train_items: Sequence[int], test_items: Sequence[tuple[int, int]], *,
                 images: bool = True) -> tuple[Path, Path, list[str]]:
    """``Img/img.zip`` (members ``img/...``) and ``Eval/list_eval_partition.txt``."""
    text, paths = inshop_partition(train_items, test_items)
    part = dirpath / "Eval" / "list_eval_partition.txt"
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_text(text)
    z = dirpath / "Img" / "img.zip"
    z.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        done: set[str] = set()
        for i, p in enumerate(paths if images else []):
            _zip_dirs(zf, [p], done)
            zf.writestr(p, jpeg(i))
    return z, part, paths


def expect_fail(cfg: dict, tmp_path: Path, *must_contain: str) -> str:
    """Ingest ``cfg``: it must raise DatasetError containing every string, leaving no manifest,
    no extracted images, no temp folder."""
    out = tmp_path / "out"
    with pytest.raises(DatasetError) as ei:
        ingest_dataset(cfg, out / "manifest.csv", out / "root")
    msg = str(ei.value)
    for s in must_contain:
        assert str(s) in msg, msg
    assert not out.exists() or list(out.iterdir()) == [], list(out.iterdir())
    return msg
