"""Galleries' neighbours: exact top-k by the raw dot product, ties in manifest order, query excluded;
deterministic query choice; query rows against gallery rows (In-Shop); the CSV and the PNG grid."""
import csv

import numpy as np
import pytest
from PIL import Image

from cfga.data.inshop import parse_partition
from cfga.data.manifest import evaluation_roles, evaluation_rows, feature_roles, write_manifest
from cfga.outputs.gallery import OTHER, QUERY, SAME, gallery_figure
from cfga.outputs.retrieval import (RETRIEVAL_COLUMNS, choose_queries, external_neighbours, gallery_k,
                                    gallery_neighbours, top_k, write_retrieval_csv)
from tests.data.layouts import inshop_partition


def brute_force(feats, q, k, exclude=True, gallery=None):
    """Reference: every candidate (a gallery row, default every row) scored in float64, sorted by
    (−similarity, index)."""
    f = feats.astype(np.float64)
    rows = range(len(f)) if gallery is None else gallery
    cand = [(-float(f[q] @ f[j]), j) for j in rows if not (exclude and j == q)]
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


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_inshop_queries_rank_the_gallery_rows_only(tmp_path):
    # In-Shop's partition (tests/data/layouts): per test item (query, gallery) images; item 7 has a
    # query and no gallery image. The feature file's rows: the manifest's evaluated rows.
    text, _ = inshop_partition([2], [(2, 3), (1, 2), (3, 1), (2, 4), (1, 3), (1, 0)])
    manifest = parse_partition(text, "list_eval_partition.txt")
    rows = evaluation_rows(manifest)
    write_manifest(manifest, tmp_path / "m.csv")
    paths, labels = [r.path for r in rows], np.array([r.label for r in rows])
    is_query, is_gallery = feature_roles(tmp_path / "m.csv", paths, "f.npz")
    assert [a.tolist() for a in evaluation_roles(manifest)] == [is_query.tolist(), is_gallery.tolist()]
    assert is_query.tolist() == [r.is_query for r in rows] and not (is_query & is_gallery).any()
    gallery = np.flatnonzero(is_gallery).tolist()
    rng = np.random.default_rng(3)
    feats = rng.standard_normal((len(rows), 8)).astype(np.float32)
    feats[gallery[4]] = feats[gallery[1]]  # a tie between two gallery rows: manifest order
    queries = choose_queries(labels, 5, is_query)
    assert all(is_query[queries]) and len(queries) == 5
    assert queries == [int(np.flatnonzero(is_query & (labels == c))[0]) for c in sorted(set(labels[is_query]))[:5]]
    k = gallery_k(8, queries, is_gallery)
    assert k == 8 and gallery_k(100, queries, is_gallery) == len(gallery) == 13
    ns = gallery_neighbours(feats, labels, queries, k, is_gallery)
    write_retrieval_csv(tmp_path / "g.csv", paths, queries, ns)
    got = _read_csv(tmp_path / "g.csv")
    assert tuple(got[0]) == RETRIEVAL_COLUMNS and len(got) == 5 * k
    f = feats.astype(np.float64)
    want = [[paths[q], str(r + 1), paths[j], repr(float(f[q] @ f[j])), str(int(labels[j] == labels[q]))]
            for q in queries for r, j in enumerate(brute_force(feats, q, k, exclude=False, gallery=gallery))]
    assert [r["query"] for r in got] == [w[0] for w in want]
    assert [[r[c] for c in ("rank", "neighbour", "same_class")] for r in got] == [[w[1], w[2], w[4]] for w in want]
    assert np.allclose([float(r["similarity"]) for r in got], [float(w[3]) for w in want], rtol=1e-12, atol=0)
    assert all(is_gallery[paths.index(r["neighbour"])] for r in got)


def test_a_query_that_is_a_gallery_row_is_not_its_own_neighbour():
    # a CSV table's roles: row 0 both, rows 1-2 gallery only, row 3 query only, row 4 neither
    feats = np.array([[1, 0], [0.5, 0], [2, 0], [1, 0], [9, 0]], dtype=np.float32)
    labels = [0, 0, 1, 0, 1]
    is_query, is_gallery = [True, False, False, True, False], [True, True, True, False, False]
    assert choose_queries(labels, 5, is_query) == [0, 3]
    assert gallery_k(8, [0, 3], is_gallery) == 2  # row 0 is not its own candidate
    assert gallery_k(8, [3], is_gallery) == 3
    a, b = gallery_neighbours(feats, labels, [0, 3], 2, is_gallery)
    assert [n.index for n in a] == [2, 1] and [n.index for n in b] == [2, 0]
    with pytest.raises(ValueError, match="larger than the gallery"):
        gallery_neighbours(feats, labels, [0, 3], 3, is_gallery)


def test_feature_roles_refuse_a_feature_file_of_other_rows(tmp_path):
    text, _ = inshop_partition([1], [(1, 2)])
    manifest = parse_partition(text, "p.txt")
    write_manifest(manifest, tmp_path / "m.csv")
    paths = [r.path for r in evaluation_rows(manifest)]
    with pytest.raises(ValueError, match="f.npz does not hold the images of .*m.csv in its order"):
        feature_roles(tmp_path / "m.csv", paths[::-1], "f.npz")


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
