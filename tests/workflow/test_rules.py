"""The Snakemake DAG on a tiny config: one real end-to-end run (outputs, then a no-op rerun), and
dry runs where the plan shows the answer (one-cell targets, config errors)."""
import csv
import json

import numpy as np
import pytest

from cfga.registry.features import FEATURES, RECALL_KS, features_for
from tests.workflow.smk import TINY, planned, snakemake

pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def run_all(tmp_path_factory):
    """The one real run of the workflow here: `all` of TINY (synthetic data, pretraining, DML
    training, extraction, metrics, tables, plots)."""
    wd = tmp_path_factory.mktemp("wf")
    snakemake(wd, "all")
    return wd


@pytest.mark.slow
def test_all_produces_manifests_features_metrics_tables(run_all):
    wd = run_all
    for ds in TINY["datasets"]:
        with open(wd / f"results/manifests/{ds}.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert list(rows[0]) == ["split", "label", "class_name", "path", "is_query", "is_gallery"]
        assert all((r["is_query"], r["is_gallery"]) == (("1", "1") if r["split"] == "test" else ("0", "0")) for r in rows)
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


@pytest.mark.slow
def test_second_run_does_nothing(run_all):
    proc = snakemake(run_all, "-n", "all")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_one_cell_builds_only_its_chain(tmp_path):
    """The plan (dry run) for one cell: exactly the chain that cell needs, nothing of the other
    dataset, no other cell, no tables."""
    target = "results/metrics/tiny_cars/tiny_r50/cfga_plus.json"
    proc = snakemake(tmp_path, "-n", target)
    log = proc.stdout + proc.stderr
    for rule, n in [("synthesize_cars", 1), ("ingest_dataset", 1), ("pretrain_backbone", 1),
                    ("extract_features", 1), ("compute_metrics", 1)]:
        assert any(line.split()[:2] == [rule, str(n)] for line in log.splitlines()), (rule, log[-3000:])
    made = {p for job in planned(proc) for p in job["output"]}
    assert target in made
    assert not any("tiny_cub" in p for p in made)
    assert [p for p in made if p.startswith("results/metrics/")] == [target]
    assert not any(p.startswith("results/tables") for p in made)
    assert not (tmp_path / "results").exists()  # a dry run writes nothing


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
