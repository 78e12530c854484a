"""Query/gallery Recall@K and MAP@R (issue 15) against a plain float64 reference and PML.

The reference below is a literal per-query loop over the full float64 similarity matrix; on
binary, quantised (dyadic) or integer features every float64 dot product is exact, so it and
cfga.numerics.metrics must agree bit for bit, ties included.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cfga.numerics.metrics import map_at_r, recall_at_k, retrieval_metrics

KS = (1, 2, 4, 8, 16, 32)


def reference(Q, yq, G, yg, ks=KS, self_index=None):
    """Threshold = best same-label gallery similarity; hit@K iff fewer than K gallery items score
    strictly higher; MAP@R over the gallery ranked by (-s, gallery index), R = same-label gallery
    items. A query's own gallery row (self_index) is left out. Queries with R = 0 are excluded.
    Returns ({K: R@K}, MAP@R, n_excluded)."""
    S = np.asarray(Q, np.float64) @ np.asarray(G, np.float64).T
    yq, yg = np.asarray(yq), np.asarray(yg)
    hits = {k: 0 for k in ks}
    aps, excluded = [], 0
    for i in range(len(yq)):
        keep = np.ones(len(yg), dtype=bool)
        if self_index is not None and self_index[i] >= 0:
            keep[self_index[i]] = False
        same = keep & (yg == yq[i])
        R = int(same.sum())
        if R == 0:
            excluded += 1
            continue
        t = S[i][same].max()
        n_higher = int(np.sum(S[i][keep] > t))
        for k in ks:
            hits[k] += n_higher < k
        cand = np.flatnonzero(keep)
        ranked = cand[np.lexsort((cand, -S[i, cand]))][:R]
        rel = (yg[ranked] == yq[i]).astype(np.float64)
        terms = np.cumsum(rel) / np.arange(1, R + 1) * rel
        acc = 0.0
        for v in terms:  # left to right, as documented for the module
            acc += float(v)
        aps.append(acc / R)
    n = len(yq) - excluded
    return {k: hits[k] / n for k in ks}, math.fsum(aps) / n, excluded


# --------------------------------------------------------------------------------------------
# tie-heavy data


def binary(seed, nq=150, ng=260, d=5, c=25):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 2, (nq, d)).astype(np.float32), rng.integers(0, c + 3, nq),  # some absent
            rng.integers(0, 2, (ng, d)).astype(np.float32), rng.integers(0, c, ng))


def quantised_dups_zeros(seed, nq=170, ng=300, d=8, c=30):
    """Dyadic values in {-1, -0.5, .., 1}, zero rows, gallery copies of queries under other labels."""
    rng = np.random.default_rng(seed)
    Q = rng.integers(-2, 3, (nq, d)) / 2.0
    G = rng.integers(-2, 3, (ng, d)) / 2.0
    Q[rng.random(nq) < 0.1] = 0.0
    G[rng.random(ng) < 0.1] = 0.0
    src = rng.integers(0, nq, 40)
    G[rng.integers(0, ng, 40)] = Q[src]  # exact duplicates, labels unrelated
    G[rng.integers(0, ng, 20)] = G[rng.integers(0, ng, 20)]
    return Q, rng.integers(0, c, nq), G, rng.integers(0, c, ng)


def integer_unnormalised(seed, nq=120, ng=200, d=4, c=12):
    rng = np.random.default_rng(seed)
    return (rng.integers(-3, 4, (nq, d)).astype(np.int64), rng.integers(0, c, nq),
            rng.integers(-3, 4, (ng, d)).astype(np.float64) * rng.choice([0.25, 1, 4], (ng, 1)),
            rng.integers(0, c, ng))


TIE_HEAVY = {"binary": binary, "quantised_dups_zeros": quantised_dups_zeros,
             "integer_unnormalised": integer_unnormalised}


@pytest.mark.parametrize("name", sorted(TIE_HEAVY))
@pytest.mark.parametrize("seed", [0, 1])
def test_gallery_equals_reference_exactly_on_ties(name, seed):
    Q, yq, G, yg = TIE_HEAVY[name](seed)
    rec, mapr, n_ex = reference(Q, yq, G, yg)
    for bs in (None, 1, 7, 64):
        got = retrieval_metrics(Q, yq, gallery=G, gallery_labels=yg, block_size=bs)
        assert {k: got[f"recall@{k}"] for k in KS} == rec
        assert got["map@r"] == mapr
        assert got["n_excluded_queries"] == n_ex and got["n_queries"] == len(yq) - n_ex
    assert recall_at_k(Q, yq, KS, gallery=G, gallery_labels=yg, return_excluded=True) == (rec, n_ex)
    assert map_at_r(Q, yq, gallery=G, gallery_labels=yg, block_size=5) == mapr
    assert map_at_r(Q, yq, gallery=G, gallery_labels=yg, return_excluded=True) == (mapr, n_ex)


def loo_recall(X, y, ks):
    """method.md §8.1 without a gallery, vectorised: t = second-largest same-label value, self included."""
    S = np.asarray(X, np.float64) @ np.asarray(X, np.float64).T
    same = y[:, None] == y[None, :]
    t = -np.sort(-np.where(same, S, -np.inf), axis=1)[:, 1]
    n = ((S > t[:, None]) & ~same).sum(1)
    return {k: float((n < k).sum()) / len(y) for k in ks}


def test_large_k_past_the_topk_list():
    """SOP's K = 1000: rows whose n_i runs past the capped topk list are counted by a row scan."""
    ks = (1, 10, 100, 1000)
    Q, yq, G, yg = quantised_dups_zeros(5, nq=700, ng=2600, d=6, c=200)
    rec, mapr, _ = reference(Q, yq, G, yg, ks=ks)
    got = retrieval_metrics(Q, yq, ks, gallery=G, gallery_labels=yg, block_size=97)
    assert {k: got[f"recall@{k}"] for k in ks} == rec and got["map@r"] == mapr
    assert 0 < rec[100] < rec[1000] < 1
    rng = np.random.default_rng(6)
    X, y = rng.integers(0, 2, (2200, 7)).astype(np.float32), np.arange(2200) % 300
    assert recall_at_k(X, y, ks, block_size=200) == loo_recall(X, y, ks)


