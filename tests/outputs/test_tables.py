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


# results/tables/transformers.{csv,md} of a small run, pinned byte for byte: two datasets with
# Transformer rows (one synthetic, one real) and one without; models in config order (ViT before
# Swin), a ResNet that is never listed, cells missing here and there, values that round.
TRANSFORMER_DATASETS = {"synth": {"format": "cub", "synthetic": {"classes": 4, "images_per_class": 4}},
                        "cub": {"format": "cub", "archive": "x", "paper": "cub"},
                        "cars": {"format": "cars", "images_archive": "a", "annotations": "b"}}
TRANSFORMER_MODELS = {"vit": {"arch": "vit_b_16", "protocol": "scda_224", "checkpoint": "v"},
                      "r50": {"arch": "resnet50", "protocol": "scda", "checkpoint": "y", "paper": "resnet50_imagenet"},
                      "sw": {"arch": "swin_t", "protocol": "scda", "checkpoint": "s"},
                      "swms": {"arch": "swin_t", "protocol": "ms", "checkpoint": "m"}}
TRANSFORMERS_CSV = (
    'dataset,model,arch,protocol,data,embedding,Pooling,SCDA,CFGA+,CFGA b0 qkv,CFGA b0 proj,CFGA b0 '
    'fc1,CFGA b0 fc2,CFGA b1 qkv,CFGA b1 proj,CFGA b1 fc1,CFGA b1 fc2,Class token\n'
    'synth,vit,vit_b_16,scda_224,synthetic,,,0.1,,25.0,4.5,,50.0,12.3,,100.0,100.0,\n'
    'synth,sw,swin_t,scda,synthetic,,100.0,100.0,4.5,4.5,87.5,50.0,12.3,0.1,100.0,100.0,25.0,\n'
    'synth,swms,swin_t,ms,synthetic,31.2,,31.2,,,,,,,,,,\n'
    'cub,sw,swin_t,scda,real,,50.0,12.3,100.0,100.0,100.0,25.0,4.5,87.5,50.0,12.3,0.1,\n'
)
TRANSFORMERS_MD = (
    '| Dataset | Model | Arch | Protocol | Data | embedding | Pooling | SCDA | CFGA+ | CFGA b0 qkv | '
    'CFGA b0 proj | CFGA b0 fc1 | CFGA b0 fc2 | CFGA b1 qkv | CFGA b1 proj | CFGA b1 fc1 | CFGA b1 fc2 | '
    'Class token |\n'
    '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n'
    '| synth | vit | vit_b_16 | scda_224 | synthetic |  |  | 0.1 |  | 25.0 | 4.5 |  | 50.0 | 12.3 |  | '
    '100.0 | 100.0 |  |\n'
    '| synth | sw | swin_t | scda | synthetic |  | 100.0 | 100.0 | 4.5 | 4.5 | 87.5 | 50.0 | 12.3 | 0.1 '
    '| 100.0 | 100.0 | 25.0 |  |\n'
    '| synth | swms | swin_t | ms | synthetic | 31.2 |  | 31.2 |  |  |  |  |  |  |  |  |  |  |\n'
    '| cub | sw | swin_t | scda | real |  | 50.0 | 12.3 | 100.0 | 100.0 | 100.0 | 25.0 | 4.5 | 87.5 | '
    '50.0 | 12.3 | 0.1 |  |\n'
    '\n'
    'Recall@1 in %. No published values exist for these rows: the authors never released their '
    'Transformer code or per-layer numbers (TRANSFORMERS.md). CFGA b0 / b1: the second-to-last / last '
    'block (Swin: stage 4 blocks 0 and 1; ViT with L layers: encoder layers L-2 and L-1); CFGA+ = [qkv '
    'b0; qkv b1]. Dimensions: C (qkv, proj, fc1, class token), 4C (fc2), 2C (Pooling, SCDA, CFGA+), 512 '
    '(embedding).\n'
)


def _transformer_cells():
    from cfga.registry.features import features_for

    vals = [0.5, 0.123456, 0.0005, 1.0, 0.99951, 0.25, 0.0449999, 0.875]
    cells = []
    for i, f in enumerate(features_for("scda", "swin_t")):
        cells += [_cell("cub", "sw", f, vals[i % 8]), _cell("synth", "sw", f, vals[(i + 3) % 8])]
    cells += [_cell("synth", "vit", f, vals[(i + 1) % 8])
              for i, f in enumerate(features_for("scda_224", "vit_b_16")) if i % 3]
    cells += [_cell("synth", "swms", f, 0.3125) for f in features_for("ms", "swin_t")[:2]]
    cells += [_cell(d, "r50", f, 0.75) for d in ("synth", "cub", "cars") for f in features_for("scda")]
    return cells[::-1]


def _written(tmp_path, header, rows, md):
    """The bytes make_tables writes for one table: (csv, md)."""
    from cfga import files

    files.write_csv(tmp_path / "t.csv", header, rows)
    files.write_text(tmp_path / "t.md", md)
    return (tmp_path / "t.csv").read_text(encoding="utf-8"), (tmp_path / "t.md").read_text(encoding="utf-8")


def test_transformer_table_bytes_are_pinned(tmp_path):
    from cfga.outputs.tables import paper_table

    out = paper_table("transformers", _transformer_cells(), TRANSFORMER_DATASETS, TRANSFORMER_MODELS, {})
    assert _written(tmp_path, *out) == (TRANSFORMERS_CSV, TRANSFORMERS_MD)
    # no Transformer model (or no cell at all): the header, no row, and a note saying so
    head, sep, *_, blank, note, _ = TRANSFORMERS_MD.split("\n")
    no_rows = (TRANSFORMERS_CSV.split("\n")[0] + "\n",
               "\n".join([head, sep, blank, note, "This run has no Swin or ViT model.", ""]))
    for cells in ([_cell("synth", "r50", "scda", 0.5)], []):
        out = paper_table("transformers", cells, TRANSFORMER_DATASETS, TRANSFORMER_MODELS, {})
        assert out[1] == [] and _written(tmp_path, *out) == no_rows
