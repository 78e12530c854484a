"""Stanford Online Products (zip or extracted folder) → manifest + extracted images."""
from __future__ import annotations

import stat
import zipfile

from cfga.data.formats import ingest_dataset
from cfga.data.manifest import read_manifest
from cfga.data.sop import read_sop
from cfga.files import md5_file
from tests.data.layouts import expect_fail, jpeg, sop_lists, write_sop_zip

TRAIN, TEST = [2, 3, 2], [2, 2, 3]


def test_sop_zip_round_trip(tmp_path):
    z = write_sop_zip(tmp_path / "Stanford_Online_Products.zip", TRAIN, TEST)
    out = tmp_path / "out"
    rows = ingest_dataset({"format": "sop", "archive": str(z), "md5": md5_file(z)}, out / "m.csv", out / "root")
    assert read_manifest(out / "m.csv") == rows
    _, _, paths = sop_lists(TRAIN, TEST)
    assert [r.path for r in rows] == paths  # Ebay_train.txt then Ebay_test.txt order, folder prefix stripped
    assert [r.label for r in rows] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 5]  # class_id - 1
    assert [r.split for r in rows] == ["train"] * 7 + ["test"] * 7
    assert all(r.is_query == r.is_gallery == (r.split == "test") for r in rows)
    with zipfile.ZipFile(z) as zf:
        for r in rows:
            assert (out / "root" / r.path).read_bytes() == zf.read("Stanford_Online_Products/" + r.path)
    assert sorted(p.name for p in (out / "root").iterdir()) == sorted({p.split("/")[0] for p in paths})


def test_sop_extracted_folder_gives_the_same_manifest(tmp_path):
    z = write_sop_zip(tmp_path / "Stanford_Online_Products.zip", TRAIN, TEST)
    with zipfile.ZipFile(z) as zf:
        zf.extractall(tmp_path / "unpacked")
    ref = ingest_dataset({"format": "sop", "archive": str(z)}, tmp_path / "a.csv", tmp_path / "ra")
    for folder in (tmp_path / "unpacked", tmp_path / "unpacked" / "Stanford_Online_Products"):
        out = tmp_path / folder.name
        assert ingest_dataset({"format": "sop", "archive": str(folder)}, out / "m.csv", out / "root") == ref
        assert (out / "m.csv").read_bytes() == (tmp_path / "a.csv").read_bytes()
        assert all((out / "root" / r.path).is_file() for r in ref)


def test_sop_full_scale_counts(tmp_path):
    # 11,318 train classes / 59,551 images; 11,316 test classes / 60,502 images (as published)
    train = [6] * 2961 + [5] * (11318 - 2961)
    test = [6] * 3922 + [5] * (11316 - 3922)
    assert (sum(train), sum(test)) == (59551, 60502)
    z = write_sop_zip(tmp_path / "Stanford_Online_Products.zip", train, test, images=False)
    rows, _ = read_sop(z)
    tr = [r for r in rows if r.split == "train"]
    te = [r for r in rows if r.split == "test"]
    assert (len(tr), len(te)) == (59551, 60502)
    assert {r.label for r in tr} == set(range(11318)) and {r.label for r in te} == set(range(11318, 22634))
    assert all(r.is_query and r.is_gallery for r in te) and not any(r.is_query or r.is_gallery for r in tr)


def test_sop_hostile_members_are_never_written(tmp_path):
    z = write_sop_zip(tmp_path / "Stanford_Online_Products.zip", TRAIN, TEST, extra={
        "Stanford_Online_Products/../../evil.JPG": jpeg(), "/abs/evil.JPG": jpeg(),
        "Stanford_Online_Products/bicycle_final/../../../evil2.JPG": jpeg()})
    out = tmp_path / "out"
    rows = ingest_dataset({"format": "sop", "archive": str(z)}, out / "m.csv", out / "root")
    assert len(rows) == 14
    assert not list(tmp_path.rglob("evil*.JPG"))


def test_sop_bad_inputs(tmp_path):
    good = write_sop_zip(tmp_path / "good.zip", TRAIN, TEST)
    cfg = lambda z: {"format": "sop", "archive": str(z)}  # noqa: E731
    # a listed path escaping the root (zip-slip through the list file)
    train, test, _ = sop_lists(TRAIN, TEST)
    bad = test.replace("fan_final/", "../../fan_final/", 1)
    z = write_sop_zip(tmp_path / "a.zip", TRAIN, TEST, edits={"Ebay_test.txt": bad.encode()})
    expect_fail(cfg(z), tmp_path, "Ebay_test.txt line 2", "..")
    z = write_sop_zip(tmp_path / "b.zip", TRAIN, TEST, edits={"Ebay_test.txt": test.replace(" 1 ", " 1 ", 1).replace(
        "image_id class_id super_class_id path", "id class path").encode()})
    expect_fail(cfg(z), tmp_path, "Ebay_test.txt line 1", "header")
    # truncated zip (cut in the middle: no central directory)
    data = good.read_bytes()
    (tmp_path / "c.zip").write_bytes(data[: len(data) // 2])
    expect_fail(cfg(tmp_path / "c.zip"), tmp_path, str(tmp_path / "c.zip"), "truncated or corrupt", "re-download")
    # a damaged image member (CRC no longer matches)
    with zipfile.ZipFile(good) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("_1.JPG"))
        off = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw = bytearray(data)
    raw[off + info.compress_size // 2] ^= 0xFF
    (tmp_path / "d.zip").write_bytes(bytes(raw))
    expect_fail(cfg(tmp_path / "d.zip"), tmp_path, str(tmp_path / "d.zip"), "truncated or corrupt")
    # an image missing from the zip
    _, _, paths = sop_lists(TRAIN, TEST)
    z = write_sop_zip(tmp_path / "e.zip", TRAIN, TEST, edits={paths[-1]: None})
    expect_fail(cfg(z), tmp_path, str(z), "not in the archive", paths[-1])
    # an image that no longer decodes
    z = write_sop_zip(tmp_path / "f.zip", TRAIN, TEST, edits={paths[8]: b"garbage"})
    expect_fail(cfg(z), tmp_path, f"{z}:Stanford_Online_Products/{paths[8]}", "not a readable image")
    # a listed member that is a symlink
    z = tmp_path / "g.zip"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(z, "w") as zout:
        for i in zin.infolist():
            if i.filename.endswith(paths[9]):
                i.external_attr = (stat.S_IFLNK | 0o777) << 16
                zout.writestr(i, b"/etc/passwd")
            else:
                zout.writestr(i, zin.read(i))
    expect_fail(cfg(z), tmp_path, str(z), paths[9], "not a regular file")
    # a test class with one image (leave-one-out)
    z = write_sop_zip(tmp_path / "h.zip", TRAIN, [2, 1, 3])
    expect_fail(cfg(z), tmp_path, "Ebay_test.txt", "only one image", "5")
    # not SOP at all, md5 mismatch, md5 on a folder
    with zipfile.ZipFile(tmp_path / "i.zip", "w") as zf:
        zf.writestr("x.txt", "x")
    expect_fail(cfg(tmp_path / "i.zip"), tmp_path, "no Ebay_train.txt")
    expect_fail(dict(cfg(good), md5="0" * 32), tmp_path, "md5 mismatch", str(good))
    (tmp_path / "dir").mkdir()
    expect_fail(cfg(tmp_path / "dir"), tmp_path, "no Ebay_train.txt")
    expect_fail(cfg(tmp_path / "absent.zip"), tmp_path, "absent.zip", "not found")
