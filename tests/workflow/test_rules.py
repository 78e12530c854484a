"""The Snakemake DAG end to end on a tiny config: outputs, no-op rerun, one-cell targets, config errors."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from cfga.registry.features import FEATURES, RECALL_KS, features_for

pytestmark = pytest.mark.workflow

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "datasets": {
        "tiny_cub": {"format": "cub", "synthetic": {"classes": 6, "images_per_class": 5, "seed": 3}},
        "tiny_cars": {"format": "cars", "synthetic": {"classes": 6, "images_per_class": 5, "seed": 4}},
    },
    "models": {
        "tiny_r50": {"arch": "resnet50", "protocol": "scda",
                     "pretrain": {"epochs": 1, "image_size": 48, "batch_size": 8, "seed": 0}},
        # a DML model trained by the pipeline (authors' ms format), on one dataset only
        "tiny_ms": {"arch": "resnet50", "protocol": "ms", "datasets": ["tiny_cub"],
                    "train": {"loss": "ms", "from": "tiny_r50", "epochs": 1, "image_size": 48, "batch_size": 8}},
    },
    "extraction": {"device": "cpu", "batch_size": 4},
    "tables": {"published": str(REPO / "paper" / "published_recall_at_1.csv")},
}


def snakemake(workdir, *args, config=TINY, check=True):
    cfg = Path(workdir) / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
           str(workdir), "--cores", "2", *args, "--configfile", str(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def run_all(tmp_path_factory):
    wd = tmp_path_factory.mktemp("wf")
    snakemake(wd, "all")
    return wd


def test_all_produces_manifests_features_metrics_tables(run_all):
    wd = run_all
    for ds in TINY["datasets"]:
        with open(wd / f"results/manifests/{ds}.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert list(rows[0]) == ["split", "label", "class_name", "path"]
        test = [r for r in rows if r["split"] == "test"]
        assert len(rows) == 30 and len(test) == 15
        assert {int(r["label"]) for r in test} == {3, 4, 5}  # classes 4–6, labels not renumbered

        z = np.load(wd / f"results/features/{ds}/tiny_r50.npz")
        assert z["labels"].tolist() == [int(r["label"]) for r in test]
        assert z["paths"].tolist() == [r["path"] for r in test]
        meta = json.loads(str(z["meta_json"]))
        assert len(meta["checkpoint_sha256"]) == 64 and len(meta["manifest_sha256"]) == 64
        for f in features_for("scda"):
            assert z[f].dtype == np.float32 and z[f].shape == (15, FEATURES[f].dim)
            m = json.loads((wd / f"results/metrics/{ds}/tiny_r50/{f}.json").read_text())
            assert set(f"recall@{k}" for k in RECALL_KS) | {"map@r"} <= set(m)
            assert 0 <= m["recall@1"] <= m["recall@32"] <= 1
        assert (wd / f"results/plots/recall_at_k_{ds}.png").stat().st_size > 1000

    md = (wd / "results/tables/table5.md").read_text()
    assert "tiny_cub" in md and "synthetic (not comparable" in md and "CFGA+" in md
    with open(wd / "results/tables/table5.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 2 and all(r["data"] == "synthetic" and r["CFGA+ (paper)"] == "" for r in table)
    with open(wd / "results/tables/all_metrics.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 2 * len(features_for("scda")) + len(features_for("ms"))
    # the trained DML model: authors' ms checkpoint layout, its own rows in Tables 3 and 6, never on Cars
    import torch

    ck = torch.load(wd / "results/checkpoints/trained/tiny_cub/tiny_ms.pth", weights_only=True)
    assert set(ck) >= {"model"} and ck["model"]["class_fc.weight"].shape == (512, 2048)
    settings = json.loads((wd / "results/checkpoints/trained/tiny_cub/tiny_ms.json").read_text())
    assert settings["loss"] == "ms" and all(np.isfinite(h["loss"]) for h in settings["history"])
    assert not (wd / "results/features/tiny_cars/tiny_ms.npz").exists()
    t3 = (wd / "results/tables/table3.md").read_text()
    assert "| tiny_cub | tiny_ms | MS loss |" in t3 and "| tiny_cub | tiny_r50 | Pre-trained |" in t3
    assert "| tiny_cub | tiny_ms | MS loss |" in (wd / "results/tables/table6.md").read_text()
    # every rule wrote its log
    assert (wd / "logs/features/tiny_cub/tiny_r50.log").read_text().strip()


def test_second_run_does_nothing(run_all):
    proc = snakemake(run_all, "all")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_one_cell_builds_only_its_chain(tmp_path):
    target = "results/metrics/tiny_cars/tiny_r50/cfga_plus.json"
    proc = snakemake(tmp_path, target)
    assert (tmp_path / target).exists()
    log = proc.stdout + proc.stderr
    for rule, n in [("synthesize_cars", 1), ("ingest_dataset", 1), ("pretrain_backbone", 1),
                    ("extract_features", 1), ("compute_metrics", 1)]:
        assert any(line.split()[:2] == [rule, str(n)] for line in log.splitlines()), (rule, log[-3000:])
    made = {p.relative_to(tmp_path).as_posix() for p in (tmp_path / "results").rglob("*") if p.is_file()}
    assert not any("tiny_cub" in p for p in made)
    assert [p for p in made if p.startswith("results/metrics/")] == [target]
    assert not (tmp_path / "results/tables").exists()


def test_config_typo_fails_naming_the_key(tmp_path):
    bad = json.loads(json.dumps(TINY))
    bad["datasets"]["tiny_cub"]["synthetc"] = bad["datasets"]["tiny_cub"].pop("synthetic")
    proc = snakemake(tmp_path, "-n", "all", config=bad, check=False)
    assert proc.returncode != 0
    assert "synthetc" in proc.stdout + proc.stderr


def test_wrong_type_fails_naming_the_key(tmp_path):
    bad = json.loads(json.dumps(TINY))
    bad["models"]["tiny_r50"]["arch"] = "resnet18"
    proc = snakemake(tmp_path, "-n", "all", config=bad, check=False)
    assert proc.returncode != 0 and "resnet18" in proc.stdout + proc.stderr
