"""Galleries' neighbours: exact top-k by the raw dot product, ties in manifest order, query excluded;
deterministic query choice; the CSV and the PNG grid."""
import csv

import numpy as np
import pytest
from PIL import Image

from cfga.outputs.gallery import OTHER, QUERY, SAME, gallery_figure
from cfga.outputs.retrieval import (RETRIEVAL_COLUMNS, choose_queries, external_neighbours, gallery_neighbours,
                                    top_k, write_retrieval_csv)


def brute_force(feats, q, k, exclude=True):
    """Reference: every candidate scored in float64, sorted by (−similarity, index)."""
    f = feats.astype(np.float64)
    cand = [(-float(f[q] @ f[j]), j) for j in range(len(f)) if not (exclude and j == q)]
    return [j for _, j in sorted(cand)[:k]]


def test_top_k_equals_brute_force():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((40, 16)).astype(np.float32)
    labels = rng.integers(0, 5, 40)
    queries = choose_queries(labels, 8)
    ns = gallery_neighbours(feats, labels, queries, 7)
    for q, row in zip(queries, ns):
        assert [n.index for n in row] == brute_force(feats, q, 7)
        assert [n.rank for n in row] == list(range(1, 8))
        assert all(n.same_class == (labels[n.index] == labels[q]) for n in row)
        # float64 sums of exact float32 products: equal up to summation order
        assert np.allclose([n.similarity for n in row],
                           [float(feats[q].astype(np.float64) @ feats[n.index].astype(np.float64)) for n in row],
                           rtol=1e-12, atol=0)


def test_ties_keep_manifest_order_and_query_is_excluded():
    # rows 1, 2, 4 equal: same similarity to row 0; row 3 is the best match, row 0 is the query itself
    feats = np.array([[1, 0], [0.5, 0], [0.5, 0], [2, 0], [0.5, 0], [-1, 0]], dtype=np.float32)
    labels = [0, 0, 1, 1, 0, 1]
    (row,) = gallery_neighbours(feats, labels, [0], 5)
    assert [n.index for n in row] == [3, 1, 2, 4, 5]
    assert 0 not in [n.index for n in row]
    assert [n.same_class for n in row] == [False, True, False, True, False]
    # a query identical to another row: that row is its first neighbour, itself never
    (row,) = gallery_neighbours(feats, labels, [1], 2)
    assert [n.index for n in row] == [3, 0]


def test_k_larger_than_gallery_is_refused():
    feats = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match="k=4 is larger than the gallery"):
        gallery_neighbours(feats, [0, 0, 1, 1], [0], 4)
    assert len(gallery_neighbours(feats, [0, 0, 1, 1], [0], 3)[0]) == 3
    with pytest.raises(ValueError, match="larger than the gallery"):
        top_k(np.zeros((1, 4)), 5)


def test_external_queries_exclude_nothing():
    rng = np.random.default_rng(1)
    gallery = rng.standard_normal((20, 8)).astype(np.float32)
    q = gallery[[3]].copy()
    (row,) = external_neighbours(q, gallery, 3)
    assert row[0].index == 3 and row[0].same_class is None
    ref = np.argsort(-(q.astype(np.float64) @ gallery.astype(np.float64).T)[0], kind="stable")[:3]
    assert [n.index for n in row] == ref.tolist()


def test_query_choice_is_deterministic_and_spread_over_classes():
    labels = [2, 2, 0, 1, 0, 2, 1, 1, 0]
    assert choose_queries(labels, 3) == [2, 3, 0]  # first image of classes 0, 1, 2
    assert choose_queries(labels, 5) == [2, 3, 0, 4, 6]  # then the second of 0 and 1
    assert choose_queries(labels, 100) == sorted(choose_queries(labels, 100), key=[2, 3, 0, 4, 6, 1, 8, 7, 5].index)
    assert sorted(choose_queries(labels, 100)) == list(range(9))
    assert choose_queries(np.asarray(labels), 3) == choose_queries(list(labels), 3)


def _make_images(root, n):
    paths = []
    for i in range(n):
        p = f"img/{i}.png"
        (root / "img").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40 + i, 30), (20 * i % 255, 100, 150)).save(root / p)
        paths.append(p)
    return paths


def test_csv_and_png_say_the_same(tmp_path):
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((12, 6)).astype(np.float32)
    labels = np.repeat([0, 1, 2], 4)
    paths = _make_images(tmp_path, 12)
    queries = choose_queries(labels, 3)
    ns = gallery_neighbours(feats, labels, queries, 4)
    write_retrieval_csv(tmp_path / "g.csv", paths, queries, ns)
    with open(tmp_path / "g.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == RETRIEVAL_COLUMNS and len(rows) == 12
    for r in rows:
        q, j = paths.index(r["query"]), paths.index(r["neighbour"])
        assert np.isclose(float(r["similarity"]), float(feats[q].astype(np.float64) @ feats[j].astype(np.float64)),
                          rtol=1e-12, atol=0)
        assert r["same_class"] == str(int(labels[q] == labels[j]))
    gallery_figure(tmp_path, paths, labels, {0: "a", 1: "b", 2: "c"}, queries, ns, tmp_path / "g.png", "t")
    im = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
    # each row: a blue-framed query, then frames green/red as the CSV's same_class says
    from cfga.outputs import gallery as g

    cell = g.THUMB + 2 * g.FRAME
    for i, q in enumerate(queries):
        y = 34 + i * (cell + g.CAPTION + g.GAP) + 1
        colours = [tuple(im[y, g.GAP + c * (cell + g.GAP) + cell // 2]) for c in range(5)]
        want = [QUERY] + [SAME if n.same_class else OTHER for n in ns[i]]
        assert colours == want
