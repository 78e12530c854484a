"""One table cell: the metrics record written to ``results/metrics/{dataset}/{model}/{feature}.json``."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from cfga.numerics.metrics import retrieval_metrics
from cfga.registry.features import FEATURES, RECALL_KS


def _role(flags, n: int, name: str) -> np.ndarray:
    if flags is None:
        return np.ones(n, dtype=bool)
    a = np.asarray(flags)
    if a.shape != (n,) or a.dtype != bool:
        raise ValueError(f"{name} must be a boolean array with one entry per feature row ({n}), "
                         f"got dtype {a.dtype} and shape {a.shape}")
    return a


def metrics_record(
    feats: np.ndarray,
    labels: np.ndarray,
    *,
    dataset: str,
    model: str,
    feature: str,
    provenance: Mapping | None = None,
    device: str | None = "cpu",
    ks: Sequence[int] = RECALL_KS,
    is_query: np.ndarray | None = None,
    is_gallery: np.ndarray | None = None,
) -> dict:
    """Recall@K for ``ks`` (fractions, method.md §8.1) and MAP@R (§8.3) of one feature, with context.

    feats ``[N, D]``, labels ``[N]``; ``is_query`` / ``is_gallery``: optional boolean ``[N]``
    roles of the rows (the manifest's columns). Every row both (or no flags): leave-one-out over
    all rows, exactly method.md §8.1. Otherwise the query rows are ranked against the gallery rows
    (a row that is both is left out of its own ranking) and queries without any same-label gallery
    item are excluded; their number is recorded as ``n_excluded_queries``.
    """
    if device in (None, "auto"):
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    ks = tuple(int(k) for k in ks)
    labels = np.asarray(labels)
    n = int(feats.shape[0])
    q = _role(is_query, n, "is_query")
    g = _role(is_gallery, n, "is_gallery")
    if q.all() and g.all():
        m = retrieval_metrics(feats, labels, ks, device=device)
        n_q, n_g, n_ex = n, n, 0
    else:
        qi, gi = np.flatnonzero(q), np.flatnonzero(g)
        if not len(qi) or not len(gi):
            raise ValueError(f"{dataset}: {len(qi)} query rows and {len(gi)} gallery rows; both roles "
                             "need at least one row (check the manifest's is_query/is_gallery columns)")
        gpos = np.full(n, -1, dtype=np.int64)
        gpos[gi] = np.arange(len(gi))
        own = gpos[qi]
        m = retrieval_metrics(feats[qi], labels[qi], ks, gallery=feats[gi], gallery_labels=labels[gi],
                              query_gallery_index=own if (own >= 0).any() else None, device=device)
        n_q, n_g, n_ex = len(qi), len(gi), int(m["n_excluded_queries"])
    return {
        "dataset": dataset,
        "model": model,
        "feature": feature,
        "paper_column": FEATURES[feature].column,
        "dim": int(feats.shape[1]),
        "n_queries": n_q,
        "n_gallery": n_g,
        "n_excluded_queries": n_ex,
        "ks": list(ks),
        **{f"recall@{k}": float(m[f"recall@{k}"]) for k in ks},
        "map@r": float(m["map@r"]),
        "provenance": dict(provenance or {}),
    }
