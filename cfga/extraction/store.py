"""Feature files: ``results/features/{dataset}/{model}.npz`` (float32 arrays + labels + paths + provenance).

Extraction streams its rows to disk (:class:`FeatureWriter`), so its memory does not grow with N.
A sharded extraction writes shard files (a feature file plus ``rows``, the index of each row among
the manifest's evaluated rows) that :func:`gather_shards` joins into the very bytes one job would write.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from cfga import files
from cfga.extraction.batching import size_buckets
from cfga.registry.features import FEATURES

META_KEY = "meta_json"
ROWS_KEY = "rows"  # shard files only: index of each row among the manifest's evaluated (query or gallery) rows


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


def _check_columns(path, n: int, labels: Sequence[int], paths: Sequence[str], rows: Sequence[int] | None) -> None:
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} rows; refusing to write {path}")
    if len(paths) != n:
        raise ValueError(f"{len(paths)} paths for {n} labels; refusing to write {path}")
    if rows is not None and len(rows) != n:
        raise ValueError(f"{len(rows)} row indices for {n} labels; refusing to write {path}")


def _tail_arrays(n: int, labels, paths, meta: Mapping, rows) -> dict[str, np.ndarray]:
    """The members after the features, in file order: labels, paths, [rows], provenance."""
    arrays = {"labels": np.asarray(labels, dtype=np.int64), "paths": np.asarray(list(paths), dtype=str)}
    if rows is not None:
        arrays[ROWS_KEY] = np.asarray(rows, dtype=np.int64).reshape(n)
    arrays[META_KEY] = np.asarray(json.dumps(dict(meta), sort_keys=True))
    return arrays


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

    ``rows`` (shard files only) stores each row's index among the manifest's evaluated rows.
    Identical arguments give identical bytes (``cfga.files.save_npz``); :class:`FeatureWriter`
    writes the same bytes from rows streamed to disk.
    """
    n = len(labels)
    _check_columns(path, n, labels, paths, rows)
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
    arrays.update(_tail_arrays(n, labels, paths, meta, rows))
    files.save_npz(path, arrays)


