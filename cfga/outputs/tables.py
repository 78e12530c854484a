"""Paper-style tables from the per-cell metrics JSON files, built with pandas.

One long table holds every cell (dataset, model, feature → metrics); each paper table is that
table filtered to its protocols and pivoted into the paper's layout (rows dataset × model,
columns the paper's features), written as CSV and Markdown. Recall@1 in % with one decimal. A row
is compared with the paper only when its dataset and model both name a paper row (config
``paper:`` keys); synthetic rows never are.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import pandas as pd

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
from cfga.registry.losses import LOSSES

METRIC_KEYS = tuple(f"recall@{k}" for k in RECALL_KS) + ("map@r",)
LONG_COLUMNS = ("dataset", "model", "feature", "paper_column", "dim", "n_queries", *METRIC_KEYS)
ID_COLUMNS = ("dataset", "model", "row", "data", "paper_dataset", "paper_model", "embedding_dim")


def cell_ks(cell: Mapping) -> tuple[int, ...]:
    """The K of the Recall@K a metrics record holds (each dataset has its own; cfga.registry.datasets)."""
    return tuple(sorted(int(key[len("recall@"):]) for key in cell if key.startswith("recall@")))


def metric_keys(cells: Sequence[Mapping]) -> tuple[str, ...]:
    """Recall@K columns for every K any cell holds, ascending, then MAP@R."""
    ks = sorted({k for c in cells for k in cell_ks(c)})
    return tuple(f"recall@{k}" for k in ks) + ("map@r",)


def read_cells(paths: Iterable[str | os.PathLike]) -> list[dict]:
    """Load every metrics JSON; → list of records (see ``cfga.outputs.cells.metrics_record``)."""
    cells = []
    for p in paths:
        with open(p, encoding="utf-8") as fh:
            cells.append(json.load(fh))
    return cells


def published_frame(path: str | os.PathLike) -> pd.DataFrame:
    """The published values file: columns table, dataset, model, feature, recall_at_1 (in %)."""
    return pd.read_csv(path, dtype={"table": str, "dataset": str, "model": str, "feature": str})


def load_published(path: str | os.PathLike) -> dict[tuple[str, str, str, str], float]:
    """(table, dataset, model, feature) → published R@1 in %."""
    df = published_frame(path)
    keys = zip(df["table"], df["dataset"], df["model"], df["feature"])
    return dict(zip(keys, df["recall_at_1"].astype(float)))


def pct(x: float) -> str:
    """A fraction as a percentage with one decimal, the paper's format."""
    return f"{100 * x:.1f}"


def cells_frame(cells: Sequence[Mapping]) -> pd.DataFrame:
    """The long table: one row per cell (identifying columns, then Recall@K for every K any cell
    holds and MAP@R; missing values NaN), sorted by dataset, model and the registry's feature order."""
    keys = metric_keys(cells) if cells else METRIC_KEYS
    ids = ("dataset", "model", "feature", "dim", "n_queries")
    df = pd.DataFrame([{k: c.get(k) for k in (*ids, *keys)} for c in cells], columns=[*ids, *keys])
    df.insert(3, "paper_column", [FEATURES[f].column for f in df["feature"]])
    df["_order"] = [list(FEATURES).index(f) for f in df["feature"]]
    return df.sort_values(["dataset", "model", "_order"], kind="stable").drop(columns="_order").reset_index(drop=True)


def _long_frame(cells: Sequence[Mapping]) -> pd.DataFrame:
    """:func:`cells_frame`, or the empty long table (``LONG_COLUMNS``) when there is no cell."""
    return cells_frame(cells) if cells else pd.DataFrame(columns=list(LONG_COLUMNS))


def _lookup(series: pd.Series, keys: Iterable[tuple[str, str, str]], fmt) -> list[str]:
    """``fmt`` of a (dataset, model, feature)-indexed series at each key; "" where it has none."""
    return [fmt(series[k]) if k in series.index else "" for k in keys]


