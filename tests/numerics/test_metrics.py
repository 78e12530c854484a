"""Tests for cfga.numerics.metrics: the authors' Recall@K (method.md §8.1) and MAP@R (method.md §8.3).

Reference implementations below are deliberately literal per-query numpy loops.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cfga.numerics.metrics import DEFAULT_KS, map_at_r, recall_at_k, retrieval_metrics

KS = (1, 2, 4, 8, 16, 32)


# --------------------------------------------------------------------------------------------
# literal references


def literal_recall(X, y, ks=KS):
    """method.md §8.1 word for word: float64 Sim = X X^T; P includes the query itself;
    t = sorted(P)[-2]; n_i = #(different-label sims > t); hit@K iff n_i < K."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    S = X @ X.T
    hits = {k: 0 for k in ks}
    for i in range(len(y)):
        P = S[i][y == y[i]]
        t = sorted(P)[-2]
        n_i = int(np.sum(S[i][y != y[i]] > t))
        for k in ks:
            hits[k] += n_i < k
    return {k: hits[k] / len(y) for k in ks}


def literal_map_at_r(X, y):
    """MAP@R: R_i = #other items with the label; other items ranked by (-sim, index);
    AP = (1/R) sum_{k<=R} P@k rel_k; mean over queries with R_i >= 1."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    S = X @ X.T
    aps = []
    for i in range(len(y)):
        R = int(np.sum(y == y[i])) - 1
        if R == 0:
            continue
        others = np.array([j for j in range(len(y)) if j != i])
        ranked = others[np.lexsort((others, -S[i, others]))][:R]
        rel = (y[ranked] == y[i]).astype(np.float64)
        prec = np.cumsum(rel) / np.arange(1, R + 1)
        aps.append(float(np.sum(prec * rel) / R))
    return float(np.mean(aps))


# --------------------------------------------------------------------------------------------
# data sets


def _labels(rng, n, n_classes):
    """Labels with every class holding >= 2 items, shuffled."""
    y = np.concatenate([np.arange(n_classes), np.arange(n_classes), rng.integers(0, n_classes, n - 2 * n_classes)])
    return rng.permutation(y)


def binary_ties(seed=0, n=240, d=6, c=30):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2, (n, d)).astype(np.float32), _labels(rng, n, c)


def unit_floats(seed=1, n=240, d=16, c=30):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    return X / np.linalg.norm(X, axis=1, keepdims=True), _labels(rng, n, c)


def unnormalised_zeros_dups(seed=2, n=240, d=12, c=30):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)) * rng.choice([0.25, 1.0, 3.0, 7.5], size=(n, 1))
    X[rng.random(n) < 0.1] = 0.0  # zero rows
    src = rng.integers(0, n, n // 5)
    dst = rng.integers(0, n, n // 5)
    X[dst] = X[src]  # exact duplicates, labels unrelated
    return X, _labels(rng, n, c)


def cfga_plus_like(seed=3, n=240, d=16, c=30):
    """Two unit halves concatenated (norm sqrt 2); for some rows one half is all zero."""
    rng = np.random.default_rng(seed)
    h = d // 2
    a = rng.standard_normal((n, h)).astype(np.float32)
    b = np.abs(rng.standard_normal((n, h))).astype(np.float32)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    a[rng.random(n) < 0.15] = 0
    b[rng.random(n) < 0.15] = 0
    return np.concatenate([a, b], axis=1), _labels(rng, n, c)


DATASETS = {
    "binary_ties": binary_ties,
    "unit_floats": unit_floats,
    "unnormalised_zeros_dups": unnormalised_zeros_dups,
    "cfga_plus_like": cfga_plus_like,
}


# --------------------------------------------------------------------------------------------
# hand-checked inputs (expected numbers derived in the comments)


def test_tie_favours_query():
    # rows: a=(1,0) l0, b=(1,0) l0, c=(1,0) l1, d=(0,1) l1
    # a: P={1,1} -> t=1; negatives c=1 (not > 1), d=0 -> n=0: hit@1 (the tie favours the query)
    # b: same as a -> hit@1
    # c: P={c.c=1, c.d=0} -> t=0; negatives a=1>0, b=1>0 -> n=2: miss@1, miss@2, hit@4
    # d: P={1,0} -> t=0; negatives a=0, b=0 (not > 0) -> n=0: hit@1
    X = np.array([[1, 0], [1, 0], [1, 0], [0, 1]], dtype=np.float64)
    y = [0, 0, 1, 1]
    r = recall_at_k(X, y, ks=(1, 2, 4))
    assert r == {1: 0.75, 2: 0.75, 4: 1.0}
    # MAP@R (R=1 for all): a -> others b(1,#1), c(1,#2), d(0): index tie-break picks b: AP 1
    # b -> a (1,#0) first: AP 1; c -> a (1,#0) beats b (1,#1): label 0, AP 0; d -> all 0, a: AP 0
    assert map_at_r(X, y) == 0.5
    assert r == literal_recall(X, y, ks=(1, 2, 4))


def test_duplicates_across_labels():
    # q=(1,0) l0, p=(0,1) l0, n=(1,0) l1 (dup of q), m=(0,1) l1 (dup of p)
    # q: P={1,0} -> t=0; negatives n=1>0, m=0 -> n_q=1: miss@1, hit@2. Same for p, n, m by symmetry.
    X = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], dtype=np.float32)
    y = np.array([0, 0, 1, 1])
    assert recall_at_k(X, y, ks=(1, 2)) == {1: 0.0, 2: 1.0}
    # MAP@R: each query's top other item is its duplicate, which has the other label: all AP 0
    assert map_at_r(X, y) == 0.0


def test_zero_rows():
    # u=(1,0) l1, v=(0.5,0.5) l1, z1=0 l0, z2=0 l0
    # z1: P={0,0} -> t=0; negatives u.z1=0, v.z1=0 (not > 0) -> hit@1; same for z2
    # u: P={1, 0.5} -> t=0.5; negatives 0 -> hit; v: P={0.5, 0.5} -> t=0.5; negatives 0 -> hit
    X = np.array([[1, 0], [0.5, 0.5], [0, 0], [0, 0]])
    y = [1, 1, 0, 0]
    assert recall_at_k(X, y, ks=(1,)) == {1: 1.0}
    # MAP@R: u -> v (0.5) rel: 1; v -> u (0.5) rel: 1;
    # z1 -> all sims 0, lowest index u (#0), label 1: 0; z2 -> u again: 0.  MAP = 2/4
    assert map_at_r(X, y) == 0.5


def test_unnormalised_self_not_largest():
    # a=(1,0) l0, b=(3,0) l0, c=(2,0) l1, d=(0,1) l1
    # a: P={a.a=1, a.b=3} -> sorted [1,3], t=1 (the SELF value); negatives c=2>1, d=0 -> n=1
    # b: P={9,3} -> t=3; negatives c=6>3, d=0 -> n=1
    # c: P={4,0} -> t=0; negatives a=2, b=6 -> n=2
    # d: P={1,0} -> t=0; negatives a=0, b=0 -> n=0
    # R@1 = 1/4 (d); R@2 = 3/4 (a, b, d); R@4 = 1
    X = np.array([[1, 0], [3, 0], [2, 0], [0, 1]], dtype=np.float64)
    y = [0, 0, 1, 1]
    assert recall_at_k(X, y, ks=(1, 2, 4)) == {1: 0.25, 2: 0.75, 4: 1.0}
    # MAP@R: a -> b(3) rel: 1; b -> c(6): 0; c -> b(6): 0; d -> all 0, a first: 0.  MAP = 1/4
    assert map_at_r(X, y) == 0.25


def test_cfga_plus_like_hand():
    # halves of 2 dims: a=[1,0|1,0] l0 (norm sqrt2), b=[1,0|0,0] l0, c=[0,0|1,0] l1, d=[0,1|0,1] l1
    # sims: aa=2 ab=1 ac=1 ad=0 bb=1 bc=0 bd=0 cc=1 cd=0 dd=2
    # a: P={2,1} t=1; c=1 not > 1, d=0 -> hit@1     b: P={1,1} t=1; c=0, d=0 -> hit@1
    # c: P={1,0} t=0; a=1>0, b=0 -> n=1: miss@1, hit@2     d: P={2,0} t=0; a=0, b=0 -> hit@1
    X = np.array([[1, 0, 1, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 1]], dtype=np.float32)
    y = [5, 5, 9, 9]
    assert recall_at_k(X, y, ks=(1, 2)) == {1: 0.75, 2: 1.0}
    # MAP@R: a -> b (1, #1) before c (1, #2): 1; b -> a: 1; c -> a: 0; d -> a (all 0): 0 -> 0.5
    assert map_at_r(X, y) == 0.5


def test_single_item_label_raises_naming_it():
    X = np.eye(5)
    y = [3, 3, 42, 7, 7]
    with pytest.raises(ValueError, match="label 42 "):
        recall_at_k(X, y)
    with pytest.raises(ValueError, match="label 42 "):
        retrieval_metrics(X, y)
    # the authors' script itself: sorted(P)[-2] on a one-element list -> IndexError
    with pytest.raises(IndexError):
        literal_recall(X, y)
    # MAP@R skips such queries (as pytorch-metric-learning does) but keeps them in the gallery
    assert map_at_r(X, y) == pytest.approx(literal_map_at_r(X, y), abs=1e-15)


def test_map_undefined_raises():
    with pytest.raises(ValueError):
        map_at_r(np.eye(3), [0, 1, 2])


# --------------------------------------------------------------------------------------------
# against the literal loops, every block size


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_against_literal_loops(name):
    X, y = DATASETS[name]()
    ref_r = literal_recall(X, y)
    ref_m = literal_map_at_r(X, y)
    n = len(y)
    maps = []
    for bs in (1, 7, n, None):
        got = recall_at_k(X, y, block_size=bs)
        assert got == ref_r, (name, bs)
        m = map_at_r(X, y, block_size=bs)
        assert m == pytest.approx(ref_m, abs=1e-12), (name, bs)
        both = retrieval_metrics(X, y, block_size=bs)
        assert list(both) == [f"recall@{k}" for k in KS] + ["map@r"]
        assert [both[f"recall@{k}"] for k in KS] == [ref_r[k] for k in KS]
        assert both["map@r"] == m
        maps.append(m)
    assert len(set(maps)) == 1  # bit-identical across block sizes (correctly rounded sum)


def test_binary_ties_are_massive():
    # sanity of the data set: many negatives tie exactly with the threshold
    X, y = binary_ties()
    S = X.astype(np.float64) @ X.T.astype(np.float64)
    ties = 0
    for i in range(len(y)):
        t = sorted(S[i][y == y[i]])[-2]
        ties += int(np.sum(S[i][y != y[i]] == t))
    assert ties > 5 * len(y)


def test_input_types_and_dtypes():
    X, y = unnormalised_zeros_dups()
    X32 = X.astype(np.float32)
    ref = literal_recall(X32, y)
    for feats in (X32, torch.from_numpy(X32), torch.from_numpy(X32).double(), X32.astype(np.float64)):
        assert recall_at_k(feats, torch.as_tensor(y)) == ref
        assert map_at_r(feats, list(y)) == pytest.approx(literal_map_at_r(X32, y), abs=1e-12)
    Xb, yb = binary_ties()
    assert recall_at_k(Xb.astype(np.int64), yb, device="cpu") == literal_recall(Xb, yb)
    assert recall_at_k(Xb.astype(np.float16), yb) == literal_recall(Xb, yb)


def test_float64_screening_paths_agree(monkeypatch):
    X, y = unnormalised_zeros_dups()
    ref = retrieval_metrics(X, y, block_size=17)
    # reduced-precision float32 matmuls allowed -> the module must switch to float64 screening
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert retrieval_metrics(X, y, block_size=17) == ref
    finally:
        torch.set_float32_matmul_precision(old)
    # huge features (float32 screening would overflow): scaled by a power of two, all float64
    # products scale exactly, so every decision is unchanged
    Xb, yb = binary_ties()
    big = Xb.astype(np.float64) * 2.0**60
    assert retrieval_metrics(big, yb) == retrieval_metrics(Xb, yb)


def test_tiny_features_underflow_margin():
    # values ~1e-30: float32 products underflow; decisions must still be exact (scaled copy)
    Xb, yb = binary_ties()
    tiny = Xb.astype(np.float64) * 2.0**-100
    assert retrieval_metrics(tiny, yb) == retrieval_metrics(Xb, yb)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", sorted(DATASETS))
def test_cuda_matches_cpu(name):
    X, y = DATASETS[name]()
    cpu = retrieval_metrics(X, y)
    assert retrieval_metrics(X, y, device="cuda") == cpu
    assert retrieval_metrics(torch.from_numpy(np.asarray(X)).cuda(), torch.as_tensor(y).cuda()) == cpu


# --------------------------------------------------------------------------------------------
# pytorch-metric-learning


def _pml_map_at_r(X, y):
    from pytorch_metric_learning.distances import DotProductSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    # query = reference (reference=None -> ref_includes_query=True): PML retrieves k+1 neighbours
    # and drops the column holding the query's own index (or the last column if the query is not
    # among them), so every query is ranked against the N-1 OTHER items, as in map_at_r.
    # DotProductSimilarity must not normalise (raw dot product). PML computes in float32.
    calc = AccuracyCalculator(
        include=("mean_average_precision_at_r",),
        k="max_bin_count",
        knn_func=CustomKNN(DotProductSimilarity(normalize_embeddings=False)),
        device=torch.device("cpu"),
    )
    return calc.get_accuracy(np.asarray(X, np.float32), np.asarray(y))["mean_average_precision_at_r"]


def _tie_free(X, y, rel_gap=1e-4):
    """Tie-free where it matters: for every query, its R_i + 1 most similar other items have
    float64 similarities at least rel_gap * |x_i| * max|x| apart (far above float32 error), so the
    float32 ranking of PML and the float64 ranking agree on the top R_i set and order."""
    X = np.asarray(X, np.float64)
    y = np.asarray(y)
    S = X @ X.T
    norms = np.linalg.norm(X, axis=1)
    for i in range(len(y)):
        R = int(np.sum(y == y[i])) - 1
        s = np.sort(np.delete(S[i], i))[::-1][: R + 2]
        if len(s) > 1 and np.min(-np.diff(s)) < rel_gap * norms[i] * norms.max():
            return False
    return True


def _tie_free_data(scale):
    for seed in range(200):
        rng = np.random.default_rng(seed)
        n, d = 120, 24
        y = _labels(rng, n, 24)
        X = rng.standard_normal((24, d))[y] + 0.8 * rng.standard_normal((n, d))  # clustered
        if scale == "unit":
            X /= np.linalg.norm(X, axis=1, keepdims=True)
        else:
            X *= rng.uniform(0.2, 5.0, size=(n, 1))  # the query is then often not its own top match
        if scale == "with_singletons":
            y[:3] = [1000, 1001, 1002]  # single-item labels: skipped as queries by both
        X = X.astype(np.float32).astype(np.float64)  # PML works in float32: float32-exact data
        if _tie_free(X, y):
            return X, y
    raise AssertionError("no tie-free data set found")


@pytest.mark.parametrize("scale", ["unit", "unnormalised", "with_singletons"])
def test_map_at_r_matches_pml(scale):
    X, y = _tie_free_data(scale)
    if scale != "unit":  # the query is not always its own nearest item: PML's "drop the last
        S = X @ X.T      # column" branch is exercised too
        assert np.any(np.argmax(S, axis=1) != np.arange(len(y)))
    ours = map_at_r(X, y)
    assert ours == pytest.approx(_pml_map_at_r(X, y), abs=1e-9)
    assert ours == pytest.approx(literal_map_at_r(X, y), abs=1e-12)


# --------------------------------------------------------------------------------------------
# hypothesis fuzz: small integer features force ties, zero rows, duplicates


@st.composite
def tie_heavy(draw):
    n_classes = draw(st.integers(1, 6))
    sizes = draw(st.lists(st.integers(2, 6), min_size=n_classes, max_size=n_classes))
    y = np.repeat(np.arange(n_classes), sizes)
    n = len(y)
    d = draw(st.integers(1, 5))
    vals = draw(st.lists(st.integers(-2, 2), min_size=n * d, max_size=n * d))
    X = np.array(vals, dtype=np.float64).reshape(n, d)
    zero = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    X[np.array(zero)] = 0.0
    perm = np.array(draw(st.permutations(range(n))))
    bs = draw(st.one_of(st.none(), st.integers(1, n)))
    return X[perm], y[perm], bs


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tie_heavy())
def test_fuzz_against_literal(case):
    X, y, bs = case
    ks = (1, 2, 3, 4, 8)
    assert recall_at_k(X, y, ks=ks, block_size=bs) == literal_recall(X, y, ks=ks)
    assert map_at_r(X, y, block_size=bs) == pytest.approx(literal_map_at_r(X, y), abs=1e-12)


def test_default_ks():
    assert tuple(DEFAULT_KS) == KS
    X, y = unit_floats()
    assert list(recall_at_k(X, y)) == list(KS)
    assert math.isfinite(retrieval_metrics(X, y)["map@r"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d", [1, 5, 16, 100])
def test_canonical_dot_numpy_equals_torch(dtype, d):
    # The CPU (numpy) and device (torch) implementations run the same IEEE operation sequence,
    # so they must agree bit for bit; run the torch one on CPU here.
    from cfga.numerics import metrics as M

    rng = np.random.default_rng(d)
    x = torch.from_numpy((rng.standard_normal((50, d)) * rng.uniform(0.1, 9, (50, 1))).astype(dtype))
    ia = torch.from_numpy(rng.integers(0, 50, 300))
    ib = torch.from_numpy(rng.integers(0, 50, 300))
    dp = 1 if d <= 1 else 1 << (d - 1).bit_length()
    a = M._canonical_dot_numpy(x, ia, ib, dp, 7)
    b = M._canonical_dot_torch(x, ia, ib, dp, 64)
    assert torch.equal(a, b)
    ref = (x[ia].double() * x[ib].double()).sum(1)  # any float64 order: within a few ulps
    assert torch.allclose(a, ref, rtol=1e-12, atol=1e-12)


def test_small_path_equals_blockwise_path_and_skips_torch():
    """N <= SMALL_N on CPU uses numpy's float64 X·Xᵀ (the authors' RetMetric); it must agree with
    the blockwise path exactly, and must not need torch (one process per table cell)."""
    import subprocess
    import sys

    from cfga.numerics.metrics import SMALL_N

    rng = np.random.default_rng(5)
    for X in (rng.integers(0, 2, (300, 12)).astype(np.float32),  # massive ties
              rng.normal(size=(300, 32)).astype(np.float32)):
        y = rng.integers(0, 20, 300)
        assert len(X) <= SMALL_N
        small = retrieval_metrics(X, y)
        blockwise = retrieval_metrics(X, y, block_size=64)
        assert {k: v for k, v in small.items() if k != "map@r"} == {k: v for k, v in blockwise.items() if k != "map@r"}
        assert small["map@r"] == pytest.approx(blockwise["map@r"], abs=1e-12)
    code = ("import sys, numpy as np; from cfga.numerics.metrics import retrieval_metrics; "
            "retrieval_metrics(np.eye(4), [0, 0, 1, 1]); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
