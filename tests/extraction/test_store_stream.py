"""Feature rows streamed to disk (FeatureWriter): the bytes save_features writes, memory that does
not grow with N, nothing left behind on failure; extraction and gathering through it."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

from cfga import extract_features, load_model
from cfga.extraction.preprocess import ImageError
from cfga.extraction.store import FeatureWriter, gather_shards, load_features, save_features
from cfga.registry.features import feature_dim, features_for

DIMS = {"pooling": 4096, "cfga_4_1_1": 2048, "cfga_4_1_2": 512, "cfga_plus": 1024}


def _feats(n, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal((n, d)).astype(np.float32) for k, d in DIMS.items()}


def _stream(path, feats, labels, paths, meta, order, batch=8, rows=None):
    with FeatureWriter(path, len(labels)) as w:
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            for k, v in feats.items():
                w.write(k, idx, v[idx])
        w.finish(labels, paths, meta, rows=rows)


@pytest.mark.parametrize("shard_rows", [False, True])
def test_streamed_file_has_the_bytes_of_save_features(tmp_path, shard_rows):
    n = 53
    feats = _feats(n)
    labels, paths, meta = [i % 7 for i in range(n)], [f"c/{i}.jpg" for i in range(n)], {"device": "cpu", "x": [1]}
    rows = list(range(100, 100 + n)) if shard_rows else None
    save_features(tmp_path / "a.npz", feats, labels, paths, meta, rows=rows)
    # batches of one size bucket are scattered over the manifest: write them in a shuffled order
    _stream(tmp_path / "b.npz", feats, labels, paths, meta, np.random.default_rng(1).permutation(n), rows=rows)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.npz"]  # parts deleted
    got, lab, pth, m = load_features(tmp_path / "b.npz", names=["cfga_plus"])
    assert list(got) == ["cfga_plus"] and np.array_equal(got["cfga_plus"], feats["cfga_plus"]) and m == meta


def test_zero_rows(tmp_path):
    feats = {k: np.zeros((0, d), np.float32) for k, d in DIMS.items()}
    save_features(tmp_path / "a.npz", feats, [], [], {})
    with FeatureWriter(tmp_path / "b.npz", 0) as w:
        for k, v in feats.items():
            w.write(k, [], v)
        w.finish([], [], {})
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


def test_unwritten_rows_bad_rows_and_errors_leave_nothing(tmp_path):
    target = tmp_path / "f.npz"
    feats = _feats(10)
    with pytest.raises(ValueError, match=r"rows \[3\]"):
        with FeatureWriter(target, 10) as w:
            for k, v in feats.items():
                idx = [i for i in range(10) if i != 3]
                w.write(k, idx, v[idx])
            w.finish(list(range(10)), [str(i) for i in range(10)], {})
    assert list(tmp_path.iterdir()) == []
    with FeatureWriter(target, 10) as w:
        with pytest.raises(ValueError, match="non-finite"):
            w.write("pooling", [0], np.full((1, 4096), np.nan, np.float32))
        with pytest.raises(ValueError, match="out of 0..9 or repeated"):
            w.write("pooling", [9, 10], np.zeros((2, 4096), np.float32))
        with pytest.raises(ValueError, match="dimension"):
            w.write("pooling", [1], np.zeros((1, 5), np.float32))
        with pytest.raises(ValueError, match="unknown feature"):
            w.write("nope", [1], np.zeros((1, 5), np.float32))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="boom"):
        with FeatureWriter(target, 10) as w:
            w.write("pooling", [0], np.zeros((1, 4096), np.float32))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_writer_memory_does_not_grow_with_n(tmp_path):
    """Python-side allocations while streaming N rows stay at about one batch, for N and 8 N."""
    peaks = {}
    for n in (250, 2000):
        order = np.arange(n)
        tracemalloc.start()
        with FeatureWriter(tmp_path / f"f{n}.npz", n) as w:
            for start in range(0, n, 8):
                idx = order[start:start + 8]
                for k, d in DIMS.items():
                    w.write(k, idx, np.ones((len(idx), d), np.float32))
            w.finish(list(range(n)), [f"{i}.jpg" for i in range(n)], {})
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    row_bytes = 4 * sum(DIMS.values())  # 30 KB a row: 60 MB of features at N = 2000
    assert peaks[2000] < 20 * 8 * row_bytes + 2 * 2**20, peaks  # a few batches + the packing buffer
    assert peaks[2000] < peaks[250] + 2000 * 200, peaks  # per-row bookkeeping only (labels, paths)


def test_gather_streams_to_the_bytes_of_one_job(tmp_path):
    n = 40
    feats = _feats(n, seed=3)
    labels, paths, meta = list(range(n)), [f"{i}.jpg" for i in range(n)], {"device": "cpu"}
    save_features(tmp_path / "one.npz", feats, labels, paths, meta)
    shards = [np.arange(0, 13), np.arange(13, 13), np.arange(13, 40)]  # an empty shard too
    files = []
    for i, r in enumerate(shards):
        files.append(tmp_path / f"s{i}.npz")
        save_features(files[-1], {k: v[r] for k, v in feats.items()}, [labels[j] for j in r],
                      [paths[j] for j in r], meta, rows=r.tolist())
    assert gather_shards(files[::-1], tmp_path / "g.npz", expected_paths=paths) == n
    assert (tmp_path / "g.npz").read_bytes() == (tmp_path / "one.npz").read_bytes()


# --------------------------------------------------------------------------------------------
# extraction through the writer


@pytest.fixture(scope="module")
def model_and_images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(40, 60), (60, 40), (40, 60), (33, 33), (40, 60)]):
        p = d / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    import torchvision

    torch.manual_seed(0)
    ckpt = d / "r50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), ckpt)
    return load_model("resnet50", "scda", ckpt, device="cpu"), paths


def test_extraction_through_the_writer_equals_in_memory(tmp_path, model_and_images):
    model, paths = model_and_images
    torch.set_num_threads(1)
    feats = extract_features(model, paths, "scda", batch_size=2)
    save_features(tmp_path / "a.npz", feats, [0] * len(paths), [str(p) for p in paths], {})
    with FeatureWriter(tmp_path / "b.npz", len(paths)) as w:
        assert extract_features(model, paths, "scda", batch_size=2, sink=w) == {}
        w.finish([0] * len(paths), [str(p) for p in paths], {})
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    got, *_ = load_features(tmp_path / "b.npz")
    assert list(got) == list(features_for("scda"))
    assert all(got[k].shape == (len(paths), feature_dim(k, "scda")) for k in got)
    with FeatureWriter(tmp_path / "c.npz", 0) as w:  # no images: the protocol's empty arrays
        extract_features(model, [], "scda", sink=w)
        w.finish([], [], {})
    assert list(load_features(tmp_path / "c.npz")[0]) == list(features_for("scda"))


def test_image_that_no_longer_decodes_names_the_file_and_leaves_nothing(tmp_path, model_and_images):
    model, paths = model_and_images
    bad = tmp_path / "imgs" / "cut.jpg"
    bad.parent.mkdir()
    data = paths[0].read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # the header parses, the pixel data is cut
    out = tmp_path / "out"
    out.mkdir()
    torch.set_num_threads(1)
    with pytest.raises(ImageError, match="cut.jpg.*truncated or corrupt.*re-download or re-extract"):
        with FeatureWriter(out / "features.npz", 3) as w:
            extract_features(model, [paths[1], bad, paths[2]], "scda", batch_size=1, sink=w)
            w.finish([0, 0, 0], ["a", "b", "c"], {})
    assert list(out.iterdir()) == []


def test_extraction_memory_benchmark_runs(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "extraction_memory.py"
    proc = subprocess.run([sys.executable, str(script), "--n", "40", "80", "--in-memory", "40", "--batch", "8",
                           "--dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])["results"]
    assert [(r["mode"], r["n"]) for r in results] == [("stream", 40), ("stream", 80), ("in_memory", 40)]
    assert all(r["file_bytes"] > r["n"] * r["row_bytes"] for r in results)
    assert list(tmp_path.iterdir()) == []


def test_leftovers_of_a_killed_writer_are_removed_by_the_next(tmp_path):
    target = tmp_path / "f.npz"
    (tmp_path / ".f.npz.abc123.parts").mkdir()
    (tmp_path / ".f.npz.abc123.parts" / "pooling.npy").write_bytes(b"\0" * 100)
    (tmp_path / ".f.npz.xyz.tmp.npz").write_bytes(b"PK")
    (tmp_path / ".other.npz.abc.parts").mkdir()  # another output's: kept
    with FeatureWriter(target, 1) as w:
        w.write("pooling", [0], np.ones((1, 4096), np.float32))
        w.finish([0], ["a.jpg"], {})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.npz.abc.parts", "f.npz"]
