"""Load time of one model's feature file at the size of the CUB test split.

Writes a ``scda``-protocol feature file (all 10 features, float32, 5,924 rows by default: the
CUB-200-2011 test split) with :func:`cfga.extraction.store.save_features`, then times
:func:`cfga.extraction.store.load_features` (median of ``--repeats``):

* warm: the file in the page cache (the usual case right after extraction);
* cold: the file's pages dropped first with ``posix_fadvise(DONTNEED)`` (works without root;
  a best effort: the kernel may keep pages that are mapped elsewhere).

Usage:  python benchmarks/featurestore_speed.py [--rows 5924] [--repeats 5] [--dir /tmp]
Prints a short table and a one-line JSON summary (last line). Target (issue 4): < 1 s.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cfga.extraction.store import load_features, save_features
from cfga.registry.features import PROTOCOL_FEATURES, feature_dim


def _drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _time_load(path: str, cold: bool) -> float:
    if cold:
        _drop_cache(path)
    t0 = time.perf_counter()
    feats, labels, paths, meta = load_features(path)
    # touch every array so lazy reads cannot hide cost
    total = sum(float(a[-1, -1]) for a in feats.values()) + int(labels[-1]) + len(paths[-1])
    dt = time.perf_counter() - t0
    assert np.isfinite(total) and meta["protocol"] == "scda"
    return dt


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=5924, help="images (default: the CUB test split)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to write the file (default: a temp dir)")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    names = PROTOCOL_FEATURES["scda"]
    feats = {f: rng.standard_normal((args.rows, feature_dim(f, "scda")), dtype=np.float32) for f in names}
    labels = np.arange(args.rows) % 100 + 100
    paths = [f"images/{i // 60 + 101:03d}.Some_Long_Bird_Name/Some_Long_Bird_Name_{i:04d}_{i * 7919}.jpg"
             for i in range(args.rows)]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "features.npz")
        save_features(path, feats, labels, paths, {"protocol": "scda", "device": "cpu"})
        size_mb = os.path.getsize(path) / 2**20
        warm = [_time_load(path, cold=False) for _ in range(args.repeats)]
        cold = [_time_load(path, cold=True) for _ in range(args.repeats)]
    out = {
        "rows": args.rows, "features": len(names), "file_mb": round(size_mb, 1),
        "warm_s": round(statistics.median(warm), 3), "cold_s": round(statistics.median(cold), 3),
        "target_s": 1.0,
    }
    print(f"{args.rows} rows × {len(names)} features, {size_mb:.0f} MB file")
    print(f"load_features warm: {out['warm_s']:.3f} s   cold (pages dropped): {out['cold_s']:.3f} s   target < 1 s")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
