"""Synthetic archives: determinism, image properties, exact real-file structure."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import scipy.io
from cfga.data import synthetic
from PIL import Image

from cfga.data.archives import DatasetError
from cfga.data.formats import parse_cars_annotations


def _jpeg_members(tgz):
    with tarfile.open(tgz, "r:gz") as tf:
        return {m.name: tf.extractfile(m).read() for m in tf if m.isfile() and m.name.endswith(".jpg")}


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    d = tmp_path_factory.mktemp("syn_cub")
    return synthetic.synthesize({"format": "cub", "synthetic": {"classes": 3, "images_per_class": 10, "seed": 7}}, d)


@pytest.fixture(scope="module")
def cars(tmp_path_factory):
    d = tmp_path_factory.mktemp("syn_cars")
    return synthetic.synthesize({"format": "cars", "synthetic": {"classes": 3, "images_per_class": 10, "seed": 7}}, d)


def test_synthesize_returns_ingest_cfg(cub, cars):
    assert cub["format"] == "cub" and cub["archive"].endswith("CUB_200_2011.tgz")
    assert cars["format"] == "cars"
    assert cars["images_archive"].endswith("car_ims.tgz") and cars["annotations"].endswith("cars_annos.mat")


@pytest.mark.parametrize("fmt", ["cub", "cars"])
def test_deterministic_bytes(tmp_path, fmt):
    def make(seed, sub):
        cfg = {"format": fmt, "synthetic": {"classes": 2, "images_per_class": 3, "seed": seed}}
        out = synthetic.synthesize(cfg, tmp_path / sub)
        return [open(p, "rb").read() for k, p in sorted(out.items()) if k != "format"]

    a, b, c = make(1, "a"), make(1, "b"), make(2, "c")
    assert a == b
    assert all(x != y for x, y in zip(a, c))


@pytest.mark.parametrize("which", ["cub", "cars"])
def test_image_properties(which, cub, cars):
    tgz = cub["archive"] if which == "cub" else cars["images_archive"]
    imgs = [Image.open(io.BytesIO(b)) for b in _jpeg_members(tgz).values()]
    assert len(imgs) == 30
    assert all(im.format == "JPEG" for im in imgs)
    shorts = [min(im.size) for im in imgs]
    aspects = [im.size[0] / im.size[1] for im in imgs]
    assert min(shorts) < 256 < max(shorts)
    assert 120 <= min(shorts) and max(shorts) <= 400
    assert 0.59 <= min(aspects) and max(aspects) <= 1.81
    modes = {im.mode for im in imgs}
    assert {"RGB", "L", "CMYK"} <= modes
    for im in imgs:  # decodes and converts like the pipeline does
        assert im.convert("RGB").mode == "RGB"


def test_classes_differ_in_details():
    params = synthetic.class_params(96, seed=3)
    combos = {(p["colour_idx"], p["stripes"], p["part"], p["body"]) for p in params}
    assert len(combos) == 96  # every class distinct in its fine-grained attributes
    names = synthetic.cub_class_names(synthetic.class_params(120, seed=3))
    assert len(set(names)) == 120 and names[0].startswith("001.")
    assert len(set(synthetic.cars_class_names(synthetic.class_params(120, seed=3)))) == 120


def test_patch_colours_round_robin_so_test_classes_share_train_colours():
    params = synthetic.class_params(10, seed=1)
    colours = [p["colour_idx"] for p in params]
    assert colours == [i % 6 for i in range(10)]
    # the test half (classes 6–10) differs in colour and uses only colours the train half shows
    assert len(set(colours[5:])) == 5 and set(colours[5:]) <= set(colours[:5]) | {5}
    assert len({p["combo"] for p in synthetic.class_params(200, seed=1)[:96]}) == 96


def test_cub_archive_structure(cub):
    with tarfile.open(cub["archive"], "r:gz") as tf:
        names = tf.getnames()
        txt = {n.split("/")[-1]: tf.extractfile(n).read().decode() for n in names if n.endswith(".txt")}
    for f in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt", "bounding_boxes.txt"):
        assert f"CUB_200_2011/{f}" in names
    img_lines = txt["images.txt"].split("\n")[:-1]
    assert [int(ln.split()[0]) for ln in img_lines] == list(range(1, 31))
    first = img_lines[0].split()[1]
    folder, fname = first.split("/")
    assert folder.startswith("001.") and fname.endswith(".jpg")
    assert f"CUB_200_2011/images/{first}" in names
    # images.txt sorted by class, like the real one
    labels = [int(ln.split()[1]) for ln in txt["image_class_labels.txt"].split("\n")[:-1]]
    assert labels == sorted(labels) and set(labels) == {1, 2, 3}
    assert len(txt["bounding_boxes.txt"].split("\n")[:-1]) == 30
    assert all(len(ln.split()) == 5 for ln in txt["bounding_boxes.txt"].split("\n")[:-1])


def test_cars_mat_has_real_layout(cars):
    mat = scipy.io.loadmat(cars["annotations"])
    ann, names = mat["annotations"], mat["class_names"]
    assert ann.shape == (1, 30)
    assert set(ann.dtype.names) == {"relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"}
    e = ann[0, 0]
    assert e["relative_im_path"].dtype.kind == "U" and e["relative_im_path"][0] == "car_ims/000001.jpg"
    assert e["class"].shape == (1, 1) and e["class"].dtype == np.uint8 and int(e["class"][0, 0]) == 1
    assert e["bbox_x2"].dtype == np.uint16 and int(e["bbox_x2"][0, 0]) > int(e["bbox_x1"][0, 0]) >= 1
    assert names.shape == (1, 3) and names.dtype == object and names[0, 0].dtype.kind == "U"
    # numbered in .mat order, sorted by class
    assert [str(a[0]) for a in ann[0]["relative_im_path"]] == [f"car_ims/{i:06d}.jpg" for i in range(1, 31)]
    assert [int(a[0, 0]) for a in ann[0]["class"]] == sorted(int(a[0, 0]) for a in ann[0]["class"])
    with tarfile.open(cars["images_archive"], "r:gz") as tf:
        assert [n for n in tf.getnames() if n.endswith(".jpg")] == [f"car_ims/{i:06d}.jpg" for i in range(1, 31)]


@pytest.mark.parametrize(
    "kw",
    [{}, {"squeeze_me": True}, {"struct_as_record": False}, {"struct_as_record": False, "squeeze_me": True}],
)
def test_cars_mat_parses_in_every_loadmat_layout(cars, kw):
    ref = parse_cars_annotations(scipy.io.loadmat(cars["annotations"]))
    got = parse_cars_annotations(scipy.io.loadmat(cars["annotations"], **kw))
    assert got == ref
    anns, names = got
    assert len(anns) == 30 and len(names) == 3
    assert anns[0] == {"relative_im_path": "car_ims/000001.jpg", "class": 1}


def test_synthesize_rejects_bad_config(tmp_path):
    with pytest.raises(DatasetError, match="images_per_class"):
        synthetic.synthesize({"format": "cub", "synthetic": {"classes": 3}}, tmp_path)
    with pytest.raises(DatasetError, match="images_per_class >= 2"):
        synthetic.synthesize({"format": "cub", "synthetic": {"classes": 3, "images_per_class": 1, "seed": 0}}, tmp_path)
    with pytest.raises(DatasetError, match="unknown format"):
        synthetic.synthesize({"format": "sop", "synthetic": {"classes": 3, "images_per_class": 2, "seed": 0}}, tmp_path)