def long_rows(cells: Sequence[Mapping]) -> tuple[list[str], list[list]]:
    """all_metrics.csv: one row per cell, every metric as a fraction (6 decimals); a Recall@K column
    for every K of any dataset (``metrics.ks``), empty where a dataset does not report that K."""
    df = cells_frame(cells)
    for k in df.columns[6:]:
        df[k] = df[k].map(lambda v: "" if pd.isna(v) else f"{v:.6f}")
    return list(df.columns), df.values.tolist()


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


def model_family(mcfg: Mapping) -> str:
    """Which paper row kind a model is: explicit ``family:``, its training loss, or its protocol."""
    if "family" in mcfg:
        return mcfg["family"]
    if mcfg.get("paper") in FAMILIES:
        return mcfg["paper"]
    if mcfg["protocol"] == "scda":
        return "resnet50_imagenet"
    if "train" in mcfg:
        return LOSSES[mcfg["train"]["loss"]].family
    return {"proxy_anchor": "proxy_anchor", "dgpcrl": "dgpcrl"}.get(mcfg["protocol"], "msloss")


# What the tables read of a dataset's and a model's config (the rest is not a table setting).
_DATASET_KEYS = ("paper",)
_MODEL_KEYS = ("arch", "protocol", "family", "paper")


def table_config(datasets: Mapping[str, Mapping], models: Mapping[str, Mapping]) -> tuple[dict, dict]:
    """(datasets, models) reduced to what :func:`paper_table` reads, in config order: the tables
    rule's params, so that a setting the tables do not show does not rerun them."""
    ds = {d: {**({"synthetic": True} if "synthetic" in c else {}), **{k: c[k] for k in _DATASET_KEYS if k in c}}
          for d, c in datasets.items()}
    ms = {m: {**{k: c[k] for k in _MODEL_KEYS if k in c},
              **({"train": {"loss": c["train"]["loss"]}} if "train" in c else {})}
          for m, c in models.items()}
    return ds, ms


def published_value(published: Mapping[tuple[str, str, str, str], float], dataset_cfg: Mapping,
                    model_cfg: Mapping, feature: str) -> float | None:
    """Published R@1 (%) of a feature of a (dataset, model) row, or None: only a real dataset and a
    model that both name a paper row have one (the first table, in ``TABLES`` order, that lists it)."""
    if _row_kind(dataset_cfg) != "real" or not dataset_cfg.get("paper") or not model_cfg.get("paper"):
        return None
    for t in TABLES:
        v = published.get((t, dataset_cfg["paper"], model_cfg["paper"], feature))
        if v is not None:
            return v
    return None


def _feature_for(column: str, protocol: str) -> str:
    return "scda" if column == "embedding" and protocol == "scda" else column


def _rows_frame(spec: TableSpec, cells: pd.DataFrame, datasets: Mapping[str, Mapping],
                models: Mapping[str, Mapping]) -> pd.DataFrame:
    """One row per (dataset, model) the table lists, in config order of datasets and the paper's
    row order of models, with the identifying columns."""
    order = list(FAMILIES)
    have = set(zip(cells["dataset"], cells["model"], cells["feature"]))
    rows = []
    for d in datasets:
        for m in sorted(models, key=lambda m: order.index(model_family(models[m]))):
            proto = models[m]["protocol"]
            if proto not in spec.protocols or arch_info(models[m]["arch"]).family != "resnet":
                continue
            feats = [_feature_for(c, proto) for c in spec.columns]
            if not any((d, m, f) in have for f in feats):
                continue
            kind = _row_kind(datasets[d])
            pd_, pm = (datasets[d].get("paper"), models[m].get("paper")) if kind == "real" else (None, None)
            rows.append({"dataset": d, "model": m, "row": FAMILIES[model_family(models[m])], "data": kind,
                         "paper_dataset": pd_ or "", "paper_model": pm or "", "protocol": proto})
    return pd.DataFrame(rows, columns=[*ID_COLUMNS[:-1], "protocol"])


