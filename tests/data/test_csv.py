"""A CSV table (open-metric-learning's layout) → manifest + copied images."""
from __future__ import annotations

from cfga.data.formats import ingest_dataset
from cfga.data.manifest import read_manifest
from tests.data.layouts import expect_fail, jpeg, write_csv_table, write_folder


def _images(root, n=8):
    return write_folder(root, {"items": [f"{i}.jpg" for i in range(n)]})


def test_csv_with_query_gallery_columns(tmp_path):
    root = _images(tmp_path / "data")
    # OML writes pandas booleans; extra columns (category, x_1 …) are ignored
    table = write_csv_table(tmp_path / "df.csv", ["label", "path", "split", "is_query", "is_gallery", "category"], [
        [3, "items/0.jpg", "train", "", "", "shoes"],
        [3, "items/1.jpg", "train", "", "", "shoes"],
        [7, "items/2.jpg", "validation", "True", "False", "bags"],
        [7, "items/3.jpg", "validation", "False", "True", "bags"],
        [9, "items/4.jpg", "test", "1", "1", "bags"],
        [9, "items/5.jpg", "test", "true", "TRUE", "bags"],
        [11, "items/6.jpg", "validation", "False", "False", "bags"],  # neither role: not extracted
    ])
    out = tmp_path / "out"
    rows = ingest_dataset({"format": "csv", "table": str(table), "root": str(root)}, out / "m.csv", out / "root")
    assert read_manifest(out / "m.csv") == rows
    assert [(r.split, r.label, r.path, r.is_query, r.is_gallery) for r in rows] == [
        ("train", 3, "items/0.jpg", False, False), ("train", 3, "items/1.jpg", False, False),
        ("test", 7, "items/2.jpg", True, False), ("test", 7, "items/3.jpg", False, True),
        ("test", 9, "items/4.jpg", True, True), ("test", 9, "items/5.jpg", True, True),
        ("test", 11, "items/6.jpg", False, False)]
    assert sorted(p.name for p in (out / "root" / "items").iterdir()) == [f"{i}.jpg" for i in range(7)]


def test_csv_without_role_columns_is_leave_one_out(tmp_path):
    root = _images(tmp_path / "data")
    table = write_csv_table(tmp_path / "t.csv", ["path", "split", "label"], [
        ["items/0.jpg", "train", 0], ["items/1.jpg", "test", 1], ["items/2.jpg", "test", 1]])
    rows = ingest_dataset({"format": "csv", "table": str(table), "root": str(root)}, tmp_path / "m.csv", tmp_path / "r")
    assert [(r.split, r.is_query, r.is_gallery) for r in rows] == [("train", False, False), ("test", True, True),
                                                                  ("test", True, True)]


def test_csv_bad_inputs(tmp_path):
    root = _images(tmp_path / "data")
    cfg = lambda t: {"format": "csv", "table": str(t), "root": str(root)}  # noqa: E731
    t = write_csv_table(tmp_path / "a.csv", ["label", "path"], [[0, "items/0.jpg"]])
    expect_fail(cfg(t), tmp_path, str(t), "line 1", "missing column(s) split")
    t = write_csv_table(tmp_path / "b.csv", ["label", "path", "split", "is_query"], [[0, "items/0.jpg", "test", 1]])
    expect_fail(cfg(t), tmp_path, str(t), "is_query but not is_gallery")
    t = write_csv_table(tmp_path / "c.csv", ["label", "path", "split"],
                        [[0, "items/0.jpg", "test"], [0, "items/nope.jpg", "test"]])
    expect_fail(cfg(t), tmp_path, f"{t} line 3", "nope.jpg", "does not exist")
    t = write_csv_table(tmp_path / "d.csv", ["label", "path", "split"], [[0, "../data/items/0.jpg", "test"]])
    expect_fail(cfg(t), tmp_path, f"{t} line 2", "..")
    t = write_csv_table(tmp_path / "e.csv", ["label", "path", "split"], [[0, str(root / "items/0.jpg"), "test"]])
    expect_fail(cfg(t), tmp_path, f"{t} line 2", "unsafe")
    (tmp_path / "outside.jpg").write_bytes(jpeg())
    (root / "items" / "link.jpg").symlink_to(tmp_path / "outside.jpg")
    t = write_csv_table(tmp_path / "f.csv", ["label", "path", "split"], [[0, "items/link.jpg", "test"]])
    expect_fail(cfg(t), tmp_path, f"{t} line 2", "outside the dataset root")
    t = write_csv_table(tmp_path / "g.csv", ["label", "path", "split"], [[0, "items/0.jpg", "valid"]])
    expect_fail(cfg(t), tmp_path, f"{t} line 2", "'valid'", "train, validation or test")
    t = write_csv_table(tmp_path / "h.csv", ["label", "path", "split", "is_query", "is_gallery"],
                        [[0, "items/0.jpg", "test", "maybe", "True"]])
    expect_fail(cfg(t), tmp_path, f"{t} line 2", "is_query is 'maybe'")
    t = write_csv_table(tmp_path / "i.csv", ["label", "path", "split"], [[0, "items/0.jpg", "test"], [1, "items/1.jpg", "test"],
                                                                          [1, "items/2.jpg", "test"]])
    expect_fail(cfg(t), tmp_path, str(t), "only one image", "0")  # leave-one-out class 0 has one image
    t = write_csv_table(tmp_path / "j.csv", ["label", "path", "split"], [["cat", "items/0.jpg", "test"]])
    expect_fail(cfg(t), tmp_path, f"{t} line 2", "not an integer")
    t = write_csv_table(tmp_path / "k.csv", ["label", "path", "split", "is_query", "is_gallery"],
                        [[0, "items/0.jpg", "test", "True", "False"], [0, "items/1.jpg", "test", "True", "False"]])
    expect_fail(cfg(t), tmp_path, str(t), "no test image is a gallery item")
    (root / "items" / "7.jpg").write_bytes(b"\xff\xd8 cut")  # no longer decodes
    t = write_csv_table(tmp_path / "l.csv", ["label", "path", "split"], [[0, "items/7.jpg", "test"], [0, "items/1.jpg", "test"]])
    expect_fail(cfg(t), tmp_path, str(root / "items" / "7.jpg"), "not a readable image")
    expect_fail({"format": "csv", "table": str(tmp_path / "missing.csv"), "root": str(root)}, tmp_path, "missing.csv")


def test_csv_md5_is_for_the_table_only(tmp_path):
    from cfga.files import md5_file

    root = _images(tmp_path / "data")
    t = write_csv_table(tmp_path / "t.csv", ["label", "path", "split"], [["0", "items/0.jpg", "test"],
                                                                          ["0", "items/1.jpg", "test"]])
    cfg = {"format": "csv", "table": str(t), "root": str(root)}
    assert len(ingest_dataset(dict(cfg, md5={"table": md5_file(t)}), tmp_path / "m.csv", tmp_path / "r")) == 2
    expect_fail(dict(cfg, md5={"root": "0" * 32}), tmp_path, "md5", "table")
    expect_fail(dict(cfg, md5={"table": "0" * 32}), tmp_path, "md5 mismatch", str(t))
