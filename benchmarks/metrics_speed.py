"""Speed and peak-memory benchmark of cfga.metrics.retrieval_metrics.

Generates random unit features [N, D] (float32) with labels cycling over ``--classes`` classes
(~N/classes items each), then times ``retrieval_metrics`` (median of ``--repeats`` runs after one
warm-up run) and measures peak memory:

* CPU: growth of the process's peak RSS (``resource.getrusage(...).ru_maxrss``) over its value
  just before the first call, i.e. the extra memory the metric needs on top of the features.
* CUDA: ``torch.cuda.max_memory_allocated`` during one call, minus the memory held before it.

Usage:  python benchmarks/metrics_speed.py --n 60000 --dim 512 --device cpu --threads 2
Prints a short table and a one-line JSON summary (last line).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cfga.numerics.metrics import retrieval_metrics


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
    args = ap.parse_args(argv)

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
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
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