class FeatureWriter:
    """A feature file written from rows streamed to disk, for any N in the memory of one batch.

    Each feature's rows go to a ``.npy`` part file (header for ``(n, D)`` float32, then the rows
    at their offsets) in a temp folder beside ``path``, the feature's dimension taken from its
    first rows and features ordered as first written (``extract_features``' order).
    :meth:`finish` checks that every row of every feature was written, then packs the parts,
    labels, paths and provenance into ``path`` atomically: the bytes :func:`save_features`
    writes for the same arrays. Leaving the ``with`` block without ``finish`` (an error) deletes
    the parts, so nothing is left behind. Disk: the parts, then the packed file beside them.
    """

    def __init__(self, path: str | os.PathLike, n: int):
        self.path, self.n = Path(path), int(n)
        self._dir: Path | None = None
        self._parts: dict[str, dict] = {}
        # A job killed outright (SIGKILL, power loss) cannot delete its parts or its half-packed
        # file; the next writer of the same output (Snakemake runs one at a time) does.
        for stale in (*self.path.parent.glob(f".{self.path.name}.*.parts"),
                      *self.path.parent.glob(f".{self.path.name}.*.tmp.npz")):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)

    def __enter__(self) -> "FeatureWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _part(self, name: str, dim: int) -> dict:
        part = self._parts.get(name)
        if part is not None:
            if dim != part["dim"]:
                raise ValueError(f"feature {name}: rows of dimension {dim}, earlier {part['dim']}")
            return part
        if name not in FEATURES:
            raise ValueError(f"unknown feature {name!r} (see cfga.features.FEATURES)")
        if self._dir is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".parts", dir=self.path.parent))
        file = self._dir / f"{name}.npy"
        with open(file, "wb") as fh:
            # The header np.lib.format.write_array writes for a C-order float32 (n, dim) array.
            np.lib.format.write_array_header_1_0(
                fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                     "shape": (self.n, dim)})
            offset = fh.tell()
            fh.truncate(offset + self.n * dim * 4)
        part = {"file": file, "offset": offset, "dim": dim, "written": np.zeros(self.n, dtype=bool),
                "fd": os.open(file, os.O_WRONLY)}
        self._parts[name] = part
        return part

    def write(self, name: str, idx: Sequence[int], arr: np.ndarray) -> None:
        """Rows ``idx`` (indices into 0 … n-1) of feature ``name``: ``arr`` float32 [len(idx), D]."""
        arr = np.asarray(arr, dtype=np.float32)
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if arr.ndim != 2 or arr.shape[0] != len(idx):
            raise ValueError(f"feature {name}: rows of shape {arr.shape} for {len(idx)} indices")
        part = self._part(name, arr.shape[1])
        if len(idx) == 0:
            return
        if idx.min() < 0 or idx.max() >= self.n or len(np.unique(idx)) != len(idx):
            raise ValueError(f"feature {name}: row indices out of 0..{self.n - 1} or repeated")
        if not np.isfinite(arr).all():
            raise ValueError(f"feature {name}: non-finite values; refusing to write {self.path}")
        order = np.argsort(idx, kind="stable")
        idx, arr = idx[order], np.ascontiguousarray(arr[order])
        row_bytes = part["dim"] * 4
        starts = np.flatnonzero(np.diff(idx) != 1) + 1  # runs of consecutive rows: one write each
        for a, b in zip(np.r_[0, starts], np.r_[starts, len(idx)]):
            data = memoryview(arr[a:b]).cast("B")
            pos = part["offset"] + int(idx[a]) * row_bytes
            while data:
                done = os.pwrite(part["fd"], data, pos)
                data, pos = data[done:], pos + done
        part["written"][idx] = True

    def finish(self, labels: Sequence[int], paths: Sequence[str], meta: Mapping, *,
               rows: Sequence[int] | None = None) -> None:
        """Pack the feature file at ``path`` (atomically), then delete the parts."""
        _check_columns(self.path, self.n, labels, paths, rows)
        for name, part in self._parts.items():
            if not part["written"].all():
                missing = np.flatnonzero(~part["written"])
                raise ValueError(f"feature {name}: rows {missing[:5].tolist()} ({len(missing)} in all) were never "
                                 f"written; refusing to write {self.path}")
            os.close(part.pop("fd"))
        arrays: dict[str, np.ndarray | Path] = {name: part["file"] for name, part in self._parts.items()}
        arrays.update(_tail_arrays(self.n, labels, paths, meta, rows))
        files.save_npz(self.path, arrays)
        self.close()

    def close(self) -> None:
        """Delete the parts (finish has packed them, or the extraction failed)."""
        for part in self._parts.values():
            if "fd" in part:
                os.close(part.pop("fd"))
        self._parts = {}
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def load_features(
    path: str | os.PathLike, names: Sequence[str] | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, dict]:
    """→ (features {name: float32 [N, D]}, labels int64 [N], paths str [N], provenance dict).

    ``names``: read only these features (one metrics job needs one; a 60k-image file holds ~4.7 GB).
    """
    keys = None if names is None else {*names, "labels", "paths", META_KEY}
    try:
        z = files.load_npz(path, keys=keys)
    except ValueError as err:
        if names is None or "no array(s)" not in str(err):
            raise
        z = files.load_npz(path, keys={"labels", "paths", META_KEY})  # the messages below name what is missing
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
    dimensions and provenance, and (``expected_paths``: the paths of the manifest's evaluated rows) on the images.
    The output has the bytes an unsharded extraction writes: same arrays, order, dtypes, meta.
    """
    parts = []
    for sp in shard_paths:
        with np.load(sp, allow_pickle=False) as z:
            if ROWS_KEY not in z.files:
                raise ValueError(f"{sp} is not a shard file (no {ROWS_KEY!r} array)")
            parts.append({
                "path": str(sp),
                "names": [k for k in z.files if k in FEATURES],
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
    labels = np.concatenate([p["labels"] for p in parts])[order]
    paths = [str(x) for x in np.concatenate([p["paths"].astype(str) for p in parts])[order]]
    if expected_paths is not None and paths != [str(x) for x in expected_paths]:
        bad = next(i for i, (a, b) in enumerate(zip(paths, expected_paths)) if a != str(b))
        raise ValueError(f"row {bad}: shard image {paths[bad]!r}, manifest image {expected_paths[bad]!r}")
    meta = _shard_meta([(p["path"], p["meta"], len(p["rows"])) for p in parts])
    # Streamed, one shard's feature at a time: a shard row's place in the file is its row index.
    with FeatureWriter(path, n) as out:
        for name in names:
            for p in parts:
                out.write(name, p["rows"], files.load_npz(p["path"], keys={name})[name])
        out.finish(labels.tolist(), paths, meta)
    return n
