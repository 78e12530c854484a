"""Transformer models in the workflow: the registry's names per (arch, protocol), the
Transformer table, and the config's family ↔ protocol rule (a misfit stops at planning)."""
import json

import pytest

from cfga.outputs.tables import paper_table, table5
from cfga.registry.features import RECALL_KS, feature_dim, features_for
from tests.workflow.smk import TINY, snakemake


def _cell(dataset, model, feature, r1):
    return {"dataset": dataset, "model": model, "feature": feature, "dim": 1, "n_queries": 10,
            **{f"recall@{k}": r1 for k in RECALL_KS}, "map@r": 0.1}


def test_registry_names_and_dims():
    swin = features_for("scda", "swin_t")
    assert swin[:3] == ("pooling", "scda", "scda_original") and swin[-1] == "cfga_plus"
    assert swin[3:11] == tuple(f"cfga_4_{b}_{l}" for b in (0, 1) for l in ("qkv", "proj", "fc1", "fc2"))
    assert features_for("scda", "resnet50") == features_for("scda")  # ResNet entries unchanged
    vit = features_for("scda_224", "vit_l_16")
    assert "class_token" in vit and "cfga_22_qkv" in vit and "cfga_23_fc2" in vit
    assert feature_dim("cfga_23_fc2", "scda_224", "vit_l_16") == 4096
    assert feature_dim("cfga_plus", "scda", "swin_b") == 2048 and feature_dim("pooling", "scda", "swin_t") == 1536
    assert features_for("ms", "swin_t")[0] == "embedding"
    with pytest.raises(ValueError, match="scda_224"):
        features_for("scda", "vit_b_16")
    with pytest.raises(ValueError, match="does not fit"):
        features_for("proxy_anchor", "swin_t")


def test_transformer_table_rows_and_no_paper_values():
    datasets = {"synth": {"format": "cub", "synthetic": {"classes": 4, "images_per_class": 4}}}
    models = {"r50": {"arch": "resnet50", "protocol": "scda", "checkpoint": "y"},
              "sw": {"arch": "swin_t", "protocol": "scda", "checkpoint": "s"},
              "vit": {"arch": "vit_b_16", "protocol": "scda_224", "checkpoint": "v"}}
    cells = [_cell("synth", "sw", f, 0.5) for f in features_for("scda", "swin_t")]
    cells += [_cell("synth", "vit", f, 0.25) for f in features_for("scda_224", "vit_b_16")]
    cells += [_cell("synth", "r50", f, 0.75) for f in features_for("scda")]
    header, rows, md = paper_table("transformers", cells, datasets, models, {})
    assert [r[1] for r in rows] == ["sw", "vit"]
    sw, vit = rows
    assert sw[header.index("CFGA b0 qkv")] == "50.0" and sw[header.index("Class token")] == ""
    assert vit[header.index("CFGA b1 fc2")] == "25.0" and vit[header.index("Class token")] == "25.0"
    assert "No published values" in md
    # the ResNet tables list no Transformer row
    _, rows5, _ = table5(cells, datasets, models, {})
    assert [r[1] for r in rows5] == ["r50"]


@pytest.mark.workflow
def test_vit_with_scda_stops_at_planning(tmp_path):
    bad = json.loads(json.dumps(TINY))
    bad["models"]["tiny_vit"] = {"arch": "vit_b_16", "protocol": "scda", "checkpoint": "x.pth"}
    proc = snakemake(tmp_path, "-n", "all", config=bad, check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "models.tiny_vit" in out and "scda_224" in out


@pytest.mark.workflow
def test_swin_model_plans_its_cells_and_the_transformer_table(tmp_path):
    cfg = json.loads(json.dumps(TINY))
    cfg["models"]["tiny_swin"] = {"arch": "swin_t", "protocol": "scda",
                                  "pretrain": {"epochs": 1, "image_size": 48, "batch_size": 8}}
    cfg["models"]["tiny_swin_ms"] = {"arch": "swin_t", "protocol": "ms", "datasets": ["tiny_cub"],
                                     "train": {"loss": "ms", "from": "tiny_swin", "epochs": 1, "image_size": 48,
                                               "batch_size": 8}}
    proc = snakemake(tmp_path, "-n", "all", config=cfg)
    out = proc.stdout + proc.stderr
    assert "results/metrics/tiny_cub/tiny_swin/cfga_4_1_fc2.json" in out
    assert "results/metrics/tiny_cub/tiny_swin_ms/embedding.json" in out
    assert "results/checkpoints/trained/tiny_cub/tiny_swin_ms.pth" in out
    assert "results/tables/transformers.md" in out
    for m in ("tiny_swin", "tiny_swin_ms"):  # CFGA maps for every family (the qkv layers')
        assert f"results/heatmaps/tiny_cub/{m}.png" in out
    bad = json.loads(json.dumps(cfg))
    bad["models"]["tiny_swin_ms"]["train"]["loss"] = "proxy_anchor"
    bad["models"]["tiny_swin_ms"]["protocol"] = "proxy_anchor"
    proc = snakemake(tmp_path, "-n", "all", config=bad, check=False)
    assert proc.returncode != 0 and "protocols for swin" in proc.stdout + proc.stderr
