"""Rules pass only what a job reads: the tables' reduced config gives the same tables."""
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from cfga.outputs.tables import TABLES, load_published, paper_table, table_config
from cfga.registry.features import RECALL_KS, features_for

REPO = Path(__file__).resolve().parents[2]


def cells_for(cfg):
    out = []
    for m, mc in cfg["models"].items():
        for i, d in enumerate(mc.get("datasets", cfg["datasets"])):
            for j, f in enumerate(features_for(mc["protocol"], mc["arch"])):
                r1 = (7 * i + 3 * j + len(m)) % 50 / 100
                out.append({"dataset": d, "model": m, "feature": f, "dim": 512, "n_queries": 10,
                            **{f"recall@{k}": min(1.0, r1 + 0.01 * k) for k in RECALL_KS}, "map@r": 0.1})
    return out


@pytest.mark.parametrize("name", ["config.yaml", "configs/paper.yaml"])
def test_reduced_config_gives_the_same_tables(name):
    cfg = yaml.safe_load((REPO / name).read_text())
    validate(cfg, str(REPO / "schemas/config.schema.yaml"))
    cells = cells_for(cfg)
    published = load_published(REPO / "paper/published_recall_at_1.csv")
    ds, ms = table_config(cfg["datasets"], cfg["models"])
    assert list(ds) == list(cfg["datasets"]) and list(ms) == list(cfg["models"])
    for t in (*TABLES, "transformers"):
        assert paper_table(t, cells, ds, ms, published) == paper_table(t, cells, cfg["datasets"], cfg["models"],
                                                                      published)
