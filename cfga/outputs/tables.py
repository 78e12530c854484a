"""Paper-style tables from the per-cell metrics JSON files.

Table 5 layout: rows = dataset × model (``scda`` protocol), columns Pooling, SCDA, CFGA+,
CFGA 4-1-1 … 4-2-3, Recall@1 in % with one decimal. A row is compared with the paper only when
its dataset and model both name a paper row (config ``paper:`` keys); synthetic rows never are.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from cfga.registry.archs import arch_info
from cfga.registry.features import (
    CFGA_FEATURES,
    FEATURES,
    RECALL_KS,
    TABLE5_COLUMNS,
    TRANSFORMER_LAYERS,
    transformer_blocks,
    transformer_cfga_name,
)

METRIC_KEYS = tuple(f"recall@{k}" for k in RECALL_KS) + ("map@r",)


def read_cells(paths: Iterable[str | os.PathLike]) -> list[dict]:
    """Load every metrics JSON; → list of records (see ``cfga.cells.metrics_record``)."""
    cells = []
    for p in paths:
        with open(p, encoding="utf-8") as fh:
            cells.append(json.load(fh))
    return cells


def load_published(path: str | os.PathLike) -> dict[tuple[str, str, str, str], float]:
    """(table, dataset, model, feature) → published R@1 in %."""
    with open(path, newline="", encoding="utf-8") as fh:
        return {
            (r["table"], r["dataset"], r["model"], r["feature"]): float(r["recall_at_1"])
            for r in csv.DictReader(fh)
        }


def pct(x: float) -> str:
    """A fraction as a percentage with one decimal, the paper's format."""
    return f"{100 * x:.1f}"


def long_rows(cells: Sequence[Mapping]) -> tuple[list[str], list[list]]:
    """all_metrics.csv: one row per cell, every metric as a fraction."""
    header = ["dataset", "model", "feature", "paper_column", "dim", "n_queries", *METRIC_KEYS]
    rows = [
        [c["dataset"], c["model"], c["feature"], FEATURES[c["feature"]].column, c["dim"], c["n_queries"],
         *[f"{c[k]:.6f}" for k in METRIC_KEYS]]
        for c in sorted(cells, key=lambda c: (c["dataset"], c["model"], list(FEATURES).index(c["feature"])))
    ]
    return header, rows


def _row_kind(dataset_cfg: Mapping) -> str:
    return "synthetic" if "synthetic" in dataset_cfg else "real"


@dataclass(frozen=True)
class TableSpec:
    """A paper table: its columns (feature names; "embedding" means the row's own embedding,
    which is SCDA for the ImageNet "Pre-trained" row) and the protocols whose models it lists."""

    name: str
    title: str
    columns: tuple[str, ...]
    protocols: tuple[str, ...]


TABLES: dict[str, TableSpec] = {
    "table5": TableSpec("table5", "Table 5", TABLE5_COLUMNS, ("scda",)),
    "table3": TableSpec("table3", "Table 3", ("embedding", "cfga_plus", *CFGA_FEATURES),
                        ("scda", "ms", "proxy_anchor", "dgpcrl")),
    "table6": TableSpec("table6", "Table 6", ("embedding", "scda", "scda_original", "cfga_plus"), ("ms", "dgpcrl")),
}

# Row families of Tables 3 and 6, in the paper's row order, with the published file's model key.
FAMILIES: dict[str, str] = {
    "resnet50_imagenet": "Pre-trained",
    "msloss": "MS loss",
    "proxy_anchor": "Proxy Anchor",
    "dgpcrl": "DGPCRL",
    "cosface": "CosFace",
    "arcface": "ArcFace",
}
_LOSS_FAMILY = {"ms": "msloss", "proxy_anchor": "proxy_anchor", "cosface": "cosface", "arcface": "arcface"}


def model_family(mcfg: Mapping) -> str:
    """Which paper row kind a model is: explicit ``family:``, its training loss, or its protocol."""
    if "family" in mcfg:
        return mcfg["family"]
    if mcfg.get("paper") in FAMILIES:
        return mcfg["paper"]
    if mcfg["protocol"] == "scda":
        return "resnet50_imagenet"
    if "train" in mcfg:
        return _LOSS_FAMILY[mcfg["train"]["loss"]]
    return {"proxy_anchor": "proxy_anchor", "dgpcrl": "dgpcrl"}.get(mcfg["protocol"], "msloss")


def _feature_for(column: str, protocol: str) -> str:
    return "scda" if column == "embedding" and protocol == "scda" else column


