"""Retrieval metrics: the authors' Recall@K (method.md §8.1) and MAP@R (method.md §8.3), exact and blockwise.

Definitions without a gallery (query set = gallery set = all N rows, each query left out of its
own ranking; similarity = raw dot product, no normalisation):

* **Recall@K** (``WAOCD/compute_recall_as_ms.py``). For query ``i``: ``P`` = the similarities to
  every item with the same label, *including i itself*; ``t_i`` = the second-largest value of ``P``
  (``sorted(P)[-2]``); ``n_i`` = the number of different-label items with similarity **strictly**
  greater than ``t_i`` (method.md S7: ties favour the query); hit@K iff ``n_i < K``;
  ``R@K = #hits / N``. A label with a single item makes the authors' script crash; here it raises
  ``ValueError`` naming the label.
* **MAP@R** (Musgrave et al.). ``R_i`` = number of *other* items with the query's label. All other
  items are ranked by similarity, descending, ties broken by the lower (original) row index first;
  ``AP@R_i = (1/R_i) * sum_{k<=R_i} P@k * rel_k``; MAP@R = mean over queries. Queries whose label
  has no other item (``R_i = 0``) are skipped, as pytorch-metric-learning does; they still take
  part as gallery items.

With a separate gallery (``gallery=[Ng, D]``, ``gallery_labels=[Ng]``; issue 15, In-Shop), the
authors' rule carried over: ``t_i`` = the query's **largest** similarity to a same-label gallery
item; hit@K iff fewer than K gallery items score strictly higher (ties favour the query).
MAP@R ranks the gallery by (-similarity, gallery row), ``R_i`` = the number of same-label gallery
items. Queries without any same-label gallery item are excluded from every metric and counted
(``n_excluded_queries``). A query that is also a gallery row (``query_gallery_index``) is left out
of its own ranking and of ``R_i``.

Algorithm (one pass over blocks of query rows; the N x N matrix is never materialised):

1. Queries are processed in label order; gallery columns stay in their original order (so the
   gallery features are never copied when they already have the screening dtype, and a column
   index is the MAP@R tie-break). A stable label-sorted permutation of the gallery gives each
   query's same-label items.
2. For each block of ``B`` query rows: one matmul ``A = Q_b @ G^T`` (``B x Ng``, the *screening*
   similarities) into a reused buffer, the query's own column set to ``-inf``, then one ``topk``
   per row with ``k = min(Ng', max(min(max(ks), 64) + 2, max R_i in the block) + 8)``. Recall and
   MAP@R read the same ``A`` and the same ``topk`` lists.
3. Every *decision* (is ``s_ij > t_i``? which items form the top ``R_i``, in which order?) is taken
   on the **canonical similarity** ``s_ij``: the float64 dot product computed with a fixed pairwise
   summation (products ``x_ik * x_jk`` in float64, zero-padded to a power of two, then halves added
   level by level, each step one correctly rounded IEEE operation). It depends only on the two
   vectors, never on the block size, the BLAS library, the matmul shape or the device.
4. Screening values only rule pairs in or out when the decision is certain. With ``u_s`` the unit
   roundoff of the screening dtype and ``u = 2^-53``::

       |A_ij - s_ij| <= E_i / 2,   E_i = 2 * [(gamma_{D+2}(u_s) + gamma_{ceil(log2 D)+1}(u))
                                              * |x_i| * max_j |x_j| + underflow terms],
       gamma_n(v) = n v / (1 - n v),

   valid for any summation order (blocked, FMA, GPU) of a plain dot-product matmul (Higham,
   *Accuracy and Stability of Numerical Algorithms*, §3.1; the ``+2`` covers rounding float64
   inputs to float32, the underflow terms cover gradual underflow and flush-to-zero; the leading
   2 is a safety factor). Thresholds are rounded *outwards* to the screening dtype, so comparing
   ``A`` with them is exact.

   * Recall: ``t~_i``, the second-largest screening value of {self, top-2 screened positives}
     (with a gallery: the largest screened positive), is within ``E_i/2`` of the canonical
     ``t_i`` (order statistics are 1-Lipschitz). With
     ``hi = up(t~ + 2E)`` and ``lo = down(t~ - 2E)``, ``A_ij > hi`` proves ``s_ij > t_i`` and
     ``A_ij < lo`` proves ``s_ij < t_i``. Different-label items in between are recomputed and
     compared with the canonical ``t_i``, itself computed (for those rows only) from ``s_ii`` and
     every positive with screening value ``>= v2 - 2E`` (a superset of the true top two; with a
     gallery ``>= v1 - 2E``, a superset of the true best). The
     ``topk`` list suffices when its last value is ``< lo`` (everything outside it is certainly
     below ``t_i``) or when it already holds ``>= max(ks)`` certain negatives (a miss at every K);
     otherwise the row is scanned in full (all items above ``hi`` minus the positives above it;
     the items in ``[lo, hi]`` rechecked), a few rows at a time.
   * MAP@R: each ``topk`` list is cut into clusters of consecutive values less than ``2E`` apart;
     across a wider gap the true order is certain. Items of multi-item clusters up to the one
     holding the ``R_i``-th entry are recomputed canonically; the row is sorted by (cluster,
     ``-s``, original index) and its first ``R_i`` items taken. If that boundary cluster reaches
     the end of the list, the row is scanned in full instead: every item with
     ``A >= v_R - 2E`` (a superset of the true top ``R_i``, index-tied items included) is
     recomputed and sorted by ``(-s, original index)``.
   * AP@R_i is summed left to right per query, and the mean over queries uses ``math.fsum``
     (correctly rounded), so MAP@R is bitwise independent of the block size and the device.

5. Screening dtype: float32 on CPU (sgemm outruns dgemm there and the matmul dominates the run
   time at 60k rows, so float64 screening would miss the time budget; BENCHMARKS.md),
   float64 on CUDA (fp64 tensor cores are as fast as
   fp32 on H100-class parts). float64 screening is also used on CPU when the features are too
   large for float32 (max norm > 2^50) or when torch is allowed reduced-precision float32 matmuls
   (``torch.set_float32_matmul_precision`` other than ``"highest"``, or mkldnn bf16/tf32), since the
   bound above would not hold then.

Exactness: every hit/miss and every MAP@R ranking equals that of the literal per-query loop of
method.md §8.1 / §8.3 evaluated on the canonical float64 similarities, for every block size and device
(Recall@K is therefore identical bit for bit; MAP@R differs from a loop only by the rounding of
its AP arithmetic, ~1e-16). Whenever the float64 dot products
are exact (integer, binary or dyadic features of moderate size: duplicates, zero rows, the
"tie that favours the query") this is also exactly what the authors' ``np.dot`` in float64 gives.
For general floats, numpy's own float64 matmul differs between BLAS builds in the last bits; the
canonical order is one such float64 evaluation, and the two can only disagree on a pair whose
similarities coincide to within a few float64 ulps (never observed on random data).

Cost: dominated by the screening matmul (``Nq * Ng * D`` multiply-adds) and one short ``topk``
per query; figures beside pytorch-metric-learning's faiss k-NN in BENCHMARKS.md
(``benchmarks/metrics_speed.py --suite``). Memory beyond the features themselves: one
``B x Ng`` screening block (<= 128 MB by default), chunked temporaries of <= 2^22 elements, and a
float32 copy only when the input is float64 (the CPU screening dtype is float32). Pure
functions: arrays in, numbers out, no I/O.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cfga.registry.features import RECALL_KS


class _LazyTorch:
    """``torch``, imported on first use: a small CPU call (one table cell of a few thousand
    images, one process per cell in the workflow) then never pays torch's import time."""

    def __getattr__(self, name):
        import torch as _torch

        globals()["torch"] = _torch
        return getattr(_torch, name)


