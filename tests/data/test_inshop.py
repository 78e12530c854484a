"""In-Shop Clothes Retrieval (img.zip + list_eval_partition.txt) → manifest + extracted images."""
from __future__ import annotations

import zipfile

from cfga.data.formats import ingest_dataset
from cfga.data.inshop import parse_partition
from cfga.data.manifest import evaluation_rows, read_manifest
from cfga.files import md5_file
from tests.data.layouts import expect_fail, inshop_partition, jpeg, write_inshop

TRAIN, TEST = [3, 2], [(1, 2), (2, 1), (1, 0)]  # item 5: a query without a gallery image


def test_inshop_round_trip(tmp_path):
    z, part, paths = write_inshop(tmp_path / "inshop", TRAIN, TEST)
    out = tmp_path / "out"
    cfg = {"format": "inshop", "images_archive": str(z), "partition": str(part),
           "md5": {"images_archive": md5_file(z), "partition": md5_file(part)}}
    rows = ingest_dataset(cfg, out / "m.csv", out / "root")
    assert read_manifest(out / "m.csv") == rows
    assert [r.path for r in rows] == paths
    assert [(r.split, r.label, r.is_query, r.is_gallery) for r in rows] == [
        *[("train", 1, False, False)] * 3, *[("train", 2, False, False)] * 2,
        ("test", 3, True, False), *[("test", 3, False, True)] * 2,
        *[("test", 4, True, False)] * 2, ("test", 4, False, True),
        ("test", 5, True, False)]
    assert rows[0].class_name == "id_00000001"
    assert len(evaluation_rows(rows)) == 7  # every query and gallery image, once
    with zipfile.ZipFile(z) as zf:
        for r in rows:
            assert (out / "root" / r.path).read_bytes() == zf.read(r.path)


def test_inshop_full_scale_counts():
    # 25,882 train images of 3,997 items; 14,218 queries and 12,612 gallery images of 3,985 items
    train = [7] * 1900 + [6] * (3997 - 1900)
    test = [(4, 4)] * 657 + [(4, 3)] * 1606 + [(3, 3)] * (3985 - 657 - 1606)
    assert sum(train) == 25882 and sum(q for q, _ in test) == 14218 and sum(g for _, g in test) == 12612
    text, _ = inshop_partition(train, test)
    assert text.splitlines()[0] == "52712"
    rows = parse_partition(text, "list_eval_partition.txt")
    count = lambda f: sum(1 for r in rows if f(r))  # noqa: E731
    assert count(lambda r: r.split == "train") == 25882
    assert count(lambda r: r.is_query) == 14218 and count(lambda r: r.is_gallery) == 12612
    assert count(lambda r: r.is_query and r.is_gallery) == 0
    assert len({r.label for r in rows if r.split == "test"}) == 3985
    assert {r.label for r in rows if r.is_query} == {r.label for r in rows if r.is_gallery}