def paper_frame(
    spec: TableSpec | str,
    cells: Sequence[Mapping],
    datasets: Mapping[str, Mapping],
    models: Mapping[str, Mapping],
    published: Mapping[tuple[str, str, str, str], float],
) -> pd.DataFrame:
    """One paper-layout table as a frame: the identifying columns, then per paper column our R@1
    (%, one decimal, as text) and the published value beside it (empty where the row is not a
    paper row). An empty string marks a cell this run does not have."""
    spec = TABLES[spec] if isinstance(spec, str) else spec
    long = _long_frame(cells)
    table = _rows_frame(spec, long, datasets, models)
    r1 = long.set_index(["dataset", "model", "feature"])["recall@1"]
    dims = long.set_index(["dataset", "model", "feature"])["dim"]

    def lookup(series, f, fmt):
        return _lookup(series, [(d, m, _feature_for(f, p)) for d, m, p in
                                zip(table["dataset"], table["model"], table["protocol"])], fmt)

    table["embedding_dim"] = lookup(dims, spec.columns[0], lambda v: str(int(v)))
    for f in spec.columns:
        col = FEATURES[f].column
        table[col] = lookup(r1, f, pct)
        paper = [published.get((spec.name, pd_, pm, _feature_for(f, p))) if pd_ and pm else None
                 for pd_, pm, p in zip(table["paper_dataset"], table["paper_model"], table["protocol"])]
        table[f"{col} (paper)"] = ["" if v is None else f"{v:.1f}" for v in paper]
    return table.drop(columns="protocol")


def _markdown(spec: TableSpec, table: pd.DataFrame, models: Mapping[str, Mapping]) -> str:
    cols = [FEATURES[f].column for f in spec.columns]
    md = ["| Dataset | Model | Row | Data | " + " | ".join(cols) + " |", "|---|---|---|---|" + "---|" * len(cols)]
    for r in table.to_dict("records"):
        label = "synthetic (not comparable to the paper)" if r["data"] == "synthetic" else (
            f"paper row {r['paper_dataset']}/{r['paper_model']}" if r["paper_dataset"] and r["paper_model"]
            else "real (no paper row)")
        md_cells = [r[c] + (f" ({r[f'{c} (paper)']})" if r[f"{c} (paper)"] else "") for c in cols]
        if spec.columns[0] == "embedding" and r["embedding_dim"]:
            md_cells[0] += f" [{r['embedding_dim']}-d]"
        md.append(f"| {r['dataset']} | {r['model']} | {r['row']} | {label} | " + " | ".join(md_cells) + " |")
    dims = ", ".join(f"{FEATURES[f].column} {FEATURES[f].dim}" for f in spec.columns if f != "embedding")
    note = [
        "",
        f"Recall@1 in %. In parentheses: the published value ({spec.title}), shown only for rows whose "
        "dataset and model are the paper's. Dimensions: " + dims + ("; embedding dimension in brackets"
                                                                    if "embedding" in spec.columns else "") + ".",
    ]
    if spec.name in ("table3", "table6"):
        present = set(table["row"])
        missing = [FAMILIES[f] for f in FAMILIES if FAMILIES[f] not in present and
                   (spec.name == "table3" or f not in ("resnet50_imagenet", "proxy_anchor"))]
        if missing:
            note.append(f"No model of this run fills: {', '.join(missing)}"
                        + (" (DGPCRL is a loader-only row: give the authors' checkpoint)." if "DGPCRL" in missing else "."))
    return "\n".join(md) + "\n" + "\n".join(note) + "\n"


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
    table = paper_frame(spec, cells, datasets, models, published)
    return list(table.columns), table.values.tolist(), _markdown(spec, table, models)


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


