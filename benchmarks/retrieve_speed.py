"""How long `cfga retrieve` takes for one query once the model is on disk (issue 14: < 10 s on the CPU).

Builds a workflow directory like `snakemake all` leaves it: a config with one `scda` ResNet-50 (random
weights, a torchvision state dict on disk), a manifest and gallery images, and a features file with
every `scda` feature at its real dimension for ``--gallery`` test images (default 5924, CUB-200-2011's
test split). Then runs the command as a user does, in a fresh process:

    cfga retrieve query.jpg --dataset cub --model r50 --feature cfga_plus --k 8 -o out.png

``--repeats`` times (median reported), and prints a table and a one-line JSON summary (last line).
Wall time includes Python start, imports, reading the features file, loading the checkpoint,
extracting the query, the search, the query's heatmaps and writing the figure.

Usage:  python benchmarks/retrieve_speed.py [--gallery 5924] [--repeats 3] [--threads 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import cpu_name  # benchmarks/ is the script's directory

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(wd: Path, n: int, seed: int = 0) -> None:
    import numpy as np
    import torch
    import torchvision
    import yaml
    from PIL import Image

    from cfga.data.manifest import ManifestRow, write_manifest
    from cfga.extraction.store import save_features
    from cfga.registry.features import feature_dim, features_for

    rng = np.random.default_rng(seed)
    root = wd / "results/datasets/cub"
    (root / "images").mkdir(parents=True)
    first = root / "images/0.jpg"
    Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(first, quality=90)
    rows = [ManifestRow("test", i % 100, f"class{i % 100}", f"images/{i}.jpg") for i in range(n)]
    for r in rows[1:]:
        os.link(first, root / r.path)  # one JPEG under every name: only the k neighbours are read
    write_manifest(rows, wd / "results/manifests/cub.csv")
    torch.manual_seed(seed)
    torch.save(torchvision.models.resnet50().state_dict(), wd / "r50.pth")
    feats = {}
    for f in features_for("scda"):
        x = rng.standard_normal((n, feature_dim(f, "scda")), dtype=np.float32)
        feats[f] = x / np.linalg.norm(x, axis=1, keepdims=True)
    save_features(wd / "results/features/cub/r50.npz", feats, [r.label for r in rows], [r.path for r in rows],
                  {"protocol": "scda"})
    cfg = {"datasets": {"cub": {"format": "cub", "archive": "CUB_200_2011.tgz"}},
           "models": {"r50": {"arch": "resnet50", "protocol": "scda", "checkpoint": "r50.pth"}},
           "extraction": {"device": "cpu"}}
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(wd / "query.jpg", quality=90)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gallery", type=int, default=5924, help="test images in the gallery")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the command")
    ap.add_argument("--json", default=None, help="also write the summary here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cfga-retrieve-bench-") as tmp:
        wd = Path(tmp)
        t = time.monotonic()
        build(wd, args.gallery)
        print(f"built a {args.gallery}-image workflow directory in {time.monotonic() - t:.1f} s", file=sys.stderr)
        cmd = [sys.executable, "-m", "cfga.cli", "retrieve", "query.jpg", "--dataset", "cub", "--model", "r50",
               "--feature", "cfga_plus", "--k", "8", "-o", "out.png"]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        times = []
        for _ in range(args.repeats):
            t = time.monotonic()
            proc = subprocess.run(cmd, cwd=wd, env=env, capture_output=True, text=True)
            times.append(time.monotonic() - t)
            if proc.returncode != 0:
                raise SystemExit(f"cfga retrieve failed:\n{proc.stderr}")
    summary = {
        "benchmark": "retrieve_speed", "gallery": args.gallery, "threads": args.threads,
        "seconds": [round(x, 2) for x in times], "median_s": round(statistics.median(times), 2),
        "cpu": cpu_name(), "cores": os.cpu_count(),
        "loadavg": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
    }
    print(f"cfga retrieve, 1 query, gallery {args.gallery}: median {summary['median_s']} s "
          f"(runs {summary['seconds']}; load {summary['loadavg']})")
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary) + "\n")
    return summary


if __name__ == "__main__":
    main()
