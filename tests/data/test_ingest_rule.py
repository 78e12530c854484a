"""The four new formats through the workflow's own rules: ingest_dataset's manifests (counts,
labels, splits, roles), the DAG's per-dataset K, and (with the gallery-aware metrics) one cell."""
from __future__ import annotations

import inspect
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from cfga.data.manifest import evaluation_rows, read_manifest
from cfga.outputs.cells import metrics_record
from tests.data.layouts import write_csv_table, write_folder, write_inshop, write_sop_zip

pytestmark = pytest.mark.workflow

REPO = Path(__file__).resolve().parents[2]


def _snakemake(workdir: Path, config: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cfg = workdir / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", "1", *args, "--configfile", str(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 or not check, f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def _datasets(src: Path) -> dict:
    folder = write_folder(src / "folder", {c: ["1.jpg", "2.jpg", "sub/3.png"] for c in ("d", "c", "b", "a")})
    write_folder(src / "table_root", {"im": [f"{i}.jpg" for i in range(6)]})
    table = write_csv_table(src / "df.csv", ["label", "path", "split", "is_query", "is_gallery"], [
        [0, "im/0.jpg", "train", "", ""], [0, "im/1.jpg", "train", "", ""], [5, "im/2.jpg", "validation", "True", "False"],
        [5, "im/3.jpg", "validation", "False", "True"], [6, "im/4.jpg", "validation", "False", "True"],
        [6, "im/5.jpg", "validation", "True", "True"]])
    sop = write_sop_zip(src / "Stanford_Online_Products.zip", [2, 3], [3, 2, 2])
    img, part, _ = write_inshop(src / "inshop", [2, 2], [(1, 2), (2, 1)])
    return {
        "mine": {"format": "folder", "root": str(folder)},
        "table": {"format": "csv", "table": str(table), "root": str(src / "table_root"), "metrics": {"ks": [1, 3]}},
        "sop": {"format": "sop", "archive": str(sop)},
        "inshop": {"format": "inshop", "images_archive": str(img), "partition": str(part)},
    }


def test_new_formats_through_the_ingest_rule(tmp_path):
    config = {"datasets": _datasets(tmp_path / "src"),
              "models": {"r50": {"arch": "resnet50", "protocol": "scda", "pretrain": {"epochs": 1}}}}
    wd = tmp_path / "wd"
    wd.mkdir()
    names = list(config["datasets"])
    _snakemake(wd, config, *[f"results/manifests/{d}.csv" for d in names])
    m = {d: read_manifest(wd / "results" / "manifests" / f"{d}.csv") for d in names}
    for d in names:
        assert all((wd / "results" / "datasets" / d / r.path).is_file() for r in m[d])
        assert (wd / "logs" / "ingest" / f"{d}.log").is_file()
    assert [(r.class_name, r.label, r.split) for r in m["mine"][::3]] == [
        ("a", 0, "train"), ("b", 1, "train"), ("c", 2, "test"), ("d", 3, "test")]
    assert [(r.is_query, r.is_gallery) for r in evaluation_rows(m["table"])] == [
        (True, False), (False, True), (False, True), (True, True)]
    assert [r.label for r in m["sop"]] == [0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 4]
    assert sum(r.is_query for r in m["inshop"]) == 3 and sum(r.is_gallery for r in m["inshop"]) == 3
    with zipfile.ZipFile(config["datasets"]["sop"]["archive"]) as zf:
        r = m["sop"][-1]
        assert (wd / "results" / "datasets" / "sop" / r.path).read_bytes() == zf.read(f"Stanford_Online_Products/{r.path}")
    # the whole DAG builds, each dataset with its own K (dry run)
    proc = _snakemake(wd, config, "-n", "-p", "all")
    assert "compute_metrics" in proc.stdout + proc.stderr
    # K that are not increasing stop the run at once, naming the key
    config["datasets"]["table"]["metrics"]["ks"] = [4, 2]
    proc = _snakemake(wd, config, "-n", "all", check=False)
    assert proc.returncode != 0 and "datasets.table.metrics.ks" in proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.skipif("is_query" not in inspect.signature(metrics_record).parameters,
                    reason="needs the gallery-aware metrics_record (issue 15, metrics branch)")
def test_inshop_beside_cub_through_all(tmp_path):
    """`all` on In-Shop (queries against its gallery, K up to 50) beside a synthetic CUB (leave-one-out,
    K up to 32): the cells, the long table with both K sets, the plots."""
    import csv

    import numpy as np
    import torch
    import torchvision

    torch.manual_seed(0)
    ckpt = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), ckpt)
    config = {"datasets": {"inshop": _datasets(tmp_path / "src")["inshop"],
                           "cub": {"format": "cub", "synthetic": {"classes": 4, "images_per_class": 4, "seed": 1}}},
              "models": {"r50": {"arch": "resnet50", "protocol": "scda", "checkpoint": str(ckpt)}},
              "extraction": {"device": "cpu", "batch_size": 4},
              "tables": {"published": str(REPO / "paper" / "published_recall_at_1.csv")}}
    wd = tmp_path / "wd"
    wd.mkdir()
    _snakemake(wd, config, "all")
    z = np.load(wd / "results" / "features" / "inshop" / "r50.npz")
    assert len(z["labels"]) == 6  # 3 queries + 3 gallery images, each once
    cell = json.loads((wd / "results" / "metrics" / "inshop" / "r50" / "pooling.json").read_text())
    assert sorted(int(k[7:]) for k in cell if k.startswith("recall@")) == [1, 10, 20, 30, 40, 50]
    assert cell["n_queries"] == 3
    cub = json.loads((wd / "results" / "metrics" / "cub" / "r50" / "pooling.json").read_text())
    assert sorted(int(k[7:]) for k in cub if k.startswith("recall@")) == [1, 2, 4, 8, 16, 32]
    with open(wd / "results" / "tables" / "all_metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [k for k in rows[0] if k.startswith("recall@")] == [f"recall@{k}" for k in (1, 2, 4, 8, 10, 16, 20, 30, 32,
                                                                                      40, 50)]
    assert all((r["recall@10"] == "") == (r["dataset"] == "cub") for r in rows)
    assert all((wd / "results" / "plots" / f"recall_at_k_{d}.png").stat().st_size > 1000 for d in ("cub", "inshop"))
    # the galleries: In-Shop's query rows against its gallery rows only (brute force over them)
    roles = {r.path: (r.is_query, r.is_gallery) for r in read_manifest(wd / "results" / "manifests" / "inshop.csv")}
    paths = [str(p) for p in z["paths"]]
    gallery = [i for i, p in enumerate(paths) if roles[p][1]]
    for f in ("pooling", "scda", "cfga_plus"):
        with open(wd / "results" / "retrieval" / "inshop" / "r50" / f"{f}.csv", newline="") as fh:
            got = list(csv.DictReader(fh))
        x = z[f].astype(np.float64)
        queries = list(dict.fromkeys(r["query"] for r in got))
        assert sorted(queries) == sorted(p for p in paths if roles[p][0])  # 3 queries < retrieval.queries
        for q in queries:
            sims = x[paths.index(q)] @ x[gallery].T
            want = [paths[gallery[j]] for j in np.argsort(-sims, kind="stable")]  # k: all 3 gallery images
            assert [r["neighbour"] for r in got if r["query"] == q] == want