def test_binary_has_ties_and_exclusions():
    """The tie-heavy data really exercises ties and excluded queries."""
    Q, yq, G, yg = binary(0)
    S = Q.astype(np.float64) @ G.T.astype(np.float64)
    assert len(np.unique(S)) <= 6 and reference(Q, yq, G, yg)[2] > 0


def test_input_types_devices_and_dtypes():
    Q, yq, G, yg = binary(3)
    want = reference(Q, yq, G, yg, ks=(1, 5))[0]
    for q, g in ((Q, G), (torch.from_numpy(Q), torch.from_numpy(G)),
                 (Q.astype(np.float64), G.astype(np.float16)), (Q.astype(np.int32), G.astype(bool))):
        assert recall_at_k(q, torch.as_tensor(yq), (1, 5), gallery=g, gallery_labels=list(yg)) == want


def test_tie_favours_query_hand():
    # q0=(1,0) l0: gallery a=(1,0) l0, b=(1,0) l1, c=(0,1) l1 -> t=1; b=1 not > 1 -> hit@1
    # q1=(1,0) l1: same-label b=1, c=0 -> t=1; a=1 not > 1 -> hit@1
    # q2=(0,1) l0: same-label a=0 -> t=0; c=1 > 0 -> n=1: miss@1, hit@2
    # q3=(0,1) l7: no same-label gallery item -> excluded
    Q = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], np.float32)
    G = np.array([[1, 0], [1, 0], [0, 1]], np.float32)
    yq, yg = [0, 1, 0, 7], [0, 1, 1]
    assert recall_at_k(Q, yq, (1, 2), gallery=G, gallery_labels=yg, return_excluded=True) == ({1: 2 / 3, 2: 1.0}, 1)
    # MAP@R (ties by gallery index): q0 (R=1) -> a (#0) rel: AP 1; q1 (R=2: b, c) -> a (#0), b (#1):
    # rel 0, 1 -> AP (1/2)/2 = 1/4; q2 (R=1) -> c (1): AP 0  ->  (1 + 1/4 + 0)/3
    assert map_at_r(Q, yq, gallery=G, gallery_labels=yg) == (1 + 0.25) / 3