TRANSFORMER_ID_COLUMNS = ("dataset", "model", "arch", "protocol", "data")
TRANSFORMER_NOTE = (
    "Recall@1 in %. No published values exist for these rows: the authors never released their "
    "Transformer code or per-layer numbers (TRANSFORMERS.md). CFGA b0 / b1: the second-to-last / last "
    "block (Swin: stage 4 blocks 0 and 1; ViT with L layers: encoder layers L-2 and L-1); CFGA+ = "
    "[qkv b0; qkv b1]. Dimensions: C (qkv, proj, fc1, class token), 4C (fc2), 2C (Pooling, SCDA, CFGA+), "
    "512 (embedding)."
)


def _transformer_features(arch: str) -> list[str]:
    """The stored feature behind each of ``TRANSFORMER_COLUMNS`` on ``arch`` (its blocks' CFGA names)."""
    blocks = transformer_blocks(arch)
    return [f if isinstance(f, str) else transformer_cfga_name(blocks[f[0]], f[1]) for _, f in TRANSFORMER_COLUMNS]


def _transformer_rows(cells: pd.DataFrame, datasets: Mapping[str, Mapping],
                      models: Mapping[str, Mapping]) -> pd.DataFrame:
    """``TRANSFORMER_ID_COLUMNS`` of every (dataset, Swin/ViT model) with at least one cell, both
    in config order (``cells``: the long table)."""
    have = set(zip(cells["dataset"], cells["model"], cells["feature"]))
    rows = [{"dataset": d, "model": m, "arch": mcfg["arch"], "protocol": mcfg["protocol"],
             "data": _row_kind(datasets[d])}
            for d in datasets for m, mcfg in models.items()
            if arch_info(mcfg["arch"]).family != "resnet"
            and any((d, m, f) in have for f in _transformer_features(mcfg["arch"]))]
    return pd.DataFrame(rows, columns=list(TRANSFORMER_ID_COLUMNS))


def transformer_frame(cells: Sequence[Mapping], datasets: Mapping[str, Mapping],
                      models: Mapping[str, Mapping]) -> pd.DataFrame:
    """The Transformer table as a frame: ``TRANSFORMER_ID_COLUMNS``, then our R@1 (%, one decimal,
    as text) per column of ``TRANSFORMER_COLUMNS``; an empty string marks a cell this run does not have."""
    long = _long_frame(cells)
    table = _transformer_rows(long, datasets, models)
    r1 = long.set_index(["dataset", "model", "feature"])["recall@1"]
    feats = [_transformer_features(a) for a in table["arch"]]  # per row, one feature per column
    for i, (col, _) in enumerate(TRANSFORMER_COLUMNS):
        table[col] = _lookup(r1, [(d, m, fs[i]) for d, m, fs in zip(table["dataset"], table["model"], feats)], pct)
    return table


def _transformer_markdown(table: pd.DataFrame) -> str:
    cols = [c for c, _ in TRANSFORMER_COLUMNS]
    md = ["| Dataset | Model | Arch | Protocol | Data | " + " | ".join(cols) + " |",
          "|---|---|---|---|---|" + "---|" * len(cols)]
    md += ["| " + " | ".join(r) + " |" for r in table.values.tolist()]
    note = ["", TRANSFORMER_NOTE] + ([] if len(table) else ["This run has no Swin or ViT model."])
    return "\n".join(md) + "\n" + "\n".join(note) + "\n"


def transformer_table(cells: Sequence[Mapping], datasets: Mapping[str, Mapping],
                      models: Mapping[str, Mapping]) -> tuple[list[str], list[list[str]], str]:
    """results/tables/transformers: rows dataset × Swin/ViT model, R@1 in %. There are no
    published values (the authors never released their Transformer code or numbers)."""
    table = transformer_frame(cells, datasets, models)
    return list(table.columns), table.values.tolist(), _transformer_markdown(table)
