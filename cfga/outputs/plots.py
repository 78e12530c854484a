"""Recall@K curves of one dataset (matplotlib, no display needed)."""
from __future__ import annotations

import os
from typing import Mapping, Sequence

from cfga.registry.features import FEATURES, RECALL_KS


def recall_plot(cells: Sequence[Mapping], path: str | os.PathLike, title: str) -> None:
    """One line per (model, feature): Recall@K (%) against K on a log2 axis; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cfga.files import atomic_path

    fig, ax = plt.subplots(figsize=(8, 5))
    order = list(FEATURES)
    for c in sorted(cells, key=lambda c: (c["model"], order.index(c["feature"]))):
        ys = [100 * c[f"recall@{k}"] for k in RECALL_KS]
        ax.plot(RECALL_KS, ys, marker="o", label=f"{c['model']}: {FEATURES[c['feature']].column}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(RECALL_KS, [str(k) for k in RECALL_KS])
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