@pytest.mark.parametrize("name,ks", [("configs/sop.yaml", (1, 10, 100, 1000)), ("configs/inshop.yaml", (1, 10, 20, 30, 40, 50))])
def test_sop_and_inshop_configs_validate(name, ks):
    from snakemake.utils import validate

    from cfga.registry.datasets import dataset_ks

    cfg = yaml.safe_load((REPO / name).read_text())
    validate(cfg, str(REPO / "schemas" / "config.schema.yaml"))
    assert [dataset_ks(d) for d in cfg["datasets"].values()] == [ks]


@pytest.mark.parametrize("fmt", ["cub", "cars", "folder", "csv", "sop", "inshop"])
def test_schema_knows_every_format_and_allows_synthetic_only_with_a_writer(fmt):
    from snakemake.utils import validate

    from cfga.registry.datasets import FORMATS

    schema = str(REPO / "schemas" / "config.schema.yaml")
    model = {"r50": {"arch": "resnet50", "protocol": "scda", "checkpoint": "x.pth"}}
    real = {"format": fmt, **{k: f"path/{k}" for k in FORMATS[fmt].files}}
    validate({"datasets": {"d": real}, "models": model}, schema)
    synthetic = {"datasets": {"d": {"format": fmt, "synthetic": {"classes": 4, "images_per_class": 4}}}, "models": model}
    if FORMATS[fmt].synthetic:
        validate(synthetic, schema)
    else:
        with pytest.raises(Exception):
            validate(synthetic, schema)