def test_inshop_bad_inputs(tmp_path):
    z, part, paths = write_inshop(tmp_path / "inshop", TRAIN, TEST)
    cfg = lambda z, p: {"format": "inshop", "images_archive": str(z), "partition": str(p)}  # noqa: E731
    lines = part.read_text().splitlines()

    def edited(name, new_lines):
        p = tmp_path / name
        p.write_text("\n".join(new_lines) + "\n")
        return p

    p = edited("status.txt", lines[:4] + [lines[4].replace("train", "validation")] + lines[5:])
    expect_fail(cfg(z, p), tmp_path, f"{p} line 5", "unknown evaluation_status 'validation'", "train, query, gallery")
    p = edited("count.txt", ["99"] + lines[1:])
    expect_fail(cfg(z, p), tmp_path, f"{p} line 1", "says 99 images", "lists 12")
    p = edited("header.txt", [lines[0], "image item status"] + lines[2:])
    expect_fail(cfg(z, p), tmp_path, f"{p} line 2", "header")
    p = edited("slip.txt", lines[:3] + [lines[3].replace("img/", "img/../../", 1)] + lines[4:])
    expect_fail(cfg(z, p), tmp_path, f"{p} line 4", "..")
    p = edited("abs.txt", lines[:3] + ["/" + lines[3]] + lines[4:])
    expect_fail(cfg(z, p), tmp_path, f"{p} line 4", "unsafe")
    p = edited("item.txt", lines[:6] + [lines[6].replace("id_00000002", "item2")] + lines[7:])
    expect_fail(cfg(z, p), tmp_path, f"{p} line 7", "item2")
    # truncated zip, image missing from the zip, image that no longer decodes
    (tmp_path / "cut.zip").write_bytes(z.read_bytes()[:-40])
    expect_fail(cfg(tmp_path / "cut.zip", part), tmp_path, str(tmp_path / "cut.zip"), "truncated or corrupt")
    with zipfile.ZipFile(z) as zin, zipfile.ZipFile(tmp_path / "miss.zip", "w") as zout, \
            zipfile.ZipFile(tmp_path / "bad.zip", "w") as zbad:
        for i in zin.infolist():
            if i.filename != paths[6]:
                zout.writestr(i.filename, zin.read(i))
            zbad.writestr(i.filename, b"not a jpeg" if i.filename == paths[6] else zin.read(i))
    expect_fail(cfg(tmp_path / "miss.zip", part), tmp_path, "miss.zip", "not in the archive", paths[6])
    expect_fail(cfg(tmp_path / "bad.zip", part), tmp_path, f"bad.zip:{paths[6]}", "not a readable image")
    expect_fail(cfg(z, tmp_path / "nope.txt"), tmp_path, "nope.txt", "not found")
    expect_fail(dict(cfg(z, part), md5={"partition": "0" * 32}), tmp_path, "md5 mismatch", str(part))
    expect_fail(dict(cfg(z, part), md5={"archive": "0" * 32}), tmp_path, "images_archive and/or partition")
    # no gallery image at all
    z2, p2, _ = write_inshop(tmp_path / "nogal", [2], [(2, 0)])
    expect_fail(cfg(z2, p2), tmp_path, str(p2), "no test image is a gallery item")
    assert jpeg()  # the layouts module's images are real JPEGs


def test_inshop_unpacked_folder_and_encrypted_zip(tmp_path):
    z, part, _ = write_inshop(tmp_path / "inshop", TRAIN, TEST)
    ref = ingest_dataset({"format": "inshop", "images_archive": str(z), "partition": str(part)},
                         tmp_path / "a.csv", tmp_path / "ra")
    with zipfile.ZipFile(z) as zf:
        zf.extractall(tmp_path / "unpacked")
    out = tmp_path / "b"
    cfg = {"format": "inshop", "images_archive": str(tmp_path / "unpacked"), "partition": str(part)}
    assert ingest_dataset(cfg, out / "m.csv", out / "root") == ref
    assert (out / "m.csv").read_bytes() == (tmp_path / "a.csv").read_bytes()
    expect_fail(dict(cfg, images_archive=str(tmp_path / "unpacked" / "img")), tmp_path, "no img/ folder")
    # a password-protected zip: flag bit 0 set in the local and central headers of its images
    enc = tmp_path / "enc.zip"
    with zipfile.ZipFile(z) as zin, zipfile.ZipFile(enc, "w") as zout:
        for i in zin.infolist():
            data = zin.read(i)
            i2 = zipfile.ZipInfo(i.filename)
            zout.writestr(i2, data)
    with zipfile.ZipFile(enc) as zf:  # set the flag in both headers of every image member
        infos = [i for i in zf.infolist() if i.filename.endswith(".jpg")]
    raw = bytearray(enc.read_bytes())
    for i in infos:
        raw[i.header_offset + 6] |= 1
    pos = raw.find(b"PK\x01\x02")
    while pos != -1:
        raw[pos + 8] |= 1
        pos = raw.find(b"PK\x01\x02", pos + 4)
    enc.write_bytes(bytes(raw))
    expect_fail(dict(cfg, images_archive=str(enc)), tmp_path, "encrypted", "unpacked folder")