torch = _LazyTorch()

__all__ = ["recall_at_k", "map_at_r", "retrieval_metrics", "DEFAULT_KS"]

DEFAULT_KS: tuple[int, ...] = RECALL_KS  # the K of the tables (cfga.registry.features)

_BLOCK_BUDGET_BYTES = 128 * 2**20  # screening block (B x N) budget when block_size is None
_CANON_CHUNK_BYTES = 4 * 2**20  # float64 product buffer per canonical-recheck chunk
_TOPK_SLACK = 8  # extra topk entries beyond what the decisions need, to avoid row fallbacks
# Recall lists stop at this length: with large K (SOP's 1000) a long topk would cost more than
# the GEMM; the few rows whose n_i reaches past the list are counted by a full-row scan instead.
_RECALL_LIST_CAP = 64
_U64 = 2.0**-53
_ETA64 = 2.0**-1022


# --------------------------------------------------------------------------------------------
# preparation


@dataclass
class _Prep:
    """Everything the blockwise pass needs. Queries are processed in label order; gallery
    columns stay in their ORIGINAL order (no copy of the gallery features is made when their
    dtype is already the screening dtype), so a column index is a gallery row index."""

    loo: bool  # leave-one-out (no gallery): query = gallery, threshold = method.md §8.1
    nq: int  # evaluated queries (excluded ones dropped)
    ng: int
    d: int
    device: torch.device
    qs: torch.Tensor  # [Nq_all, D] screening query features, original order (float32/64)
    gs: torch.Tensor  # [Ng, D] screening gallery features, original order
    qc: torch.Tensor  # [Nq_all, D] canonical source, queries
    gc: torch.Tensor  # [Ng, D] canonical source, gallery
    qrow: torch.Tensor  # [nq] original query row of each evaluated query, sorted by label
    qself: torch.Tensor  # [nq] gallery column of the query itself (loo: = qrow), -1 if none
    qlab: torch.Tensor  # [nq] label codes of the evaluated queries
    glab: torch.Tensor  # [Ng] label code of each gallery column
    gorder: torch.Tensor  # [Ng] gallery columns sorted by label (stable)
    pstart: torch.Tensor  # [nq] start in gorder of the query's label
    pend: torch.Tensor  # [nq] end (exclusive) in gorder of the query's label
    win_cpu: np.ndarray  # [nq] pend - pstart
    r: torch.Tensor  # [nq] R_i: same-label gallery items other than the query itself
    r_cpu: np.ndarray
    err: torch.Tensor  # [nq] float64, E_i
    sdtype: torch.dtype
    n_excluded: int  # gallery mode: queries without any same-label gallery item


def _gamma(n: int, u: float) -> float:
    nu = n * u
    if nu >= 0.5:
        return math.inf
    return nu / (1.0 - nu)


def _reduced_fp32_matmul_allowed() -> bool:
    try:
        if torch.get_float32_matmul_precision() != "highest":
            return True
    except Exception:  # pragma: no cover - very old torch
        pass
    try:
        prec = torch.backends.mkldnn.matmul.fp32_precision  # type: ignore[attr-defined]
        if prec not in ("none", "ieee"):
            return True
    except Exception:  # pragma: no cover - API absent
        pass
    return False