def test_query_gallery_index_leaves_the_query_out():
    """Rows that are both query and gallery (open-metric-learning CSVs): the query's own row is
    neither its threshold nor in its ranking, nor counted in R."""
    rng = np.random.default_rng(11)
    X = rng.integers(0, 2, (200, 5)).astype(np.float32)
    y = rng.integers(0, 30, 200)
    qi = np.arange(0, 120)
    gi = np.arange(60, 200)  # rows 60..119 are both
    self_index = np.where(qi >= 60, qi - 60, -1)
    rec, mapr, n_ex = reference(X[qi], y[qi], X[gi], y[gi], self_index=self_index)
    got = retrieval_metrics(X[qi], y[qi], gallery=X[gi], gallery_labels=y[gi],
                            query_gallery_index=self_index, block_size=13)
    assert {k: got[f"recall@{k}"] for k in KS} == rec and got["map@r"] == mapr
    assert got["n_excluded_queries"] == n_ex
    with pytest.raises(ValueError, match="another label"):
        bad = self_index.copy()
        bad[np.flatnonzero(y[qi][60:] != y[gi][0])[0] + 60] = 0
        retrieval_metrics(X[qi], y[qi], gallery=X[gi], gallery_labels=y[gi], query_gallery_index=bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", sorted(TIE_HEAVY))
def test_gallery_cuda_matches_cpu(name):
    Q, yq, G, yg = TIE_HEAVY[name](2)
    cpu = retrieval_metrics(Q, yq, gallery=G, gallery_labels=yg)
    assert retrieval_metrics(Q, yq, gallery=G, gallery_labels=yg, device="cuda") == cpu


def test_bad_gallery_input():
    Q, yq, G, yg = binary(0)
    with pytest.raises(ValueError, match="gallery_labels is required"):
        recall_at_k(Q, yq, gallery=G)
    with pytest.raises(ValueError, match="columns"):
        recall_at_k(Q, yq, gallery=G[:, :3], gallery_labels=yg)
    with pytest.raises(ValueError, match=r"gallery_labels must have shape \[260\]"):
        recall_at_k(Q, yq, gallery=G, gallery_labels=yg[:5])
    with pytest.raises(ValueError, match="no query has a same-label gallery item"):
        map_at_r(Q, yq + 1000, gallery=G, gallery_labels=yg)
    with pytest.raises(ValueError, match="NaN"):
        G2 = G.copy()
        G2[3, 1] = np.nan
        map_at_r(Q, yq, gallery=G2, gallery_labels=yg)


# --------------------------------------------------------------------------------------------
# against pytorch-metric-learning, tie-free data



def test_gallery_equals_pml_on_tie_free_data():
    pytest.importorskip("faiss")
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    rng = np.random.default_rng(7)
    for nq, ng, d, c in ((300, 500, 24, 40), (200, 900, 8, 15)):
        centers = rng.standard_normal((c + 5, d))
        yq, yg = rng.integers(0, c + 5, nq), rng.integers(0, c, ng)  # labels >= c: no gallery item
        Q = centers[yq] + 1.5 * rng.standard_normal((nq, d))
        G = centers[yg] + 1.5 * rng.standard_normal((ng, d))
        Q = (Q / np.linalg.norm(Q, axis=1, keepdims=True)).astype(np.float32)
        G = (G / np.linalg.norm(G, axis=1, keepdims=True)).astype(np.float32)
        # tie-free where PML looks (its k = the largest gallery class): drop queries whose top
        # k + 1 similarities come within 1e-5 of each other, so float32 k-NN orders as float64
        k = int(np.bincount(yg).max())
        top = -np.sort(-(Q.astype(np.float64) @ G.T.astype(np.float64)), axis=1)[:, : k + 1]
        keep = (-np.diff(top, axis=1)).min(axis=1) > 1e-5
        assert keep.mean() > 0.5
        Q, yq = Q[keep], yq[keep]
        calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"),
                                  k="max_bin_count", device=torch.device("cpu"))
        pml = calc.get_accuracy(torch.from_numpy(Q), torch.from_numpy(yq), torch.from_numpy(G),
                                torch.from_numpy(yg), ref_includes_query=False)
        ours = retrieval_metrics(Q, yq, (1,), gallery=G, gallery_labels=yg, block_size=64)
        assert ours["n_excluded_queries"] == int((yq >= c).sum()) > 0
        assert ours["recall@1"] == pytest.approx(pml["precision_at_1"], abs=1e-12)
        assert ours["map@r"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-12)


