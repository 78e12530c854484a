"""Paper-style tables from the per-cell metrics JSON files.

Table 5 layout: rows = dataset × model (``scda`` protocol), columns Pooling, SCDA, CFGA+,
CFGA 4-1-1 … 4-2-3, Recall@1 in % with one decimal. A row is compared with the paper only when
its dataset and model both name a paper row (config ``paper:`` keys); synthetic rows never are.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Iterable, Mapping, Sequence

from .features import FEATURES, RECALL_KS, TABLE5_COLUMNS

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


def table5(
    cells: Sequence[Mapping],
    datasets: Mapping[str, Mapping],
    models: Mapping[str, Mapping],
    published: Mapping[tuple[str, str, str, str], float],
    columns: Sequence[str] = TABLE5_COLUMNS,
    table: str = "table5",
) -> tuple[list[str], list[list[str]], str]:
    """→ (csv header, csv rows, markdown text) of the paper-layout table."""
    by_key = {(c["dataset"], c["model"], c["feature"]): c for c in cells}
    header = ["dataset", "model", "data", "paper_dataset", "paper_model"]
    for f in columns:
        header += [FEATURES[f].column, f"{FEATURES[f].column} (paper)"]
    rows = []
    md = [
        "| Dataset | Model | Data | " + " | ".join(FEATURES[f].column for f in columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
        "| | | dim | " + " | ".join(str(FEATURES[f].dim) for f in columns) + " |",
    ]
    for d, dcfg in datasets.items():
        for m, mcfg in models.items():
            if not any((d, m, f) in by_key for f in columns):
                continue
            kind = _row_kind(dcfg)
            pd_, pm = (dcfg.get("paper"), mcfg.get("paper")) if kind == "real" else (None, None)
            row = [d, m, kind, pd_ or "", pm or ""]
            md_cells = []
            for f in columns:
                c = by_key.get((d, m, f))
                ours = pct(c["recall@1"]) if c else ""
                paper = published.get((table, pd_, pm, f)) if pd_ and pm else None
                row += [ours, "" if paper is None else f"{paper:.1f}"]
                md_cells.append(ours + (f" ({paper:.1f})" if paper is not None else ""))
            label = "synthetic (not comparable to the paper)" if kind == "synthetic" else (
                f"paper row {pd_}/{pm}" if pd_ and pm else "real (no paper row)")
            rows.append(row)
            md.append(f"| {d} | {m} | {label} | " + " | ".join(md_cells) + " |")
    note = (
        "\nRecall@1 in %. In parentheses: the published value (paper, "
        f"{table.replace('table', 'Table ')}), shown only for rows whose dataset and model are the paper's.\n"
    )
    return header, rows, "\n".join(md) + "\n" + note
