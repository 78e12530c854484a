"""Peak memory of one extraction job's feature storage against N (issue 15: SOP's 60,502 test images).

Drives :class:`cfga.extraction.store.FeatureWriter` exactly as ``extract_features(..., sink=)``
does, with the model step faked: batches of ``--batch`` synthetic rows of every feature of a
protocol at its real dimension (``scda``: 10 features + CFGA+, 19,456 float32 a row, 77.8 KB),
in a scattered row order (same-size buckets are spread over the manifest), then ``finish``
packs the ``.npz``. Each N runs in a fresh subprocess; its peak RSS (``ru_maxrss``) and its RSS
right after the imports are reported. ``--in-memory N`` also runs the pre-issue-15 path (every
feature held as an [N, D] array, then ``save_features``) for comparison.

The real job adds the model and one batch of images and activations on top (independent of N).

Usage:  python benchmarks/extraction_memory.py [--n 6050 60502] [--in-memory 6050] [--batch 32]
                                               [--protocol scda] [--dir /tmp]
Prints a table and a one-line JSON summary (last line).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))


def _rss_kb() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


def child(mode: str, n: int, batch: int, protocol: str, out_dir: str) -> dict:
    import numpy as np

    from cfga.extraction.store import FeatureWriter, save_features
    from cfga.registry.features import feature_dim, features_for

    base_kb = _rss_kb()
    names = features_for(protocol)
    dims = {k: feature_dim(k, protocol) for k in names}
    rng = np.random.default_rng(0)
    order = rng.permutation(n)
    block = {k: rng.standard_normal((batch, d)).astype(np.float32) for k, d in dims.items()}
    labels, paths = (order % 11316).tolist(), [f"class_{i % 11316}/{i:06d}.JPG" for i in range(n)]
    path = os.path.join(out_dir, f"features_{mode}_{n}.npz")
    t = time.perf_counter()
    if mode == "stream":
        with FeatureWriter(path, n) as w:
            for s in range(0, n, batch):
                idx = order[s:s + batch]
                for k in names:
                    w.write(k, idx, block[k][: len(idx)])
            w.finish(labels, paths, {"benchmark": True})
    else:  # the pre-issue-15 path: whole arrays in memory, then one save
        out = {}
        for s in range(0, n, batch):
            idx = order[s:s + batch]
            for k in names:
                if k not in out:
                    out[k] = np.zeros((n, dims[k]), dtype=np.float32)
                out[k][idx] = block[k][: len(idx)]
        save_features(path, out, labels, paths, {"benchmark": True})
    seconds = time.perf_counter() - t
    size = os.path.getsize(path)
    os.unlink(path)
    return {"mode": mode, "n": n, "batch": batch, "protocol": protocol, "features": len(names),
            "row_bytes": 4 * sum(dims.values()), "file_bytes": size, "seconds": round(seconds, 1),
            "base_rss_mb": round(base_kb / 1024, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[6050, 60502])
    ap.add_argument("--in-memory", type=int, nargs="*", default=[6050], help="N for the pre-issue-15 path")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--protocol", default="scda")
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--child", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], int(a.child[1]), a.batch, a.protocol, a.dir)))
        return
    runs = [("stream", n) for n in a.n] + [("in_memory", n) for n in a.in_memory]
    results = []
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        for mode, n in runs:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, str(n),
                                   "--batch", str(a.batch), "--protocol", a.protocol, "--dir", d],
                                  capture_output=True, text=True, check=True)
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{'mode':10} {'N':>7} {'file MB':>9} {'base RSS MB':>12} {'peak RSS MB':>12} {'s':>7}")
    for r in results:
        print(f"{r['mode']:10} {r['n']:7d} {r['file_bytes'] / 2**20:9.0f} {r['base_rss_mb']:12.1f} "
              f"{r['peak_rss_mb']:12.1f} {r['seconds']:7.1f}")
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