def paper_table(
    spec: TableSpec | str,
    cells: Sequence[Mapping],
    datasets: Mapping[str, Mapping],
    models: Mapping[str, Mapping],
    published: Mapping[tuple[str, str, str, str], float],
) -> tuple[list[str], list[list[str]], str]:
    """→ (csv header, csv rows, markdown text) of one paper-layout table (R@1 in %)."""
    if spec == "transformers":
        return transformer_table(cells, datasets, models)
    spec = TABLES[spec] if isinstance(spec, str) else spec
    by_key = {(c["dataset"], c["model"], c["feature"]): c for c in cells}
    cols = [FEATURES[f].column for f in spec.columns]
    header = ["dataset", "model", "row", "data", "paper_dataset", "paper_model", "embedding_dim"]
    for col in cols:
        header += [col, f"{col} (paper)"]
    md = [
        "| Dataset | Model | Row | Data | " + " | ".join(cols) + " |",
        "|---|---|---|---|" + "---|" * len(cols),
    ]
    order = list(FAMILIES)
    entries = [(d, m) for d in datasets for m in sorted(models, key=lambda m: order.index(model_family(models[m])))]
    rows = []
    for d, m in entries:
        dcfg, mcfg = datasets[d], models[m]
        proto = mcfg["protocol"]
        if proto not in spec.protocols or arch_info(mcfg["arch"]).family != "resnet":
            continue
        feats = [_feature_for(c, proto) for c in spec.columns]
        if not any((d, m, f) in by_key for f in feats):
            continue
        kind = _row_kind(dcfg)
        pd_, pm = (dcfg.get("paper"), mcfg.get("paper")) if kind == "real" else (None, None)
        emb = by_key.get((d, m, feats[0]))
        family = FAMILIES[model_family(mcfg)]
        row = [d, m, family, kind, pd_ or "", pm or "", str(emb["dim"]) if emb else ""]
        md_cells = []
        for f in feats:
            c = by_key.get((d, m, f))
            ours = pct(c["recall@1"]) if c else ""
            paper = published.get((spec.name, pd_, pm, f)) if pd_ and pm else None
            row += [ours, "" if paper is None else f"{paper:.1f}"]
            md_cells.append(ours + (f" ({paper:.1f})" if paper is not None else ""))
        label = "synthetic (not comparable to the paper)" if kind == "synthetic" else (
            f"paper row {pd_}/{pm}" if pd_ and pm else "real (no paper row)")
        if spec.columns[0] == "embedding" and emb:
            md_cells[0] += f" [{emb['dim']}-d]"
        rows.append(row)
        md.append(f"| {d} | {m} | {family} | {label} | " + " | ".join(md_cells) + " |")
    dims = ", ".join(f"{FEATURES[f].column} {FEATURES[f].dim}" for f in spec.columns if f != "embedding")
    note = [
        "",
        f"Recall@1 in %. In parentheses: the published value ({spec.title}), shown only for rows whose "
        "dataset and model are the paper's. Dimensions: " + dims + ("; embedding dimension in brackets"
                                                                    if "embedding" in spec.columns else "") + ".",
    ]
    if spec.name in ("table3", "table6"):
        present = {FAMILIES[model_family(models[m])] for _, m, *_ in rows}
        missing = [FAMILIES[f] for f in FAMILIES if FAMILIES[f] not in present and
                   (spec.name == "table3" or f not in ("resnet50_imagenet", "proxy_anchor"))]
        if missing:
            note.append(f"No model of this run fills: {', '.join(missing)}"
                        + (" (DGPCRL is a loader-only row: give the authors' checkpoint)." if "DGPCRL" in missing else "."))
    return header, rows, "\n".join(md) + "\n" + "\n".join(note) + "\n"


def table5(cells, datasets, models, published):
    """Table 5: ImageNet backbones (``scda`` protocol)."""
    return paper_table("table5", cells, datasets, models, published)


# The Transformer table's columns (TRANSFORMERS.md §6): a row's own embedding (DML rows), the
# image-level features, CFGA+, the eight CFGA layers as (block, layer) -- b0 is the second-to-last
# block, b1 the last -- and the ViT class token.
TRANSFORMER_COLUMNS: tuple[tuple[str, str | tuple[int, str]], ...] = (
    ("embedding", "embedding"), ("Pooling", "pooling"), ("SCDA", "scda"), ("CFGA+", "cfga_plus"),
    *[(f"CFGA b{b} {layer}", (b, layer)) for b in (0, 1) for layer in TRANSFORMER_LAYERS],
    ("Class token", "class_token"),
)


def transformer_table(cells: Sequence[Mapping], datasets: Mapping[str, Mapping],
                      models: Mapping[str, Mapping]) -> tuple[list[str], list[list[str]], str]:
    """results/tables/transformers: rows dataset × Swin/ViT model, R@1 in %. There are no
    published values (the authors never released their Transformer code or numbers)."""
    by_key = {(c["dataset"], c["model"], c["feature"]): c for c in cells}
    cols = [c for c, _ in TRANSFORMER_COLUMNS]
    header = ["dataset", "model", "arch", "protocol", "data", *cols]
    md = ["| Dataset | Model | Arch | Protocol | Data | " + " | ".join(cols) + " |",
          "|---|---|---|---|---|" + "---|" * len(cols)]
    rows = []
    for d in datasets:
        for m, mcfg in models.items():
            if arch_info(mcfg["arch"]).family == "resnet":
                continue
            blocks = transformer_blocks(mcfg["arch"])
            feats = [f if isinstance(f, str) else transformer_cfga_name(blocks[f[0]], f[1])
                     for _, f in TRANSFORMER_COLUMNS]
            if not any((d, m, f) in by_key for f in feats):
                continue
            vals = [pct(by_key[(d, m, f)]["recall@1"]) if (d, m, f) in by_key else "" for f in feats]
            kind = _row_kind(datasets[d])
            rows.append([d, m, mcfg["arch"], mcfg["protocol"], kind, *vals])
            md.append(f"| {d} | {m} | {mcfg['arch']} | {mcfg['protocol']} | {kind} | " + " | ".join(vals) + " |")
    note = ["", "Recall@1 in %. No published values exist for these rows: the authors never released their "
            "Transformer code or per-layer numbers (TRANSFORMERS.md). CFGA b0 / b1: the second-to-last / last "
            "block (Swin: stage 4 blocks 0 and 1; ViT with L layers: encoder layers L-2 and L-1); CFGA+ = "
            "[qkv b0; qkv b1]. Dimensions: C (qkv, proj, fc1, class token), 4C (fc2), 2C (Pooling, SCDA, CFGA+), "
            "512 (embedding)."]
    if not rows:
        note.append("This run has no Swin or ViT model.")
    return header, rows, "\n".join(md) + "\n" + "\n".join(note) + "\n"
