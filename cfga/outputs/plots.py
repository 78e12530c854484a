"""Plots of one dataset (matplotlib, no display needed): Recall@K small multiples, Recall@1 bars.

One colour per feature everywhere (``FEATURE_COLORS``, fixed by the registry);
legends sit outside the data.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

from cfga.outputs.tables import cell_ks
from cfga.registry.archs import ARCH_INFO
from cfga.registry.features import (
    CFGA_FEATURES,
    FEATURES,
    TRANSFORMER_LAYERS,
    transformer_blocks,
    transformer_cfga_name,
)

# tab10 then black for the ResNet and image-level features (registry order); the Transformer
# CFGA layers take one colour per role (second-to-last / last block × qkv, proj, fc1, fc2), the
# same role in every arch, and the class token its own: no colour repeats within a model's features.
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf", "#000000")
_ROLE_PALETTE = ("#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d")
_CLASS_TOKEN_COLOR = "#393b79"


def _feature_colors() -> dict[str, str]:
    roles = {}
    for a in ARCH_INFO.values():
        if a.family != "resnet":
            for b, label in enumerate(transformer_blocks(a.name)):
                for i, layer in enumerate(TRANSFORMER_LAYERS):
                    roles[transformer_cfga_name(label, layer)] = _ROLE_PALETTE[b * len(TRANSFORMER_LAYERS) + i]
    plain = [f for f in FEATURES if f not in roles and f != "class_token"]
    return {**{f: _PALETTE[i] for i, f in enumerate(plain)}, **roles, "class_token": _CLASS_TOKEN_COLOR}


FEATURE_COLORS: dict[str, str] = _feature_colors()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> None:
    from cfga.files import atomic_path

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")


def _models(cells: Sequence[Mapping]) -> list[str]:
    return sorted({c["model"] for c in cells})


def _order(feature: str) -> int:
    return list(FEATURES).index(feature)


def recall_plot(cells: Sequence[Mapping], path: str | os.PathLike, title: str) -> None:
    """Recall@K (%) against K (log axis, at the K the cells hold): one panel per model, one line per feature (per-layer
    CFGA features thin and dashed, the others solid); written atomically."""
    plt = _plt()
    models = _models(cells)
    ncol = min(3, max(1, len(models)))
    nrow = -(-len(models) // ncol) if models else 1
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 3.0 * nrow), sharex=True, sharey=True,
                             squeeze=False)
    seen: dict[str, object] = {}
    ticks = sorted({k for c in cells for k in cell_ks(c)})
    for ax, model in zip(axes.flat, models):
        for c in sorted((c for c in cells if c["model"] == model), key=lambda c: _order(c["feature"])):
            f = c["feature"]
            layer = f in CFGA_FEATURES
            ks = cell_ks(c)  # the dataset's metrics.ks
            (line,) = ax.plot(ks, [100 * c[f"recall@{k}"] for k in ks], marker="." if layer else "o",
                              ms=3 if layer else 4, lw=0.9 if layer else 1.8, ls="--" if layer else "-",
                              color=FEATURE_COLORS[f], label=FEATURES[f].column)
            seen.setdefault(f, line)
        ax.set_title(model, fontsize=10)
        # 1,2,4,…,32 on a log2 axis; SOP's 1,10,100,1000 and In-Shop's 1,10,…,50 on a log10 one.
        ax.set_xscale("log", base=2 if all(k & (k - 1) == 0 for k in ticks) else 10)
        ax.set_xticks(ticks, [str(k) for k in ticks])
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(models):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("K")
    for ax in axes[:, 0]:
        ax.set_ylabel("Recall@K (%)")
    order = sorted(seen, key=_order)
    fig.legend([seen[f] for f in order], [FEATURES[f].column for f in order], loc="center left",
               bbox_to_anchor=(1.0, 0.5), fontsize=8, title="feature", frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def recall_at_1_plot(cells: Sequence[Mapping], path: str | os.PathLike, title: str,
                     published: Mapping[tuple[str, str], float] | None = None) -> None:
    """Recall@1 (%) bars: one group per model, one bar per feature in its colour; ``published``
    {(model, feature): R@1 %} drawn as a black tick with its value over the bar."""
    plt = _plt()
    published = published or {}
    models = _models(cells)
    by = {(c["model"], c["feature"]): c for c in cells}
    width = 0.8
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(models) + 2), 4.0))
    seen: dict[str, object] = {}
    for x, model in enumerate(models):
        feats = sorted((f for m, f in by if m == model), key=_order)
        w = width / max(1, len(feats))
        for j, f in enumerate(feats):
            xc = x - width / 2 + w * (j + 0.5)
            v = 100 * by[(model, f)]["recall@1"]
            bar = ax.bar(xc, v, w * 0.92, color=FEATURE_COLORS[f], label=FEATURES[f].column)
            seen.setdefault(f, bar)
            p = published.get((model, f))
            if p is not None:
                ax.plot([xc - w / 2, xc + w / 2], [p, p], color="black", lw=2)
                ax.annotate(f"{p:.1f}", (xc, p), xytext=(0, 2), textcoords="offset points", ha="center",
                            fontsize=6)
    ax.set_xticks(range(len(models)), models, rotation=20, ha="right")
    ax.set_ylabel("Recall@1 (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title)
    handles = [seen[f] for f in sorted(seen, key=_order)]
    labels = [FEATURES[f].column for f in sorted(seen, key=_order)]
    if published:
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], color="black", lw=2))
        labels.append("published")
    ax.legend(handles, labels, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
