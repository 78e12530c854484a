"""One table cell: the metrics record written to ``results/metrics/{dataset}/{model}/{feature}.json``."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from cfga.numerics.metrics import retrieval_metrics
from cfga.registry.features import FEATURES, RECALL_KS


def metrics_record(
    feats: np.ndarray,
    labels: np.ndarray,
    *,
    dataset: str,
    model: str,
    feature: str,
    provenance: Mapping | None = None,
    device: str | None = "cpu",
) -> dict:
    """Recall@{1,2,4,8,16,32} (fractions, SPEC §8.1) and MAP@R (§8.3) of one feature, with context."""
    if device in (None, "auto"):
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    m = retrieval_metrics(feats, labels, RECALL_KS, device=device)
    return {
        "dataset": dataset,
        "model": model,
        "feature": feature,
        "paper_column": FEATURES[feature].column,
        "dim": int(feats.shape[1]),
        "n_queries": int(feats.shape[0]),
        **{f"recall@{k}": float(m[f"recall@{k}"]) for k in RECALL_KS},
        "map@r": float(m["map@r"]),
        "provenance": dict(provenance or {}),
    }
