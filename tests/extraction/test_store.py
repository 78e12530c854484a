"""Feature files (cfga.extraction.store): non-finite rows refused with nothing written, shards
dealt as whole batches and gathered into the unsharded file's bytes."""
import numpy as np
import pytest

from cfga.extraction.batching import size_buckets
from cfga.extraction.store import gather_shards, load_features, save_features, shard_plan


def _good_feats(n=2):
    return {"pooling": np.ones((n, 4096), np.float32) / 64.0}


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_save_features_refuses_non_finite_and_leaves_nothing(tmp_path, bad_value):
    feats = _good_feats()
    feats["pooling"][1, 7] = bad_value
    target = tmp_path / "out" / "model.npz"
    with pytest.raises(ValueError, match="non-finite") as ei:
        save_features(target, feats, [0, 1], ["a.jpg", "b.jpg"], {})
    assert "pooling" in str(ei.value) and str(target) in str(ei.value)
    assert not target.exists()
    assert not target.parent.exists() or list(target.parent.iterdir()) == []  # no temp file


def test_save_features_refusal_keeps_the_previous_file(tmp_path):
    target = tmp_path / "model.npz"
    save_features(target, _good_feats(), [0, 1], ["a.jpg", "b.jpg"], {"v": 1})
    before = target.read_bytes()
    feats = _good_feats()
    feats["pooling"][0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        save_features(target, feats, [0, 1], ["a.jpg", "b.jpg"], {"v": 2})
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz"]


def test_save_features_refuses_misaligned_paths(tmp_path):
    """Rows, labels and paths must line up; a short paths list would silently shift every path."""
    target = tmp_path / "model.npz"
    with pytest.raises(ValueError, match="paths"):
        save_features(target, _good_feats(), [0, 1], ["a.jpg"], {})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("seed", range(6))
def test_shard_plan_deals_whole_batches(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    sizes = [(int(h), 7) for h in rng.integers(0, 4, size=n)]  # few sizes: mixed buckets
    batch_size = int(rng.integers(1, 5))
    batches = size_buckets(sizes, batch_size)
    for n_shards in (1, 2, 3, n, n + 3):
        plan = shard_plan(sizes, batch_size, n_shards)
        assert len(plan) == n_shards
        assert sorted(i for s in plan for i in s) == list(range(n))
        owner = {i: k for k, s in enumerate(plan) for i in s}
        # whole batches, dealt in order (contiguous runs of the batch list)
        shard_of_batch = [{owner[i] for i in b} for b in batches]
        assert all(len(s) == 1 for s in shard_of_batch)
        flat = [s.pop() for s in shard_of_batch]
        assert flat == sorted(flat)
        # a shard's rows, extracted in order, re-form exactly its batches of the unsharded run
        for k, rows in enumerate(plan):
            local = [[rows[j] for j in b] for b in size_buckets([sizes[i] for i in rows], batch_size)]
            assert sorted(local) == sorted(b for b, s in zip(batches, flat) if s == k)
    assert shard_plan(sizes, batch_size, 1) == [list(range(n))]


def _feats(n, rng):
    return {"pooling": rng.standard_normal((n, 4096)).astype(np.float32),
            "cfga_plus": rng.standard_normal((n, 1024)).astype(np.float32)}


def test_gather_shards_gives_the_unsharded_bytes(tmp_path):
    rng = np.random.default_rng(0)
    n = 7
    feats = _feats(n, rng)
    labels = [3, 3, 4, 4, 5, 5, 5]
    paths = [f"img/{i}{'x' * i}.jpg" for i in range(n)]  # lengths differ: the str dtype must be the whole's
    meta = {"checkpoint_sha256": "ab", "device": "cpu", "protocol": "scda"}
    save_features(tmp_path / "whole.npz", feats, labels, paths, meta)
    plan = [[0, 1, 4], [], [2, 3], [5, 6]]  # not contiguous, one empty shard
    shard_paths = []
    for k, rows in enumerate(plan):
        p = tmp_path / f"s{k}.npz"
        save_features(p, {f: a[rows] for f, a in feats.items()}, [labels[i] for i in rows],
                      [paths[i] for i in rows], meta, rows=rows)
        shard_paths.append(p)
    assert gather_shards(shard_paths, tmp_path / "gathered.npz", expected_paths=paths) == n
    assert (tmp_path / "gathered.npz").read_bytes() == (tmp_path / "whole.npz").read_bytes()
    got, got_labels, got_paths, got_meta = load_features(tmp_path / "gathered.npz")
    assert got_meta == meta and got_paths.tolist() == paths

    with pytest.raises(ValueError, match="tile"):
        gather_shards(shard_paths[:-1], tmp_path / "bad.npz", expected_paths=paths)
    with pytest.raises(ValueError, match="manifest image"):
        gather_shards(shard_paths, tmp_path / "bad.npz", expected_paths=paths[::-1])
    other = tmp_path / "other.npz"
    save_features(other, {f: a[[5, 6]] for f, a in feats.items()}, labels[5:], paths[5:],
                  {**meta, "checkpoint_sha256": "cd"}, rows=[5, 6])
    with pytest.raises(ValueError, match="checkpoint_sha256"):
        gather_shards(shard_paths[:-1] + [other], tmp_path / "bad.npz", expected_paths=paths)
    with pytest.raises(ValueError, match="not a shard file"):
        gather_shards([tmp_path / "whole.npz"], tmp_path / "bad.npz")
    assert not (tmp_path / "bad.npz").exists()