def _as_tensor(feats) -> torch.Tensor:
    if isinstance(feats, torch.Tensor):
        return feats.detach()
    arr = np.asarray(feats)
    if arr.dtype == object:
        raise TypeError("feats must be a numeric array")
    arr = np.ascontiguousarray(arr)
    with warnings.catch_warnings():  # read-only arrays are fine: feats are never written to
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def _resolve_device(feats, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(feats, torch.Tensor):
        return feats.device
    return torch.device("cpu")


_CHUNK_ELEMS = 2**22  # elements per chunk of the norms / row scans (bounded temporaries)


def _row_chunk(d: int) -> int:
    return max(1, _CHUNK_ELEMS // max(d, 1))


def _canonical_source(feats, dev, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, D] canonical source on ``dev``, [N] float64 row norms). float64 stays float64;
    float32/16/bf16 go to float32 (exact); ints/bools go to float64 like the authors'
    np.array(..., float64). No copy when the input already has that dtype, device and layout
    (a 60k x 4096 gallery is ~1 GB)."""
    x = _as_tensor(feats)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(x.shape)}")
    if x.is_complex():
        raise TypeError(f"{name} must be real")
    if x.shape[0] == 0:
        raise ValueError(f"{name} has no rows")
    if x.dtype == torch.float64:
        xc = x.to(dev)
    elif x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        xc = x.to(device=dev, dtype=torch.float32)
    else:
        xc = x.to(device=dev, dtype=torch.float64)
    xc = xc.contiguous()
    step = _row_chunk(xc.shape[1])
    norms = torch.cat([torch.linalg.vector_norm(xc[s : s + step], dim=1, dtype=torch.float64)
                       for s in range(0, xc.shape[0], step)])
    # a NaN or inf entry makes its row norm NaN or inf (float32 squares cannot overflow float64)
    if not bool(torch.isfinite(norms).all()):
        for s in range(0, xc.shape[0], step):
            if not bool(torch.isfinite(xc[s : s + step]).all()):
                raise ValueError(f"{name} contains NaN or infinite values")
        raise ValueError(f"{name} are too large for float64 dot products")
    return xc, norms


def _label_array(labels, n: int, name: str, rows: str) -> np.ndarray:
    lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    lab = lab.reshape(-1) if lab.ndim > 1 and lab.size == n else lab
    if lab.ndim != 1 or lab.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}] (one per row of {rows}), got {tuple(lab.shape)}")
    return lab


def _prepare(feats, labels, device, *, need_all_pairs: bool, gallery=None, gallery_labels=None,
             query_gallery_index=None) -> _Prep:
    dev = _resolve_device(feats, device)
    qc, qnorm = _canonical_source(feats, dev, "feats")
    nq_all, d = qc.shape
    lab_q = _label_array(labels, nq_all, "labels", "feats")
    loo = gallery is None
    if loo:
        if gallery_labels is not None or query_gallery_index is not None:
            raise ValueError("gallery_labels / query_gallery_index need a gallery")
        gc = qc
        uniq, qcode, counts = np.unique(lab_q, return_inverse=True, return_counts=True)
        qcode = qcode.reshape(-1).astype(np.int64)
        gcode = qcode
        if need_all_pairs:
            single = counts == 1
            if single.any():
                first_row = int(np.flatnonzero(single[qcode])[0])
                bad = uniq[qcode[first_row]]
                bad = bad.item() if isinstance(bad, np.generic) else bad
                n_bad = int(single.sum())
                more = f" ({n_bad - 1} other single-item label(s) too)" if n_bad > 1 else ""
                raise ValueError(
                    f"label {bad!r} has only one item (row {first_row}){more}: Recall@K as defined "
                    "by the authors needs the second-largest same-label similarity (their script "
                    "raises IndexError here)"
                )
        qself_all = np.arange(nq_all, dtype=np.int64)
        r_all = counts[qcode] - 1
        evaluated = np.ones(nq_all, dtype=bool)  # queries with R_i = 0 are skipped by MAP@R only
    else:
        if gallery_labels is None:
            raise ValueError("gallery_labels is required with a gallery")
        gc, gnorm = _canonical_source(gallery, dev, "gallery")
        if gc.shape[1] != d:
            raise ValueError(f"gallery has {gc.shape[1]} columns but feats has {d}: both must be [*, D]")
        lab_g = _label_array(gallery_labels, gc.shape[0], "gallery_labels", "gallery")
        uniq, codes = np.unique(np.concatenate([lab_q, lab_g]), return_inverse=True)
        codes = codes.reshape(-1).astype(np.int64)
        qcode, gcode = codes[:nq_all], codes[nq_all:]
        counts = np.bincount(gcode, minlength=len(uniq))
        if query_gallery_index is None:
            qself_all = np.full(nq_all, -1, dtype=np.int64)
        else:
            qself_all = np.asarray(query_gallery_index).reshape(-1).astype(np.int64)
            if qself_all.shape != (nq_all,) or (qself_all >= gc.shape[0]).any() or (qself_all < -1).any():
                raise ValueError(f"query_gallery_index must be [{nq_all}] gallery rows or -1")
            if (qself_all >= 0).any() and (gcode[qself_all[qself_all >= 0]] != qcode[qself_all >= 0]).any():
                raise ValueError("query_gallery_index pairs a query with a gallery row of another label")
        r_all = counts[qcode] - (qself_all >= 0)
        evaluated = r_all >= 1
        if not evaluated.any():
            raise ValueError("no query has a same-label gallery item: Recall@K and MAP@R are undefined")
    ng = gc.shape[0]

    ev = np.flatnonzero(evaluated)
    qrow_np = ev[np.argsort(qcode[ev], kind="stable")].astype(np.int64)
    qlab_np = qcode[qrow_np]
    gorder_np = np.argsort(gcode, kind="stable").astype(np.int64)
    gends = np.cumsum(counts)
    gstarts = gends - counts
    win = counts[qlab_np].astype(np.int64)
    r_np = r_all[qrow_np].astype(np.int64)

    # norms (float64) for the error bound
    if loo:
        gnorm = qnorm
    maxg = float(gnorm.max())
    maxnorm = max(maxg, float(qnorm.max()))
    if not math.isfinite(maxnorm * maxnorm) or maxnorm > 2.0**400:
        raise ValueError("feats are too large for float64 dot products")

    use32 = (
        dev.type == "cpu"
        and maxnorm <= 2.0**50
        and _gamma(d + 2, 2.0**-24) < 1e-2
        and not _reduced_fp32_matmul_allowed()
    )
    sdtype = torch.float32 if use32 else torch.float64
    u_s, eta_s = (2.0**-24, 2.0**-126) if use32 else (_U64, _ETA64)
    levels = max(1, math.ceil(math.log2(max(d, 1))))
    rel = _gamma(d + 2, u_s) + _gamma(levels + 1, _U64)
    sqrt_d = math.sqrt(max(d, 1))
    qrow = torch.from_numpy(qrow_np).to(dev)
    qn = qnorm[qrow]
    err = 2.0 * (
        rel * qn * maxg
        + eta_s * (2 * d + 4 + sqrt_d * (qn + maxg))
        + _ETA64 * (4 * d + 4)
    )
    err = err + 2.0**-1000  # strictly positive

    gs = gc if gc.dtype == sdtype else gc.to(sdtype)
    qs = gs if loo else (qc if qc.dtype == sdtype else qc.to(sdtype))
    return _Prep(
        loo=loo,
        nq=len(qrow_np),
        ng=ng,
        d=d,
        device=dev,
        qs=qs,
        gs=gs,
        qc=qc,
        gc=gc,
        qrow=qrow,
        qself=torch.from_numpy(qself_all[qrow_np]).to(dev),
        qlab=torch.from_numpy(qlab_np).to(dev),
        glab=torch.from_numpy(gcode).to(dev),
        gorder=torch.from_numpy(gorder_np).to(dev),
        pstart=torch.from_numpy(gstarts[qlab_np]).to(dev),
        pend=torch.from_numpy(gends[qlab_np]).to(dev),
        win_cpu=win,
        r=torch.from_numpy(r_np).to(dev),
        r_cpu=r_np,
        err=err.to(torch.float64),
        sdtype=sdtype,
        n_excluded=int(nq_all - len(qrow_np)),
    )


# --------------------------------------------------------------------------------------------
# canonical similarity and helpers


def _canonical_dot(qc: torch.Tensor, ia: torch.Tensor, gc: torch.Tensor, ib: torch.Tensor) -> torch.Tensor:
    """Canonical float64 dot products ``s[m] = <qc[ia[m]], gc[ib[m]]>`` (original row indices).

    Products in float64 (exact for float32 inputs), zero-padded to a power of two, then summed
    pairwise, level by level: ``p[:, :h] += p[:, h:2h]``. Every step is one correctly rounded
    IEEE float64 operation per element, so the value depends only on the two vectors, not on the
    chunking, the library or the device: on CPU numpy runs the very same operation sequence
    (it avoids torch's per-op threading overhead on many small gathers); on CUDA torch does.
    Returns float64 ``[M]`` on ``qc.device``.
    """
    m = int(ia.numel())
    if m == 0:
        return torch.empty(0, dtype=torch.float64, device=qc.device)
    d = qc.shape[1]
    dp = 1 if d <= 1 else 1 << (d - 1).bit_length()
    chunk = max(1, _CANON_CHUNK_BYTES // (8 * dp))
    if qc.device.type == "cpu":
        return _canonical_dot_numpy(qc, ia, ib, dp, chunk, gc)
    return _canonical_dot_torch(qc, ia, ib, dp, chunk, gc)


def _canonical_dot_numpy(xc, ia, ib, dp, chunk, xg=None):
    """CPU implementation of :func:`_canonical_dot` (same operation sequence, numpy ufuncs);
    ``ia`` indexes ``xc``, ``ib`` indexes ``xg`` (default: ``xc``)."""
    m, d = int(ia.numel()), xc.shape[1]
    x = xc.numpy()
    y = x if xg is None else xg.numpy()
    ia_n, ib_n = ia.numpy(), ib.numpy()
    out = np.empty(m, dtype=np.float64)
    buf = np.zeros((min(chunk, m), dp), dtype=np.float64)
    for s in range(0, m, chunk):
        e = min(m, s + chunk)
        p = buf[: e - s]
        np.multiply(x[ia_n[s:e]], y[ib_n[s:e]], out=p[:, :d], dtype=np.float64)
        p[:, d:] = 0.0
        w = dp
        while w > 1:
            h = w // 2
            np.add(p[:, :h], p[:, h:w], out=p[:, :h])
            w = h
        out[s:e] = p[:, 0]
    return torch.from_numpy(out)


def _canonical_dot_torch(xc, ia, ib, dp, chunk, xg=None):
    """Device (CUDA) implementation of :func:`_canonical_dot` (torch elementwise ops)."""
    m, d = int(ia.numel()), xc.shape[1]
    y = xc if xg is None else xg
    out = torch.empty(m, dtype=torch.float64, device=xc.device)
    for s in range(0, m, chunk):
        e = min(m, s + chunk)
        p = torch.zeros((e - s, dp), dtype=torch.float64, device=xc.device)
        p[:, :d] = xc[ia[s:e]]
        p[:, :d].mul_(y[ib[s:e]])
        w = dp
        while w > 1:
            h = w // 2
            p[:, :h].add_(p[:, h:w])
            w = h
        out[s:e] = p[:, 0]
    return out


def _round_down(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Largest value of ``dtype`` that is <= v (v float64)."""
    f = v.to(dtype)
    if dtype == torch.float64:
        return f
    return torch.where(f.to(torch.float64) > v, torch.nextafter(f, torch.full_like(f, -math.inf)), f)


def _round_up(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Smallest value of ``dtype`` that is >= v (v float64)."""
    f = v.to(dtype)
    if dtype == torch.float64:
        return f
    return torch.where(f.to(torch.float64) < v, torch.nextafter(f, torch.full_like(f, math.inf)), f)


def _auto_block_size(prep: _Prep) -> int:
    item = prep.gs.element_size()
    maxw = int(prep.win_cpu.max())
    # the B x Ng block, plus the per-row same-label window (index, values, masks)
    per_row = prep.ng * item + maxw * (8 + 8 + 8 + 2)
    return int(max(1, min(prep.nq, _BLOCK_BUDGET_BYTES // max(per_row, 1))))


# --------------------------------------------------------------------------------------------
# the blockwise pass


@dataclass
class _Block:
    b0: int
    B: int
    ar: torch.Tensor  # [B] 0..B-1
    q: torch.Tensor  # [B] original query rows
    qself: torch.Tensor  # [B] gallery column of the query itself, -1 if none
    A: torch.Tensor  # [B, Ng] screening similarities, the query's own column = -inf
    diag: torch.Tensor | None  # [B] float64, screening self-similarities (leave-one-out only)
    lab: torch.Tensor  # [B] label codes
    err: torch.Tensor  # [B] float64, E_i
    r: torch.Tensor  # [B] R_i
    topv: torch.Tensor  # [B, k] screening values, descending
    topi: torch.Tensor  # [B, k] gallery columns
    all_in_list: bool  # the lists hold every gallery item other than the query itself


def _run(prep: _Prep, ks: Sequence[int] | None, want_map: bool, block_size: int | None):
    nq, ng, dev, sd = prep.nq, prep.ng, prep.device, prep.sdtype
    want_recall = ks is not None
    kmax = max(ks) if want_recall else 0
    bs = _auto_block_size(prep) if block_size is None else int(block_size)
    if bs < 1:
        raise ValueError("block_size must be >= 1")
    bs = min(bs, nq)

    buf = torch.empty((bs, ng), dtype=sd, device=dev)
    n_capped = torch.zeros(nq, dtype=torch.int64, device=dev) if want_recall else None  # min(n_i, kmax)
    ap = torch.zeros(nq, dtype=torch.float64, device=dev) if want_map else None  # AP@R_i, sorted order
    gs_t = prep.gs.T
    avail = ng - 1 if prep.loo else ng  # list entries that can be real (not the query's own column)
    has_self = not prep.loo and bool((prep.qself >= 0).any())

    for b0 in range(0, nq if avail >= 1 else 0, bs):
        b1 = min(nq, b0 + bs)
        B = b1 - b0
        ar = torch.arange(B, device=dev)
        q = prep.qrow[b0:b1]
        qself = prep.qself[b0:b1]
        A = buf[:B]
        torch.mm(prep.qs[q], gs_t, out=A)
        diag = None
        if prep.loo:
            diag = A[ar, q].to(torch.float64)
            A[ar, q] = -math.inf  # the query itself is never a neighbour
        elif has_self:
            own = qself >= 0
            A[ar[own], qself[own]] = -math.inf
        rmax_b = int(prep.r_cpu[b0:b1].max())
        k = min(avail, max(min(kmax, _RECALL_LIST_CAP) + 2 if want_recall else 0,
                           rmax_b if want_map else 0) + _TOPK_SLACK)
        topv, topi = torch.topk(A, k, dim=1)
        blk = _Block(b0, B, ar, q, qself, A, diag, prep.qlab[b0:b1], prep.err[b0:b1], prep.r[b0:b1],
                     topv, topi, k == avail)
        if want_recall:
            n_capped[b0:b1] = _recall_block(prep, blk, kmax)
        if want_map:
            ap[b0:b1] = _map_block(prep, blk)

    recall = None
    if want_recall:
        recall = {int(K): float(int((n_capped < K).sum())) / nq for K in ks}
    mapr = None
    if want_map:
        valid = prep.r_cpu >= 1
        if not valid.any():
            raise ValueError("MAP@R undefined: no label has two or more items")
        # correctly rounded sum: the result does not depend on the block size
        mapr = math.fsum(ap.cpu().numpy()[valid].tolist()) / int(valid.sum())
    return recall, mapr


def _positive_window(prep: _Prep, blk: _Block):
    """Each row's same-label gallery items other than the query itself: gallery columns [B, m],
    validity [B, m], screening values [B, m] (-inf where invalid); m = the largest window."""
    cs = prep.pstart[blk.b0 : blk.b0 + blk.B]
    ce = prep.pend[blk.b0 : blk.b0 + blk.B]
    m = int(prep.win_cpu[blk.b0 : blk.b0 + blk.B].max())
    pos = cs[:, None] + torch.arange(m, device=prep.device)[None, :]
    inside = pos < ce[:, None]
    idx = prep.gorder[torch.where(inside, pos, cs[:, None])]
    valid = inside & (idx != blk.qself[:, None])
    vals = blk.A.gather(1, idx)
    vals = torch.where(valid, vals, torch.tensor(-math.inf, dtype=vals.dtype, device=vals.device))
    return idx, valid, vals


def _top2(vals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest and second-largest value per row as float64 (-inf when absent)."""
    k2 = min(2, vals.shape[1])
    top = torch.topk(vals, k2, dim=1).values.to(torch.float64)
    if k2 < 2:
        top = torch.cat([top, torch.full((vals.shape[0], 2 - k2), -math.inf, dtype=torch.float64,
                                         device=vals.device)], dim=1)
    return top[:, 0], top[:, 1]


def _second_of_three(a, b, c) -> torch.Tensor:
    """Second-largest of the multiset {a, b, c}, elementwise."""
    return torch.sort(torch.stack([a, b, c], dim=1), dim=1, descending=True).values[:, 1]


def _exact_thresholds(prep: _Prep, blk: _Block, sub, pos_idx, pos_valid, pos_vals) -> torch.Tensor:
    """Canonical t_i for local rows ``sub``. Leave-one-out: the second-largest same-label
    similarity, self included; every other positive with screening value >= v2 - 2E (v2 = the
    second-largest screening value among them) is recomputed: this superset holds the true top
    two. Gallery: the largest same-label gallery similarity, from the positives >= v1 - 2E."""
    sd = prep.sdtype
    v, va, ix = pos_vals[sub], pos_valid[sub], pos_idx[sub]
    err, r = blk.err[sub], blk.r[sub]
    v1, v2 = _top2(v)
    if prep.loo:
        thr = torch.where(r >= 2, _round_down(v2 - 2.0 * err, sd),
                          torch.tensor(-math.inf, dtype=sd, device=prep.device))
    else:
        thr = _round_down(v1 - 2.0 * err, sd)
    pr, pk = (va & (v >= thr[:, None])).nonzero(as_tuple=True)
    S = torch.full(v.shape, -math.inf, dtype=torch.float64, device=prep.device)
    o = blk.q[sub]
    S[pr, pk] = _canonical_dot(prep.qc, o[pr], prep.gc, ix[pr, pk])
    m1, m2 = _top2(S)
    if not prep.loo:
        return m1
    return _second_of_three(_canonical_dot(prep.qc, o, prep.qc, o), m1, m2)


def _recall_block(prep: _Prep, blk: _Block, kmax: int) -> torch.Tensor:
    """min(n_i, kmax) for the block's rows, n_i = #{j: different label, s_ij > t_i}."""
    sd, dev, B = prep.sdtype, prep.device, blk.B
    pos_idx, pos_valid, pos_vals = _positive_window(prep, blk)
    v1, v2 = _top2(pos_vals)
    # screening estimate of t_i; |t_apx - t_i| <= E_i (an order statistic is 1-Lipschitz)
    t_apx = _second_of_three(blk.diag, v1, v2) if prep.loo else v1
    hi = _round_up(t_apx + 2.0 * blk.err, sd)  # A > hi  =>  s > t
    lo = _round_down(t_apx - 2.0 * blk.err, sd)  # A < lo  =>  s < t
    topv, topi = blk.topv, blk.topi
    diff = prep.glab[topi] != blk.lab[:, None]
    above = topv > hi[:, None]
    count = (diff & above).sum(1)
    unc = diff & (topv >= lo[:, None]) & ~above
    complete = torch.ones(B, dtype=torch.bool, device=dev) if blk.all_in_list else topv[:, -1] < lo
    need = count < kmax
    pr, pk = (unc & (need & complete)[:, None]).nonzero(as_tuple=True)
    pc = topi[pr, pk]
    fb = (need & ~complete).nonzero(as_tuple=True)[0]
    if fb.numel():  # list too short (near-ties, or n_i past the capped list): scan the full rows
        step = _row_chunk(prep.ng)
        for c0 in range(0, fb.numel(), step):
            fc_rows = fb[c0 : c0 + step]
            sub = blk.A[fc_rows]
            hf, lf = hi[fc_rows][:, None], lo[fc_rows][:, None]
            sub_above = sub > hf
            # every item above hi, minus the positives above hi (the query's own column is -inf)
            pos_above = (pos_valid[fc_rows] & (pos_vals[fc_rows] > hf)).sum(1)
            count[fc_rows] = sub_above.sum(1) - pos_above
            fr, fc = ((sub >= lf) & ~sub_above).nonzero(as_tuple=True)
            neg = prep.glab[fc] != blk.lab[fc_rows[fr]]
            pr = torch.cat([pr, fc_rows[fr[neg]]])
            pc = torch.cat([pc, fc[neg]])
    if pr.numel():
        urows = torch.unique(pr)
        t = torch.full((B,), math.nan, dtype=torch.float64, device=dev)
        t[urows] = _exact_thresholds(prep, blk, urows, pos_idx, pos_valid, pos_vals)
        s = _canonical_dot(prep.qc, blk.q[pr], prep.gc, pc)
        count += torch.bincount(pr[s > t[pr]], minlength=B)
    return torch.clamp(count, max=kmax)


def _ap_from_terms(terms: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """AP@R = (sum of the terms, added left to right) / R; terms [rows, m] float64, zero-padded.

    The fixed left-to-right order makes the value independent of which path produced it."""
    acc = torch.zeros(terms.shape[0], dtype=torch.float64, device=terms.device)
    for j in range(terms.shape[1]):
        acc += terms[:, j]
    return acc / torch.clamp(r, min=1).to(torch.float64)


def _map_block(prep: _Prep, blk: _Block) -> torch.Tensor:
    """AP@R_i for the block's rows (0 where R_i = 0), float64 [B]."""
    dev, B = prep.device, blk.B
    valid = blk.r >= 1
    out = torch.zeros(B, dtype=torch.float64, device=dev)
    if not bool(valid.any()):
        return out
    topv, topi = blk.topv, blk.topi
    tv = topv.to(torch.float64)
    # Clusters: consecutive list entries closer than 2E (so their true order is unknown).
    # Across a gap > 2E the true order is certain (s_a >= A_a - E > A_b + E >= s_b).
    gap = (tv[:, :-1] - tv[:, 1:]) > (2.0 * (1.0 + 2.0**-40)) * blk.err[:, None]
    cid = torch.cat([torch.zeros((B, 1), dtype=torch.int64, device=dev), torch.cumsum(gap, 1)], 1)
    ridx = torch.clamp(blk.r - 1, min=0)
    cid_r = cid.gather(1, ridx[:, None])  # cluster holding the R-th entry
    if blk.all_in_list:
        complete = torch.ones(B, dtype=torch.bool, device=dev)
    else:  # the boundary cluster must end inside the list
        complete = cid[:, -1] > cid_r[:, 0]
    ok = valid & complete
    no = torch.zeros((B, 1), dtype=torch.bool, device=dev)
    multi = torch.cat([no, ~gap], 1) | torch.cat([~gap, no], 1)
    pr, pk = ((cid <= cid_r) & multi & ok[:, None]).nonzero(as_tuple=True)
    S = tv.clone()
    S[pr, pk] = _canonical_dot(prep.qc, blk.q[pr], prep.gc, topi[pr, pk])
    m = int(prep.r_cpu[blk.b0 : blk.b0 + B].max())
    ranked = topi[:, :m].clone()
    srt = torch.unique(pr)  # rows whose first R_i entries are not all in singleton clusters
    if srt.numel():  # sort those rows by (cluster, -s, gallery index); the rest keep list order
        ti, cs, ss = topi[srt], cid[srt], S[srt]
        o = torch.argsort(ti, dim=1, stable=True)
        o = o.gather(1, torch.argsort(ss.gather(1, o), dim=1, descending=True, stable=True))
        o = o.gather(1, torch.argsort(cs.gather(1, o), dim=1, stable=True))
        ranked[srt] = ti.gather(1, o[:, :m])
    rel = prep.glab[ranked] == blk.lab[:, None]
    pos = torch.arange(1, m + 1, device=dev, dtype=torch.float64)
    relm = (rel & (pos[None, :] <= blk.r[:, None])).to(torch.float64)
    terms = torch.cumsum(relm, 1) / pos * relm  # P@k * rel_k
    out = torch.where(ok, _ap_from_terms(terms, blk.r), out)
    fb = (valid & ~complete).nonzero(as_tuple=True)[0]
    if fb.numel():
        out[fb] = _map_fallback(prep, blk, fb, tv.gather(1, ridx[:, None])[:, 0])
    return out


def _map_fallback(prep: _Prep, blk: _Block, fb: torch.Tensor, v_r: torch.Tensor) -> torch.Tensor:
    """AP@R_i for local rows ``fb`` by a full-row scan: every item with A >= v_R - 2E (a superset
    of the true top R_i) is recomputed canonically and sorted by (-s, gallery index)."""
    sd, dev = prep.sdtype, prep.device
    F = fb.numel()
    thr = _round_down(v_r[fb] - 2.0 * blk.err[fb], sd)
    step = _row_chunk(prep.ng)
    parts = [(blk.A[fb[c0 : c0 + step]] >= thr[c0 : c0 + step, None]).nonzero(as_tuple=False)
             for c0 in range(0, F, step)]
    offs = torch.tensor([c0 for c0 in range(0, F, step)], device=dev)
    fr = torch.cat([p[:, 0] + offs[j] for j, p in enumerate(parts)])
    fc = torch.cat([p[:, 1] for p in parts])
    s = _canonical_dot(prep.qc, blk.q[fb[fr]], prep.gc, fc)
    o = torch.argsort(fc, stable=True)
    o = o[torch.argsort(s[o], descending=True, stable=True)]
    o = o[torch.argsort(fr[o], stable=True)]
    fr, fc = fr[o], fc[o]
    cnt = torch.bincount(fr, minlength=F)
    rank = torch.arange(fr.numel(), device=dev) - (torch.cumsum(cnt, 0) - cnt)[fr]  # 0-based
    r = blk.r[fb]
    keep = rank < r[fr]
    fr, fc, rank = fr[keep], fc[keep], rank[keep]
    m = int(r.max())
    rel = torch.zeros((F, m), dtype=torch.float64, device=dev)
    rel[fr, rank] = (prep.glab[fc] == blk.lab[fb][fr]).to(torch.float64)
    pos = torch.arange(1, m + 1, device=dev, dtype=torch.float64)
    return _ap_from_terms(torch.cumsum(rel, 1) / pos * rel, r)


# --------------------------------------------------------------------------------------------
# small inputs: the authors' own computation, numpy float64 X·Xᵀ, no torch

SMALL_N = 2048  # below this (and on CPU, block_size unset) the full float64 matrix is used


def _is_small(feats, device, block_size) -> bool:
    if block_size is not None or device not in (None, "cpu"):
        return False
    if type(feats).__module__.split(".")[0] == "torch":
        return False
    return np.ndim(feats) == 2 and np.shape(feats)[0] <= SMALL_N


def _small_metrics(feats, labels, ks, want_recall: bool, want_map: bool):
    """Recall@K (method.md §8.1) and MAP@R (§8.3) from the full N×N float64 similarity matrix.

    This is literally the authors' ``RetMetric``: X as float64, Sim = X·Xᵀ by numpy.
    """
    X = np.asarray(feats)
    if X.dtype == object or X.ndim != 2:
        raise TypeError("feats must be a numeric [N, D] array")
    X = X.astype(np.float64)
    if not np.isfinite(X).all():
        raise ValueError("feats contain NaN or infinite values")
    y = np.asarray(labels)
    if y.shape != (X.shape[0],):
        raise ValueError(f"labels must have shape ({X.shape[0]},), got {y.shape}")
    uniq, codes, counts = np.unique(y, return_inverse=True, return_counts=True)
    if want_recall and (counts < 2).any():
        lone = int(np.flatnonzero(counts < 2)[0])
        row = int(np.flatnonzero(codes == lone)[0])
        raise ValueError(
            f"label {uniq[lone].item()!r} has only one item (row {row}); the authors' Recall@K is undefined "
            "for it (their script raises IndexError)"
        )
    if want_map and not (counts >= 2).any():
        raise ValueError("MAP@R needs at least one label with two or more items")
    S = X @ X.T
    same = codes[:, None] == codes[None, :]
    recall = None
    if want_recall:
        P = np.where(same, S, -np.inf)
        t = -np.sort(-P, axis=1)[:, 1]  # second-largest same-label value (query included)
        n = ((S > t[:, None]) & ~same).sum(axis=1)
        recall = {k: float((n < k).mean()) for k in ks}
    mapr = None
    if want_map:
        r = counts[codes] - 1
        aps = []
        for i in np.flatnonzero(r >= 1):
            row = S[i].copy()
            row[i] = -np.inf  # the query is not in its own ranking
            order = np.argsort(-row, kind="stable")[: r[i]]  # ties: lower index first
            rel = (codes[order] == codes[i]).astype(np.float64)
            prec = np.cumsum(rel) / np.arange(1, r[i] + 1)
            aps.append(math.fsum(prec * rel) / r[i])
        mapr = math.fsum(aps) / len(aps)
    return recall, mapr


# --------------------------------------------------------------------------------------------
# public API


def _check_ks(ks) -> list[int]:
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks}")
    return ks


def _compute(feats, labels, ks, want_map, gallery, gallery_labels, query_gallery_index, device,
             block_size):
    """(recall dict or None, MAP@R or None, n_excluded) for either mode."""
    if gallery is None and gallery_labels is None and query_gallery_index is None and _is_small(
            feats, device, block_size):
        recall, mapr = _small_metrics(feats, labels, ks or (), ks is not None, want_map)
        return recall, mapr, 0
    prep = _prepare(feats, labels, device, need_all_pairs=ks is not None, gallery=gallery,
                    gallery_labels=gallery_labels, query_gallery_index=query_gallery_index)
    recall, mapr = _run(prep, ks, want_map, block_size)
    return recall, mapr, prep.n_excluded


def recall_at_k(feats, labels, ks=DEFAULT_KS, *, gallery=None, gallery_labels=None,
                query_gallery_index=None, device=None, block_size=None, return_excluded=False):
    """The authors' Recall@K (method.md §8.1), raw dot product (features are not normalised here).

    feats: ``[Nq, D]`` query features, np.ndarray or torch.Tensor, any real dtype.
    labels: ``[Nq]`` query labels. ks: the K values.
    gallery: ``[Ng, D]`` gallery features, or None: then query = gallery = all rows, left out
        one at a time, exactly method.md §8.1 (threshold = second-largest same-label similarity,
        self included).
    gallery_labels: ``[Ng]``, required with ``gallery``. With a gallery, a query's threshold is
        its largest similarity to a same-label gallery item, and it is a hit at K iff fewer than
        K gallery items score strictly higher (ties favour the query). Queries without any
        same-label gallery item are excluded (not counted in the denominator).
    query_gallery_index: ``[Nq]`` int, the gallery row holding the query itself or -1 (rows
        that are both query and gallery, e.g. open-metric-learning CSVs); that row is left out of
        the query's ranking and R. Only with ``gallery``.
    device: torch device for the matmuls (default: feats' device if it is a tensor, else CPU).
    block_size: query rows per block (default: from a 128 MB budget).
    return_excluded: also return the number of excluded queries.

    Returns ``{K: R@K}`` with R@K a fraction in [0, 1] (not percent), or
    ``({K: R@K}, n_excluded)`` with ``return_excluded``.
    Raises ValueError (naming the label) if, without a gallery, some label has a single item;
    with a gallery, if no query has a same-label gallery item.
    """
    ks = _check_ks(ks)
    recall, _, n_ex = _compute(feats, labels, ks, False, gallery, gallery_labels, query_gallery_index,
                               device, block_size)
    return (recall, n_ex) if return_excluded else recall


def map_at_r(feats, labels, *, gallery=None, gallery_labels=None, query_gallery_index=None,
             device=None, block_size=None, return_excluded=False):
    """MAP@R (method.md §8.3), raw dot product, ties broken by the lower gallery row index.

    feats: ``[Nq, D]``; labels: ``[Nq]``. Without a gallery, query = gallery = all rows and
    R_i = the number of OTHER items with the query's label; queries with R_i = 0 are skipped (as
    pytorch-metric-learning's ``mean_average_precision_at_r`` with query = reference) but stay in
    the gallery. With ``gallery`` ``[Ng, D]`` / ``gallery_labels`` ``[Ng]``: the gallery is ranked,
    R_i = the number of same-label gallery items (minus the query's own row, see
    ``query_gallery_index`` in :func:`recall_at_k`); queries with R_i = 0 are excluded.

    Returns MAP@R as a fraction in [0, 1], or ``(MAP@R, n_excluded)`` with ``return_excluded``
    (without a gallery n_excluded is 0: the skipped queries are not a data problem there).
    Raises ValueError if no query has R_i >= 1.
    """
    _, mapr, n_ex = _compute(feats, labels, None, True, gallery, gallery_labels, query_gallery_index,
                             device, block_size)
    return (mapr, n_ex) if return_excluded else mapr


def retrieval_metrics(feats, labels, ks=DEFAULT_KS, *, gallery=None, gallery_labels=None,
                      query_gallery_index=None, device=None, block_size=None) -> dict:
    """Recall@K and MAP@R in one blockwise pass (the similarity blocks are shared).

    Same inputs and errors as :func:`recall_at_k` (shapes: feats ``[Nq, D]``, labels ``[Nq]``,
    gallery ``[Ng, D]``, gallery_labels ``[Ng]``). Returns ``{"recall@1": .., "recall@2": ..,
    ..., "map@r": ..}`` (fractions in [0, 1]), keys in the order of ``ks``; with a gallery also
    ``"n_queries"`` (queries evaluated) and ``"n_excluded_queries"`` (queries without any
    same-label gallery item, left out of every metric).
    """
    ks = _check_ks(ks)
    recall, mapr, n_ex = _compute(feats, labels, ks, True, gallery, gallery_labels, query_gallery_index,
                                  device, block_size)
    out = {f"recall@{k}": v for k, v in recall.items()}
    out["map@r"] = mapr
    if gallery is not None:
        n_all = len(labels)
        out["n_queries"] = n_all - n_ex
        out["n_excluded_queries"] = n_ex
    return out