# --------------------------------------------------------------------------------------------
# no gallery: unchanged


def _golden_data():
    rng = np.random.default_rng(2026)
    Xb = rng.integers(0, 2, (300, 5)).astype(np.float32)
    yb = rng.integers(0, 25, 300)
    Xf = rng.standard_normal((2500, 24)).astype(np.float32)
    Xf[rng.random(2500) < 0.05] = 0
    Xf[rng.integers(0, 2500, 200)] = Xf[rng.integers(0, 2500, 200)]
    yf = rng.integers(0, 300, 2500)
    return Xb, yb, Xf, yf


# retrieval_metrics before the gallery change (commit 655f336), as float.hex: bit for bit
GOLDEN = (
    {"recall@1": "0x1.a3d70a3d70a3dp-1", "recall@2": "0x1.a3d70a3d70a3dp-1", "recall@4": "0x1.a3d70a3d70a3dp-1",
     "recall@8": "0x1.ac5f92c5f92c6p-1", "recall@16": "0x1.b69d0369d036ap-1", "recall@32": "0x1.d555555555555p-1",
     "map@r": "0x1.7326f27346c79p-7"},
    {"recall@1": "0x1.8c7e28240b780p-5", "recall@2": "0x1.9ce075f6fd220p-5", "recall@4": "0x1.d14e3bcd35a86p-5",
     "recall@8": "0x1.38ef34d6a161ep-4", "recall@16": "0x1.a1cac083126e9p-4", "recall@32": "0x1.2fec56d5cfaadp-3",
     "map@r": "0x1.fc29d4ebede2dp-11"},
)


def test_no_gallery_results_unchanged():
    Xb, yb, Xf, yf = _golden_data()
    for (X, y, bs), want in zip(((Xb, yb, 37), (Xf, yf, None)), GOLDEN):
        got = retrieval_metrics(X, y, block_size=bs)
        assert {k: v.hex() for k, v in got.items()} == want


# --------------------------------------------------------------------------------------------
# the cell record


def test_metrics_record_roles_and_ks():
    from cfga.outputs.cells import metrics_record

    rng = np.random.default_rng(4)
    X = rng.integers(0, 2, (160, 6)).astype(np.float32)
    y = rng.integers(0, 20, 160)
    kw = dict(dataset="d", model="m", feature="cfga_plus")
    plain = metrics_record(X, y, **kw)
    both = metrics_record(X, y, **kw, is_query=np.ones(160, bool), is_gallery=np.ones(160, bool))
    assert plain == both and plain["n_excluded_queries"] == 0 and plain["ks"] == list(KS)
    assert plain["recall@1"] == recall_at_k(X, y, (1,))[1]

    is_q = np.arange(160) < 70  # In-Shop-like: separate query and gallery rows
    rec = metrics_record(X, y, **kw, ks=(1, 10, 20), is_query=is_q, is_gallery=~is_q)
    want, mapr, n_ex = reference(X[is_q], y[is_q], X[~is_q], y[~is_q], ks=(1, 10, 20))
    assert rec["ks"] == [1, 10, 20] and "recall@2" not in rec
    assert {k: rec[f"recall@{k}"] for k in (1, 10, 20)} == want and rec["map@r"] == mapr
    assert (rec["n_queries"], rec["n_gallery"], rec["n_excluded_queries"]) == (70, 90, n_ex)

    is_g = np.arange(160) >= 40  # rows 40..69 are both: left out of their own ranking
    rec = metrics_record(X, y, **kw, is_query=is_q, is_gallery=is_g)
    own = np.where(np.arange(70) >= 40, np.arange(70) - 40, -1)
    want, mapr, n_ex = reference(X[is_q], y[is_q], X[is_g], y[is_g], self_index=own)
    assert {k: rec[f"recall@{k}"] for k in KS} == want and rec["map@r"] == mapr
    assert rec["n_excluded_queries"] == n_ex

    with pytest.raises(ValueError, match="is_gallery must be a boolean array"):
        metrics_record(X, y, **kw, is_gallery=np.ones(5, bool))
    with pytest.raises(ValueError, match="gallery rows"):
        metrics_record(X, y, **kw, is_query=is_q, is_gallery=np.zeros(160, bool))
