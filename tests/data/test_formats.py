"""Raw archives -> manifest + extracted images: round trips, real-size splits, every bad input."""
from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from cfga.data import synthetic
from PIL import Image

from cfga.data.archives import extract_images
from cfga.data.formats import (
    CUB_PREFIX,
    ingest_dataset,
    read_cars_manifest,
    read_cub_manifest,
    split_for_class,
)
from cfga.data.manifest import read_manifest
from cfga.files import md5_file
from tests.data.layouts import expect_fail
from tests.helpers import SYNTHETIC_CLASSES as C
from tests.helpers import SYNTHETIC_IMAGES_PER_CLASS as N
from tests.helpers import assert_nothing_left as _assert_nothing_left


def _tiny_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 120, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def _const_factory():
    data = _tiny_jpeg()
    return lambda ci, k, i: (data, (1.0, 1.0, 6.0, 6.0))


# --------------------------------------------------------------------------------------------
# round trips


def test_cub_round_trip(cub_cfg, tmp_path):
    out = tmp_path / "out"
    rows = ingest_dataset(cub_cfg, out / "manifest.csv", out / "CUB_200_2011")
    assert rows == read_manifest(out / "manifest.csv")
    assert len(rows) == C * N
    names = synthetic.cub_class_names(synthetic.class_params(C, 5))
    assert [r.label for r in rows] == [c for c in range(C) for _ in range(N)]
    assert [r.class_name for r in rows] == [names[r.label] for r in rows]
    assert [r.split for r in rows] == ["train"] * (C // 2 * N) + ["test"] * ((C - C // 2) * N)
    # rows in archive (images.txt) order; path relative to CUB_200_2011/
    with tarfile.open(cub_cfg["archive"], "r:gz") as tf:
        imgs = [n for n in tf.getnames() if n.endswith(".jpg")]
        images_txt = tf.extractfile("CUB_200_2011/images.txt").read().decode().split()
    assert [r.path for r in rows] == [n[len("CUB_200_2011/"):] for n in imgs]
    assert [r.path for r in rows] == ["images/" + p for p in images_txt[1::2]]
    for r in rows:
        assert (out / "CUB_200_2011" / r.path).is_file()
        assert r.path.split("/")[1] == r.class_name
    # exactly the manifest's images, nothing else
    assert sum(1 for p in (out / "CUB_200_2011").rglob("*") if p.is_file()) == len(rows)
    Image.open(out / "CUB_200_2011" / rows[0].path).verify()


def test_cars_round_trip(cars_cfg, tmp_path):
    out = tmp_path / "out"
    rows = ingest_dataset(cars_cfg, out / "manifest.csv", out / "cars")
    assert rows == read_manifest(out / "manifest.csv")
    names = synthetic.cars_class_names(synthetic.class_params(C, 5))
    assert [r.path for r in rows] == [f"car_ims/{i:06d}.jpg" for i in range(1, C * N + 1)]
    assert [r.label for r in rows] == [c for c in range(C) for _ in range(N)]
    assert [r.class_name for r in rows] == [names[r.label] for r in rows]
    assert [r.split for r in rows] == ["train"] * (C // 2 * N) + ["test"] * ((C - C // 2) * N)
    assert all((out / "cars" / r.path).is_file() for r in rows)


def test_ingest_with_md5_and_rerun_replaces(cub_cfg, cars_cfg, tmp_path):
    cfg = dict(cub_cfg, md5=md5_file(cub_cfg["archive"]))
    out = tmp_path / "out"
    (out / "root").mkdir(parents=True)
    (out / "root" / "stale.txt").write_text("old")
    ingest_dataset(cfg, out / "m.csv", out / "root")
    assert not (out / "root" / "stale.txt").exists()
    assert sorted(p.name for p in out.iterdir()) == ["m.csv", "root"]  # no temp dirs left
    ccfg = dict(cars_cfg, md5={"images_archive": md5_file(cars_cfg["images_archive"]),
                               "annotations": md5_file(cars_cfg["annotations"])})
    assert len(ingest_dataset(ccfg, out / "c.csv", out / "cars")) == C * N


def test_split_rule():
    assert split_for_class(100, 200) == "train" and split_for_class(101, 200) == "test"
    assert split_for_class(98, 196) == "train" and split_for_class(99, 196) == "test"


# --------------------------------------------------------------------------------------------
# real sizes (metadata-realistic archives with tiny identical JPEG members)


def _counts(n_small, small, n_big, big):
    return [small] * n_small + [big] * n_big


@pytest.mark.slow
def test_full_scale_cub(tmp_path, monkeypatch):
    # 64x59 + 36x58 = 5864 (classes 1-100), 76x59 + 24x60 = 5924 (classes 101-200)
    counts = _counts(64, 59, 36, 58) + _counts(76, 59, 24, 60)
    assert sum(counts[:100]) == 5864 and sum(counts) == 11788
    names = [f"{i:03d}.Species_{i:03d}" for i in range(1, 201)]
    arc = tmp_path / "CUB_200_2011.tgz"
    synthetic.write_cub_tgz(arc, names, counts, _const_factory())
    tar_size = len(gzip.decompress(arc.read_bytes()))
    streams = []  # every gzip stream opened, with the bytes read from it

    class CountingGzip(gzip.GzipFile):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.bytes_read = 0
            streams.append(self)

        def read(self, size=-1):
            data = super().read(size)
            self.bytes_read += len(data)
            return data

    monkeypatch.setattr(gzip, "GzipFile", CountingGzip)
    rows = read_cub_manifest(arc)
    assert len(streams) == 1 and streams[0].bytes_read <= tar_size  # the metadata: one streamed pass
    train = [r for r in rows if r.split == "train"]
    test = [r for r in rows if r.split == "test"]
    assert (len(train), len(test)) == (5864, 5924)
    assert rows[:5864] == train  # id <= 5864 is train, as in the authors' files.py
    assert {r.label for r in train} == set(range(100)) and {r.label for r in test} == set(range(100, 200))
    assert test[0].class_name == "101.Species_101"
    extract_images(arc, rows, tmp_path / "root", CUB_PREFIX)
    assert all((tmp_path / "root" / r.path).is_file() for r in rows[::97])
    # the 11788 images: one more pass, streamed member by member, reading the archive exactly once
    # to its end (no seeking back, no second pass per member; the gzip CRC is checked at the end)
    assert len(streams) == 2 and streams[1].bytes_read == tar_size


@pytest.mark.slow
def test_full_scale_cars(tmp_path):
    # 18x83 + 80x82 = 8054 (classes 1-98), 95x83 + 3x82 = 8131 (classes 99-196)
    counts = _counts(18, 83, 80, 82) + _counts(95, 83, 3, 82)
    assert sum(counts[:98]) == 8054 and sum(counts) == 16185
    names = [f"Make{i} Model Sedan {2000 + i % 13}" for i in range(1, 197)]
    images, annos = tmp_path / "car_ims.tgz", tmp_path / "cars_annos.mat"
    synthetic.write_cars_files(images, annos, names, counts, _const_factory())
    rows = read_cars_manifest(images, annos)
    train = [r for r in rows if r.split == "train"]
    test = [r for r in rows if r.split == "test"]
    assert (len(train), len(test)) == (8054, 8131)
    assert test[0].path == "car_ims/008055.jpg" and rows[-1].path == "car_ims/016185.jpg"
    assert {r.label for r in train} == set(range(98)) and {r.label for r in test} == set(range(98, 196))
    assert test[0].class_name == names[98]


# --------------------------------------------------------------------------------------------
# bad inputs: DatasetError naming the file, nothing left behind


def _rewrite_tgz(src, dst, edits: dict[str, bytes | None]):
    """Copy a .tgz, replacing (bytes) or dropping (None) the named members."""
    with tarfile.open(src, "r:gz") as tin, tarfile.open(dst, "w:gz") as tout:
        for m in tin:
            if m.name in edits:
                if edits[m.name] is None:
                    continue
                data = edits[m.name]
                m.size = len(data)
                tout.addfile(m, io.BytesIO(data))
            else:
                tout.addfile(m, tin.extractfile(m) if m.isfile() else None)
    return dst


def _cub_member(archive, name) -> str:
    with tarfile.open(archive, "r:gz") as tf:
        return tf.extractfile("CUB_200_2011/" + name).read().decode()


def _expect_fail(cfg, tmp_path, *must_contain):
    msg = expect_fail(cfg, tmp_path, *must_contain)  # also: no manifest, no extracted images
    _assert_nothing_left(tmp_path / "out")
    return msg


def test_missing_archive(tmp_path):
    _expect_fail({"format": "cub", "archive": str(tmp_path / "nope.tgz")}, tmp_path, "nope.tgz", "not found")


def test_missing_cars_annotations(cars_cfg, tmp_path):
    cfg = dict(cars_cfg, annotations=str(tmp_path / "cars_annos.mat"))
    _expect_fail(cfg, tmp_path, str(tmp_path / "cars_annos.mat"), "not found")


@pytest.mark.parametrize("keep", [0.5, -4])
def test_truncated_cub_tgz(cub_cfg, tmp_path, keep):
    data = Path(cub_cfg["archive"]).read_bytes()
    bad = tmp_path / "CUB_200_2011.tgz"
    # half the file: fails while looking for images.txt; minus the gzip trailer: fails during extraction
    bad.write_bytes(data[: int(len(data) * keep)] if keep > 0 else data[:keep])
    _expect_fail({"format": "cub", "archive": str(bad)}, tmp_path, str(bad), "re-download")


def test_truncated_cars_tgz(cars_cfg, tmp_path):
    data = Path(cars_cfg["images_archive"]).read_bytes()
    bad = tmp_path / "car_ims.tgz"
    bad.write_bytes(data[: len(data) // 2])
    _expect_fail(dict(cars_cfg, images_archive=str(bad)), tmp_path, str(bad), "re-download")


def test_not_gzip(tmp_path):
    bad = tmp_path / "CUB_200_2011.tgz"
    bad.write_bytes(b"<html>404</html>" * 10)
    _expect_fail({"format": "cub", "archive": str(bad)}, tmp_path, str(bad), "re-download")


def test_md5_mismatch(cub_cfg, cars_cfg, tmp_path):
    actual = md5_file(cub_cfg["archive"])
    _expect_fail(dict(cub_cfg, md5="0" * 32), tmp_path, cub_cfg["archive"], "0" * 32, actual,
                 "re-download the archive or remove the md5: entry for your own archive")
    _expect_fail(dict(cars_cfg, md5={"annotations": "f" * 32}), tmp_path, cars_cfg["annotations"], "f" * 32)


@pytest.mark.parametrize("member", ["images.txt", "image_class_labels.txt", "classes.txt"])
def test_missing_cub_metadata(cub_cfg, tmp_path, member):
    bad = _rewrite_tgz(cub_cfg["archive"], tmp_path / "CUB_200_2011.tgz", {"CUB_200_2011/" + member: None})
    _expect_fail({"format": "cub", "archive": str(bad)}, tmp_path, str(bad), member)


def test_mismatched_ids(cub_cfg, tmp_path):
    lines = _cub_member(cub_cfg["archive"], "image_class_labels.txt").splitlines()
    lines[-1] = "9999 " + lines[-1].split()[1]
    bad = _rewrite_tgz(cub_cfg["archive"], tmp_path / "CUB_200_2011.tgz",
                       {"CUB_200_2011/image_class_labels.txt": ("\n".join(lines) + "\n").encode()})
    _expect_fail({"format": "cub", "archive": str(bad)}, tmp_path, "image_class_labels.txt", "9999", str(bad))


def test_cub_class_out_of_range(cub_cfg, tmp_path):
    lines = _cub_member(cub_cfg["archive"], "image_class_labels.txt").splitlines()
    lines[0] = lines[0].split()[0] + " 77"
    bad = _rewrite_tgz(cub_cfg["archive"], tmp_path / "CUB_200_2011.tgz",
                       {"CUB_200_2011/image_class_labels.txt": ("\n".join(lines) + "\n").encode()})
    _expect_fail({"format": "cub", "archive": str(bad)}, tmp_path, "classes.txt", "77", str(bad))


def test_cub_path_traversal(cub_cfg, tmp_path):
    lines = _cub_member(cub_cfg["archive"], "images.txt").splitlines()
    lines[0] = "1 ../../../evil.jpg"
    bad = _rewrite_tgz(cub_cfg["archive"], tmp_path / "CUB_200_2011.tgz",
                       {"CUB_200_2011/images.txt": ("\n".join(lines) + "\n").encode()})
    _expect_fail({"format": "cub", "archive": str(bad)}, tmp_path, "images.txt", "..")


def _rewrite_mat(src, dst, edit):
    mat = scipy.io.loadmat(src)
    mat = {k: v for k, v in mat.items() if not k.startswith("__")}
    edit(mat)
    scipy.io.savemat(dst, mat, format="5")
    return dst


def test_cars_mat_missing_field(cars_cfg, tmp_path):
    def drop_class(mat):
        ann = mat["annotations"]
        keep = [f for f in ann.dtype.names if f != "class"]
        new = np.empty(ann.shape, dtype=[(f, object) for f in keep])
        for f in keep:
            new[f] = ann[f]
        mat["annotations"] = new

    bad = _rewrite_mat(cars_cfg["annotations"], tmp_path / "cars_annos.mat", drop_class)
    _expect_fail(dict(cars_cfg, annotations=str(bad)), tmp_path, str(bad), "class")


def test_cars_mat_missing_variable(cars_cfg, tmp_path):
    bad = _rewrite_mat(cars_cfg["annotations"], tmp_path / "cars_annos.mat", lambda m: m.pop("class_names"))
    _expect_fail(dict(cars_cfg, annotations=str(bad)), tmp_path, str(bad), "class_names")


def test_cars_class_out_of_range(cars_cfg, tmp_path):
    def bump(mat):
        mat["annotations"]["class"][0, 2] = np.array([[C + 1]], dtype=np.uint8)

    bad = _rewrite_mat(cars_cfg["annotations"], tmp_path / "cars_annos.mat", bump)
    _expect_fail(dict(cars_cfg, annotations=str(bad)), tmp_path, str(bad), f"1..{C}")


def test_cars_image_not_in_archive(cars_cfg, tmp_path):
    def rename(mat):
        mat["annotations"]["relative_im_path"][0, 1] = np.array(["car_ims/999999.jpg"])

    bad = _rewrite_mat(cars_cfg["annotations"], tmp_path / "cars_annos.mat", rename)
    _expect_fail(dict(cars_cfg, annotations=str(bad)), tmp_path, cars_cfg["images_archive"], "999999")


def test_cars_mat_garbage(cars_cfg, tmp_path):
    bad = tmp_path / "cars_annos.mat"
    bad.write_bytes(b"\x00" * 300)
    _expect_fail(dict(cars_cfg, annotations=str(bad)), tmp_path, str(bad))


def test_single_test_image_class_cub(tmp_path):
    arc = tmp_path / "src" / "CUB_200_2011.tgz"
    names = ["001.A_a", "002.B_b", "003.C_c", "004.D_d"]
    synthetic.write_cub_tgz(arc, names, [3, 1, 3, 1], _const_factory())  # class 2 is train: fine
    msg = _expect_fail({"format": "cub", "archive": str(arc)}, tmp_path, str(arc), "004.D_d")
    assert "002.B_b" not in msg


def test_single_test_image_class_cars(tmp_path):
    images, annos = tmp_path / "src" / "car_ims.tgz", tmp_path / "src" / "cars_annos.mat"
    synthetic.write_cars_files(images, annos, ["A 1", "B 2", "C 3", "D 4"], [2, 2, 1, 2], _const_factory())
    _expect_fail({"format": "cars", "images_archive": str(images), "annotations": str(annos)},
                 tmp_path, str(annos), "C 3")


def test_bad_config(tmp_path):
    _expect_fail({"format": "imagenet"}, tmp_path, "unknown format")
    _expect_fail({"format": "cub"}, tmp_path, "archive")
    _expect_fail({"format": "cars", "images_archive": "a", "annotations": "b", "md5": "abc"}, tmp_path, "md5")
