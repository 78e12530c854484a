"""Speed and peak-memory benchmark of cfga.metrics.retrieval_metrics.

Generates random unit features [N, D] (float32) with labels cycling over ``--classes`` classes
(~N/classes items each), then times ``retrieval_metrics`` (median of ``--repeats`` runs after one
warm-up run) and measures peak memory:

* CPU: growth of the process's peak RSS (``resource.getrusage(...).ru_maxrss``) over its value
  just before the first call, i.e. the extra memory the metric needs on top of the features.
* CUDA: ``torch.cuda.max_memory_allocated`` during one call, minus the memory held before it.

Usage:  python benchmarks/metrics_speed.py --n 60000 --dim 512 --device cpu --threads 2
Prints a short table and a one-line JSON summary (last line).

Side by side with pytorch-metric-learning (issue 15):

    python benchmarks/metrics_speed.py --suite --n 60502 --threads 2 --configs cub:512,sop:512,sop:4096

generates features with class structure (``x = normalise(centre[label] + noise)``, the noise set
so that a same-class pair's cosine is ~``--snr``/sqrt(D): R@1 well below 1) at CUB-like (60 per
class) and SOP-like (60,502 images in 11,316 classes, 5-6 per class) class sizes, writes them to
a temporary .npy, then runs, each in its OWN subprocess that loads the file and reports its own
peak RSS (features included, as in the workflow's metrics job):

* ``ours``: ``retrieval_metrics`` with the dataset's Ks (CUB 1..32, SOP 1, 10, 100, 1000) + MAP@R;
* ``pml``: ``AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"),
  k="max_bin_count")`` (its default exact faiss k-NN) on the same rows, query = reference.

Prints one JSON line per run and a table; ``--json FILE`` writes them all.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import subprocess
import tempfile

import numpy as np

from _machine import cpu_name  # benchmarks/ is the script's directory

from cfga.numerics.metrics import retrieval_metrics

SOP_KS = (1, 10, 100, 1000)
CUB_KS = (1, 2, 4, 8, 16, 32)
SOP_TEST = (60502, 11316)  # images, classes


def structured_labels(n: int, kind: str, seed: int) -> np.ndarray:
    """Label per row: CUB-like 60 per class, SOP-like n * 11316/60502 classes (5-6 each); shuffled."""
    classes = max(1, round(n / 60)) if kind == "cub" else max(1, round(n * SOP_TEST[1] / SOP_TEST[0]))
    rng = np.random.default_rng(seed)
    return rng.permutation(np.arange(n) % classes).astype(np.int64)


def write_structured(path: str, n: int, dim: int, labels: np.ndarray, snr: float, seed: int) -> None:
    """Unit float32 features with class structure into ``path`` (.npy), 4096 rows at a time."""
    rng = np.random.default_rng(seed + 1)
    centres = rng.standard_normal((int(labels.max()) + 1, dim)).astype(np.float32)
    rho = min(0.99, snr / math.sqrt(dim))  # target same-class cosine
    sigma = math.sqrt(1.0 / rho - 1.0)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for s in range(0, n, 4096):
        x = centres[labels[s : s + 4096]] + sigma * rng.standard_normal((min(4096, n - s), dim), dtype=np.float32)
        out[s : s + 4096] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    del out


def child(args) -> dict:
    """One timed call on the features in ``args.data`` (a .npy next to a ``*.labels.npy``)."""
    torch.set_num_threads(args.threads)
    x = np.load(args.data)
    y = np.load(args.data[: -len(".npy")] + ".labels.npy")
    load0 = _loadavg()
    if args.impl == "ours":
        ks = SOP_KS if args.structure == "sop" else CUB_KS
        t0 = time.perf_counter()
        m = retrieval_metrics(x, y, ks, device="cpu")
        dt = time.perf_counter() - t0
        res = {"recall@1": m["recall@1"], "map@r": m["map@r"], "ks": list(ks)}
    else:
        import faiss
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        faiss.omp_set_num_threads(args.threads)
        calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count",
                                  device=torch.device("cpu"))
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        t0 = time.perf_counter()
        m = calc.get_accuracy(xt, yt)
        dt = time.perf_counter() - t0
        res = {"recall@1": m["precision_at_1"], "map@r": m["mean_average_precision_at_r"]}
    return {"impl": args.impl, "structure": args.structure, "n": int(x.shape[0]), "dim": int(x.shape[1]),
            "classes": int(len(np.unique(y))), "threads": args.threads, "seconds": round(dt, 2),
            "peak_rss_mb": round(_maxrss_bytes() / 2**20, 1), "loadavg_before": load0,
            "loadavg_after": _loadavg(), **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in res.items()}}


def suite(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="metrics_speed_") as tmp:
        for cfg in args.configs.split(","):
            kind, dim = cfg.split(":")
            dim = int(dim)
            labels = structured_labels(args.n, kind, args.seed)
            path = os.path.join(tmp, f"{kind}_{dim}.npy")
            write_structured(path, args.n, dim, labels, args.snr, args.seed)
            np.save(path[: -len(".npy")] + ".labels.npy", labels)
            for impl in ("ours", "pml"):
                cmd = [sys.executable, os.path.abspath(__file__), "--data", path, "--impl", impl,
                       "--structure", kind, "--threads", str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"{impl} on {cfg} failed:\n{proc.stderr[-3000:]}")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                print(json.dumps(row), flush=True)
                rows.append(row)
            os.remove(path)
    print(f"{'data':>10} {'N':>6} {'D':>5} {'impl':>5} {'seconds':>8} {'peak RSS MB':>12} {'R@1':>8} {'MAP@R':>8}")
    for r in rows:
        print(f"{r['structure'] + '-like':>10} {r['n']:>6} {r['dim']:>5} {r['impl']:>5} {r['seconds']:>8.1f} "
              f"{r['peak_rss_mb']:>12.0f} {r['recall@1']:>8.4f} {r['map@r']:>8.4f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"cpu": cpu_name(), "rows": rows}, fh, indent=1)
    return rows


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=60000, help="number of items (query = gallery)")
    ap.add_argument("--dim", type=int, default=512, help="feature dimension")
    ap.add_argument("--classes", type=int, default=None, help="number of classes (default N/11)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up")
    ap.add_argument("--block-size", type=int, default=None, help="query rows per block (default: auto)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--suite", action="store_true", help="structured data, ours vs PML, one subprocess each")
    ap.add_argument("--configs", default="cub:512,sop:512,sop:4096,cub:4096",
                    help="--suite: comma-separated structure:dim (structure cub or sop)")
    ap.add_argument("--snr", type=float, default=2.5, help="--suite: same-class cosine * sqrt(D)")
    ap.add_argument("--json", default=None, help="--suite: write the rows to this file")
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)  # --suite's child processes
    ap.add_argument("--impl", choices=["ours", "pml"], default="ours", help=argparse.SUPPRESS)
    ap.add_argument("--structure", choices=["cub", "sop"], default="cub", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.data:
        row = child(args)
        print(json.dumps(row))
        return row
    if args.suite:
        return suite(args)

    torch.set_num_threads(args.threads)
    classes = args.classes or max(1, args.n // 11)
    dev = torch.device(args.device)

    g = torch.Generator().manual_seed(args.seed)
    feats = torch.randn(args.n, args.dim, generator=g, dtype=torch.float32)
    feats /= torch.linalg.vector_norm(feats, dim=1, keepdim=True)
    labels = torch.arange(args.n) % classes
    labels = labels[torch.randperm(args.n, generator=g)]
    if dev.type == "cuda":
        feats = feats.to(dev)
        labels = labels.to(dev)
        torch.cuda.synchronize()

    def call():
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = retrieval_metrics(feats, labels, device=dev, block_size=args.block_size)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    load_before = _loadavg()
    rss0 = _maxrss_bytes()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        held0 = torch.cuda.memory_allocated(dev)
    result, t_warm = call()
    if dev.type == "cuda":
        peak_bytes = torch.cuda.max_memory_allocated(dev) - held0
    else:
        peak_bytes = _maxrss_bytes() - rss0
    times = [call()[1] for _ in range(args.repeats)]
    med = statistics.median(times) if times else t_warm

    summary = {
        "n": args.n,
        "dim": args.dim,
        "classes": classes,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
        "threads": args.threads,
        "block_size": args.block_size,
        "warmup_s": round(t_warm, 3),
        "times_s": [round(t, 3) for t in times],
        "median_s": round(med, 3),
        "peak_extra_mb": round(peak_bytes / 2**20, 1),
        "peak_rss_mb": round(_maxrss_bytes() / 2**20, 1),
        "loadavg_before": load_before,  # other processes competing for the cores skew timings
        "loadavg_after": _loadavg(),
        "metrics": {k: round(v, 6) for k, v in result.items()},
    }
    print(f"{'N':>8} {'D':>5} {'classes':>8} {'device':>7} {'thr':>4} {'median s':>9} {'peak extra MB':>14}")
    print(f"{args.n:>8} {args.dim:>5} {classes:>8} {str(dev):>7} {args.threads:>4} {med:>9.2f} {summary['peak_extra_mb']:>14.1f}")
    print("metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in result.items()))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
