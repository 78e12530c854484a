"""Feature files: ``results/features/{dataset}/{model}.npz`` (float32 arrays + labels + paths + provenance).

A sharded extraction writes shard files (a feature file plus ``rows``, the manifest test-row
index of each row) that :func:`gather_shards` joins into the very bytes one job would write.
"""
from __future__ import annotations

import json
import os
import platform
from typing import Mapping, Sequence

import numpy as np

from cfga import files
from cfga.extraction.batching import size_buckets
from cfga.registry.features import FEATURES

META_KEY = "meta_json"
ROWS_KEY = "rows"  # shard files only: manifest test-row index of each row


def provenance(*, checkpoint: str | None, manifest: str | None, device: str, extra: Mapping | None = None) -> dict:
    """Where a feature file came from: checkpoint and manifest sha256, versions, device."""
    import torch  # here, not at import: reading a feature file must stay torch-free and fast

    from cfga import __version__

    meta = {
        "cfga_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": device,
        "checkpoint": checkpoint,
        "checkpoint_sha256": files.sha256_file(checkpoint) if checkpoint else None,
        "manifest": manifest,
        "manifest_sha256": files.sha256_file(manifest) if manifest else None,
    }
    meta.update(extra or {})
    return meta


def save_features(
    path: str | os.PathLike,
    feats: Mapping[str, np.ndarray],
    labels: Sequence[int],
    paths: Sequence[str],
    meta: Mapping,
    *,
    rows: Sequence[int] | None = None,
) -> None:
    """Write one feature file atomically; refuses non-finite values and wrong shapes.

    ``rows`` (shard files only) stores each row's index among the manifest's test rows.
    Identical arguments give identical bytes (``cfga.files.save_npz``).
    """
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
    if rows is not None:
        if len(rows) != n:
            raise ValueError(f"{len(rows)} row indices for {n} labels; refusing to write {path}")
        arrays[ROWS_KEY] = np.asarray(rows, dtype=np.int64).reshape(n)
    arrays[META_KEY] = np.asarray(json.dumps(dict(meta), sort_keys=True))
    files.save_npz(path, arrays)


def load_features(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, dict]:
    """→ (features {name: float32 [N, D]}, labels int64 [N], paths str [N], provenance dict)."""
    z = files.load_npz(path)
    for key in ("labels", "paths", META_KEY):
        if key not in z:
            raise ValueError(f"{path} is not a feature file (no {key!r} array); rerun its extraction")
    feats = {k: v for k, v in z.items() if k in FEATURES}
    return feats, z["labels"], z["paths"], json.loads(str(z[META_KEY]))


# --------------------------------------------------------------------------------------------
# sharded extraction


