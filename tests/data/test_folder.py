"""Class folders (torchvision ImageFolder layout) → manifest + copied images."""
from __future__ import annotations

import os

import pytest

from cfga.data.formats import ingest_dataset
from cfga.data.manifest import read_manifest
from tests.data.layouts import expect_fail, jpeg, write_folder


def test_folder_reads_like_imagefolder_and_splits_by_class_half(tmp_path):
    # Code-point order: upper case before lower case, 'Ä' after 'z'.
    root = write_folder(tmp_path / "src", {
        "b_dogs": ["x1.jpg", "x2.JPG"],
        "Zebra": ["b.png", "a.jpeg", "sub/deeper/c.Jpg", "sub/a.webp"],
        "apple": ["1.jpg", "2.jpg", "3.bmp"],
        "Ärger": ["p.jpg", "q.tif", "r.jpg"],
    })
    (root / "readme.jpg").write_bytes(jpeg(1))  # top level: ignored
    (root / "apple" / "notes.txt").write_text("not an image")
    (root / "apple" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "apple" / "._1.jpg").write_bytes(b"\0\5\26\7")  # AppleDouble: skipped though it ends in .jpg
    (root / ".hidden_class").mkdir()
    (root / ".hidden_class" / "h.jpg").write_bytes(jpeg(2))
    (root / "Zebra" / ".thumbs").mkdir()
    (root / "Zebra" / ".thumbs" / "t.jpg").write_bytes(jpeg(3))

    out = tmp_path / "out"
    rows = ingest_dataset({"format": "folder", "root": str(root)}, out / "m.csv", out / "root")
    assert read_manifest(out / "m.csv") == rows
    classes = ["Zebra", "apple", "b_dogs", "Ärger"]
    assert [r.class_name for r in rows] == [c for c in classes for _ in range({"Zebra": 4, "apple": 3, "b_dogs": 2,
                                                                               "Ärger": 3}[c])]
    assert {r.class_name: r.label for r in rows} == {c: i for i, c in enumerate(classes)}
    assert {r.class_name: r.split for r in rows} == {"Zebra": "train", "apple": "train", "b_dogs": "test", "Ärger": "test"}
    # torchvision's order: directories sorted by path, files sorted by name inside each
    assert [r.path for r in rows if r.class_name == "Zebra"] == [
        "Zebra/a.jpeg", "Zebra/b.png", "Zebra/sub/a.webp", "Zebra/sub/deeper/c.Jpg"]
    assert all((r.is_query, r.is_gallery) == ((r.split == "test"),) * 2 for r in rows)
    for r in rows:
        assert (out / "root" / r.path).read_bytes() == (root / r.path).read_bytes()
    assert not (out / "root" / "readme.jpg").exists() and not (out / "root" / ".hidden_class").exists()


def test_folder_matches_torchvision_imagefolder(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    root = write_folder(tmp_path / "src", {
        "c": ["z.jpg", "a/b.png", "a.jpg"], "B": ["k.PNG", "j.jpg"], "a b": ["x.jpg", "y.jpeg"], "d": ["1.jpg", "2.jpg"],
    })
    rows = ingest_dataset({"format": "folder", "root": str(root)}, tmp_path / "m.csv", tmp_path / "root")
    ref = torchvision.datasets.ImageFolder(str(root))
    assert [(os.path.relpath(p, root), y) for p, y in ref.samples] == [(r.path, r.label) for r in rows]
    assert ref.classes == sorted({r.class_name for r in rows})


def test_folder_split_override(tmp_path):
    root = write_folder(tmp_path / "src", {c: ["1.jpg", "2.jpg"] for c in ("a", "b", "c", "d", "e")})
    cfg = {"format": "folder", "root": str(root), "split": {"train": ["e", "a"], "test": ["b", "d"]}}
    rows = ingest_dataset(cfg, tmp_path / "m.csv", tmp_path / "root")
    assert {r.class_name: (r.split, r.label) for r in rows} == {
        "a": ("train", 0), "b": ("test", 1), "d": ("test", 3), "e": ("train", 4)}  # c: listed nowhere, left out
    expect_fail(dict(cfg, split={"train": ["a"], "test": ["zz"]}), tmp_path, "zz", "not a folder")
    expect_fail(dict(cfg, split={"train": ["a"], "test": ["a", "b"]}), tmp_path, "'a'", "both")


def test_folder_single_image_test_class_is_refused(tmp_path):
    root = write_folder(tmp_path / "src", {"a": ["1.jpg"], "b": ["1.jpg", "2.jpg"], "c": ["1.jpg"], "d": ["1.jpg", "2.jpg"]})
    # train class a with one image is fine
    expect_fail({"format": "folder", "root": str(root)}, tmp_path, str(root), "only one image, Recall@K is undefined there: c.")


def test_folder_symlink_out_of_root_is_refused(tmp_path):
    root = write_folder(tmp_path / "src", {c: ["1.jpg", "2.jpg"] for c in "abcd"})
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(jpeg(9))
    (root / "c" / "3.jpg").symlink_to(outside / "secret.jpg")
    expect_fail({"format": "folder", "root": str(root)}, tmp_path, str(root / "c" / "3.jpg"), "outside the dataset root")
    (root / "c" / "3.jpg").unlink()
    (root / "d" / "more").symlink_to(outside, target_is_directory=True)
    expect_fail({"format": "folder", "root": str(root)}, tmp_path, str(root / "d" / "more"), "outside the dataset root")
    (root / "d" / "more").unlink()
    (root / "d" / "inside.jpg").symlink_to(root / "a" / "1.jpg")  # a link that stays inside is followed
    rows = ingest_dataset({"format": "folder", "root": str(root)}, tmp_path / "m.csv", tmp_path / "root")
    assert "d/inside.jpg" in [r.path for r in rows]


def test_folder_bad_inputs(tmp_path):
    expect_fail({"format": "folder", "root": str(tmp_path / "nope")}, tmp_path, "nope", "root")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.jpg").write_bytes(jpeg())
    expect_fail({"format": "folder", "root": str(empty)}, tmp_path, str(empty), "no class folders")
    root = write_folder(tmp_path / "src", {c: ["1.jpg", "2.jpg"] for c in "abcd"})
    (root / "e").mkdir()
    (root / "e" / "notes.txt").write_text("x")
    expect_fail({"format": "folder", "root": str(root)}, tmp_path, str(root), "without images", "e")
    (root / "e" / "notes.txt").unlink()
    (root / "e").rmdir()
    (root / "d" / "2.jpg").write_bytes(b"this is not a JPEG")
    expect_fail({"format": "folder", "root": str(root)}, tmp_path, str(root / "d" / "2.jpg"), "not a readable image",
                "replace the file")
    expect_fail({"format": "folder", "root": str(root), "md5": "0" * 32}, tmp_path, "md5")
