"""Feature files: ``results/features/{dataset}/{model}.npz`` (float32 arrays + labels + paths + provenance)."""
from __future__ import annotations

import json
import os
import platform
from typing import Mapping, Sequence

import numpy as np

from . import io
from .features import FEATURES

META_KEY = "meta_json"


def provenance(*, checkpoint: str | None, manifest: str | None, device: str, extra: Mapping | None = None) -> dict:
    """Where a feature file came from: checkpoint and manifest sha256, versions, device."""
    import torch  # here, not at import: reading a feature file must stay torch-free and fast

    from . import __version__

    meta = {
        "cfga_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": device,
        "checkpoint": checkpoint,
        "checkpoint_sha256": io.sha256_file(checkpoint) if checkpoint else None,
        "manifest": manifest,
        "manifest_sha256": io.sha256_file(manifest) if manifest else None,
    }
    meta.update(extra or {})
    return meta


def save_features(
    path: str | os.PathLike,
    feats: Mapping[str, np.ndarray],
    labels: Sequence[int],
    paths: Sequence[str],
    meta: Mapping,
) -> None:
    """Write one feature file atomically; refuses non-finite values and wrong shapes."""
    n = len(labels)
    if len(paths) != n:
        raise ValueError(f"{len(paths)} paths for {n} labels; refusing to write {path}")
    arrays: dict[str, np.ndarray] = {}
    for name, arr in feats.items():
        if name not in FEATURES:
            raise ValueError(f"unknown feature {name!r} (see cfga.features.FEATURES)")
        arr = np.asarray(arr, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[0] != n:
            raise ValueError(f"feature {name}: shape {arr.shape}, expected ({n}, D)")
        if not np.isfinite(arr).all():
            raise ValueError(f"feature {name}: non-finite values; refusing to write {path}")
        arrays[name] = arr
    arrays["labels"] = np.asarray(labels, dtype=np.int64)
    arrays["paths"] = np.asarray(list(paths), dtype=str)
    arrays[META_KEY] = np.asarray(json.dumps(dict(meta), sort_keys=True))
    io.save_npz(path, arrays)


def load_features(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, dict]:
    """→ (features {name: float32 [N, D]}, labels int64 [N], paths str [N], provenance dict)."""
    with np.load(path, allow_pickle=False) as z:
        feats = {k: z[k] for k in z.files if k in FEATURES}
        return feats, z["labels"], z["paths"], json.loads(str(z[META_KEY]))