def shard_plan(sizes: Sequence[tuple[int, int]], batch_size: int, n_shards: int) -> list[list[int]]:
    """Rows (test-row indices, ascending) of each of ``n_shards`` shards of one extraction.

    ``sizes`` are the network input sizes of the test images in manifest order. The unsharded
    extraction's batches (``cfga.extract.size_buckets``: one exact size per batch) are dealt out
    whole, in order, as contiguous runs balanced by image count: a batch goes to the shard its
    middle image falls in. So every image is computed in the very batch it has in one job, and
    the gathered file is bit-identical to one job's (float results do depend on batch
    composition: on CPU the DML head's matmul differs in the last bit between batch sizes).
    Extracting a shard's rows in ascending order re-forms exactly those batches: within a size,
    every batch but the last is full. For one-size protocols (ms, proxy_anchor: centre crops) a
    shard is a contiguous slice of the manifest. More shards than batches leave shards empty.
    """

    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    batches = size_buckets(sizes, batch_size)
    total = len(sizes)
    shards: list[list[int]] = [[] for _ in range(n_shards)]
    start = 0
    for batch in batches:
        middle2 = 2 * start + len(batch)  # twice the batch's middle position (integers only)
        shards[min(n_shards - 1, middle2 * n_shards // (2 * total))].extend(batch)
        start += len(batch)
    return [sorted(s) for s in shards]


def _shard_meta(metas: Sequence[tuple[str, Mapping, int]]) -> dict:
    """One provenance for the gathered file: the shards' (equal) provenance.

    Anything else differing (checkpoint, manifest, versions) is an error: stale shards. Only
    ``device`` may differ (shards placed on a CPU node and a GPU node): then all devices are listed
    and a warning is logged, since rows from different devices are not bit-identical to one job's.
    """
    import logging

    ran = [(p, m) for p, m, n in metas if n > 0] or [(p, m) for p, m, _ in metas]
    first_path, first = ran[0]
    base = {k: v for k, v in first.items() if k != "device"}
    for path, meta in ran[1:]:
        other = {k: v for k, v in meta.items() if k != "device"}
        if other != base:
            diff = sorted(k for k in set(base) | set(other) if base.get(k) != other.get(k))
            raise ValueError(f"shards {first_path} and {path} differ in provenance {diff}; delete the shard files "
                             "and rerun the extraction")
    devices = list(dict.fromkeys(str(m.get("device")) for _, m in ran))
    meta = dict(first)
    if len(devices) > 1:
        logging.getLogger(__name__).warning("shards ran on different devices %s: rows are not bit-identical to "
                                            "one job's", devices)
        meta["device"] = ",".join(devices)
    return meta


def gather_shards(
    shard_paths: Sequence[str | os.PathLike],
    path: str | os.PathLike,
    *,
    expected_paths: Sequence[str] | None = None,
) -> int:
    """Join shard files into one feature file, rows in manifest order; → number of rows.

    Checks that the shards' rows tile ``0 … N-1`` exactly once, that they agree on features,
    dimensions and provenance, and (``expected_paths``: the manifest's test paths) on the images.
    The output has the bytes an unsharded extraction writes: same arrays, order, dtypes, meta.
    """
    parts = []
    for sp in shard_paths:
        with np.load(sp, allow_pickle=False) as z:
            if ROWS_KEY not in z.files:
                raise ValueError(f"{sp} is not a shard file (no {ROWS_KEY!r} array)")
            names = [k for k in z.files if k in FEATURES]
            parts.append({
                "path": str(sp),
                "names": names,
                "feats": {k: z[k] for k in names},
                "labels": z["labels"],
                "paths": z["paths"],
                "rows": z[ROWS_KEY],
                "meta": json.loads(str(z[META_KEY])),
            })
    if not parts:
        raise ValueError("no shard files to gather")
    names = parts[0]["names"]
    for p in parts[1:]:
        if p["names"] != names:
            raise ValueError(f"shards {parts[0]['path']} and {p['path']} hold different features")
    rows = np.concatenate([p["rows"] for p in parts])
    n = len(rows) if expected_paths is None else len(expected_paths)
    if len(rows) != n or not np.array_equal(np.sort(rows), np.arange(n)):
        raise ValueError(f"shard rows do not tile 0..{n - 1} exactly once ({len(rows)} rows in {len(parts)} shards)")
    order = np.argsort(rows, kind="stable")
    feats = {k: np.concatenate([p["feats"][k] for p in parts])[order] for k in names}
    labels = np.concatenate([p["labels"] for p in parts])[order]
    paths = [str(x) for x in np.concatenate([p["paths"].astype(str) for p in parts])[order]]
    if expected_paths is not None and paths != [str(x) for x in expected_paths]:
        bad = next(i for i, (a, b) in enumerate(zip(paths, expected_paths)) if a != str(b))
        raise ValueError(f"row {bad}: shard image {paths[bad]!r}, manifest image {expected_paths[bad]!r}")
    meta = _shard_meta([(p["path"], p["meta"], len(p["rows"])) for p in parts])
    save_features(path, feats, labels.tolist(), paths, meta)
    return n
