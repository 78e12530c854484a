"""Recall@K curves of one dataset (matplotlib, no display needed)."""
from __future__ import annotations

import os
from typing import Mapping, Sequence

from cfga.outputs.tables import cell_ks
from cfga.registry.features import FEATURES


def recall_plot(cells: Sequence[Mapping], path: str | os.PathLike, title: str) -> None:
    """One line per (model, feature): Recall@K (%) against K on a log axis, at the K the cells hold
    (the dataset's ``metrics.ks``); written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cfga.files import atomic_path

    fig, ax = plt.subplots(figsize=(8, 5))
    order = list(FEATURES)
    all_ks: set[int] = set()
    for c in sorted(cells, key=lambda c: (c["model"], order.index(c["feature"]))):
        ks = cell_ks(c)
        all_ks.update(ks)
        ax.plot(ks, [100 * c[f"recall@{k}"] for k in ks], marker="o",
                label=f"{c['model']}: {FEATURES[c['feature']].column}")
    ticks = sorted(all_ks)
    # 1,2,4,…,32 on a log2 axis; SOP's 1,10,100,1000 and In-Shop's 1,10,…,50 on a log10 one.
    ax.set_xscale("log", base=2 if all(k & (k - 1) == 0 for k in ticks) else 10)
    ax.set_xticks(ticks, [str(k) for k in ticks])
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
