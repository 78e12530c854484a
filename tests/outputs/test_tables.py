"""Paper-layout tables: published values only beside real rows that name a paper row."""
from cfga.outputs.tables import load_published, long_rows, table5
from cfga.registry.features import RECALL_KS, TABLE5_COLUMNS
from tests.helpers import REPO

PUBLISHED = REPO / "paper" / "published_recall_at_1.csv"


def _cell(dataset, model, feature, r1):
    return {"dataset": dataset, "model": model, "feature": feature, "dim": 1, "n_queries": 10,
            **{f"recall@{k}": min(1.0, r1 + 0.01 * (k - 1)) for k in RECALL_KS}, "map@r": 0.1}


def test_published_csv_has_every_table5_cell():
    pub = load_published(PUBLISHED)
    assert pub[("table5", "cub", "resnet50_imagenet", "cfga_plus")] == 63.3
    assert pub[("table5", "cars", "resnet152_imagenet", "cfga_4_2_3")] == 48.0
    for ds in ("cub", "cars"):
        for m in ("resnet50_imagenet", "resnet101_imagenet", "resnet152_imagenet"):
            assert all(("table5", ds, m, f) in pub for f in TABLE5_COLUMNS)


def test_table5_real_row_gets_paper_values_synthetic_row_never():
    cells = [_cell("cub", "r50", f, 0.6321) for f in TABLE5_COLUMNS]
    cells += [_cell("synth", "r50", f, 0.25) for f in TABLE5_COLUMNS]
    datasets = {"cub": {"format": "cub", "archive": "x", "paper": "cub"},
                "synth": {"format": "cub", "synthetic": {"classes": 4, "images_per_class": 4}}}
    models = {"r50": {"arch": "resnet50", "protocol": "scda", "checkpoint": "y", "paper": "resnet50_imagenet"}}
    header, rows, md = table5(cells, datasets, models, load_published(PUBLISHED))
    real, synth = rows
    assert header[:6] == ["dataset", "model", "row", "data", "paper_dataset", "paper_model"]
    assert real[header.index("CFGA+")] == "63.2" and real[header.index("CFGA+ (paper)")] == "63.3"
    assert real[header.index("Pooling (paper)")] == "55.2"
    assert synth[header.index("CFGA+")] == "25.0" and synth[header.index("CFGA+ (paper)")] == ""
    assert "63.2 (63.3)" in md and "synthetic (not comparable to the paper)" in md
    assert "| synth | r50 | Pre-trained | synthetic (not comparable to the paper) | 25.0 |" in md


def test_long_rows_one_row_per_cell_sorted_by_feature_order():
    cells = [_cell("d", "m", f, 0.5) for f in reversed(TABLE5_COLUMNS)]
    header, rows = long_rows(cells)
    assert header[-1] == "map@r" and len(rows) == len(TABLE5_COLUMNS)
    assert [r[2] for r in rows][:3] == ["pooling", "scda", "cfga_4_1_1"]


def test_table3_and_6_rows_embedding_dims_and_missing_rows_note():
    from cfga.outputs.tables import paper_table
    from cfga.registry.features import CFGA_FEATURES

    pre = [_cell("cars", "r50", f, 0.5) for f in ("scda", "cfga_plus", *CFGA_FEATURES)]
    ms = [dict(_cell("cars", "ms", f, 0.7), dim=512 if f == "embedding" else 1)
          for f in ("embedding", "scda", "scda_original", "cfga_plus", *CFGA_FEATURES)]
    datasets = {"cars": {"format": "cars", "images_archive": "a", "annotations": "b", "paper": "cars"}}
    models = {
        "ms": {"arch": "resnet50", "protocol": "ms", "checkpoint": "c", "paper": "msloss"},
        "r50": {"arch": "resnet50", "protocol": "scda", "checkpoint": "y", "paper": "resnet50_imagenet"},
    }
    pub = load_published(PUBLISHED)
    header, rows, md = paper_table("table3", pre + ms, datasets, models, pub)
    assert [r[2] for r in rows] == ["Pre-trained", "MS loss"]  # the paper's row order
    pre_row = rows[0]
    # the Pre-trained row's embedding is SCDA, compared with the published SCDA value
    assert pre_row[header.index("embedding")] == "50.0"
    assert pre_row[header.index("embedding (paper)")] == f"{pub[('table3', 'cars', 'resnet50_imagenet', 'scda')]:.1f}"
    assert rows[1][header.index("embedding_dim")] == "512"
    assert "[512-d]" in md and "DGPCRL is a loader-only row" in md
    header6, rows6, md6 = paper_table("table6", pre + ms, datasets, models, pub)
    assert [r[1] for r in rows6] == ["ms"]  # no ImageNet row in Table 6
    assert rows6[0][header6.index("SCDA original (paper)")] == f"{pub[('table6', 'cars', 'msloss', 'scda_original')]:.1f}"
