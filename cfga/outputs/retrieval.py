"""Which neighbours come back: deterministic query choice and exact top-k by the raw dot product.

Similarity is the dot product of the stored float32 rows, accumulated in float64 (so a
brute-force check in float64 gets the very same numbers and order). Neighbours are sorted by
similarity, highest first; equal similarities keep manifest order (a stable sort). Queries are
chosen among the query rows of the feature file and ranked against its gallery rows (the
manifest's roles, ``cfga.data.manifest.feature_roles``; leave-one-out datasets: every row is
both). A query that is also a gallery row is excluded from its own list, as Recall@K excludes it
(method.md §8.1, §Q). Torch-free.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cfga.data.manifest import feature_roles, read_manifest
from cfga.extraction.store import load_features

RETRIEVAL_COLUMNS = ("query", "rank", "neighbour", "similarity", "same_class")
QUERY_COLUMNS = ("query", "rank", "path", "class", "similarity")


def _rows(flags, n: int) -> np.ndarray:
    """Indices of the True entries of a boolean ``[n]`` role (None: every row)."""
    return np.arange(n) if flags is None else np.flatnonzero(np.asarray(flags, dtype=bool))


def choose_queries(labels: Sequence[int], n: int, is_query: Sequence[bool] | None = None) -> list[int]:
    """``n`` row indices spread over the classes, deterministically.

    labels ``[N]``; ``is_query`` (optional boolean ``[N]``): only those rows may be chosen (the
    returned indices are still rows of ``labels``). Round robin over the classes of the query rows
    in ascending label order: the first query row (manifest order) of each class, then the second
    of each, ...; so ``n`` ≤ number of classes gives one query per class, the first ``n`` classes.
    Fewer query rows than ``n`` → every query row.
    """
    labels = np.asarray(labels)
    rows = _rows(is_query, len(labels))
    by_class = [rows[labels[rows] == c].tolist() for c in np.unique(labels[rows])]
    out: list[int] = []
    depth = 0
    while len(out) < min(n, len(rows)):
        for members in by_class:
            if depth < len(members) and len(out) < n:
                out.append(members[depth])
        depth += 1
    return out


def similarities(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Raw dot products, float64: queries [Q, D], gallery [N, D] → [Q, N]."""
    return np.asarray(queries, dtype=np.float64) @ np.asarray(gallery, dtype=np.float64).T


def top_k(sims: np.ndarray, k: int, exclude: Sequence[int] | None = None) -> np.ndarray:
    """Indices [Q, k] of the k highest similarities per row, ties in gallery (manifest) order.

    ``exclude[q]`` (optional) is a gallery index removed from row q's candidates (the query
    itself); -1: nothing removed from that row.
    """
    sims = np.array(sims, dtype=np.float64, copy=True)
    dropped = 0
    if exclude is not None:
        ex = np.asarray(exclude, dtype=np.int64).reshape(len(sims))
        own = np.flatnonzero(ex >= 0)
        sims[own, ex[own]] = -np.inf
        dropped = int(len(own) > 0)
    n = sims.shape[1] - dropped
    if k > n:
        raise ValueError(f"k={k} is larger than the gallery ({n} candidates per query)")
    # Stable sort of the negated values: equal similarities keep ascending index order.
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


@dataclass(frozen=True)
class Neighbour:
    rank: int
    index: int
    similarity: float
    same_class: bool | None


def gallery_k(k: int, queries: Sequence[int], is_gallery: Sequence[bool]) -> int:
    """The k a workflow gallery shows: the config's ``retrieval.k``, or every candidate when a
    query has fewer (a tiny dataset must not fail the run; ``cfga retrieve`` refuses a k larger
    than the gallery instead). ``is_gallery``: boolean ``[N]``; a query that is a gallery row is
    not its own candidate."""
    g = np.asarray(is_gallery, dtype=bool)
    own = bool(g[np.asarray(queries, dtype=np.int64)].any())
    return max(0, min(k, int(g.sum()) - own))


def gallery_neighbours(feats: np.ndarray, labels: Sequence[int], queries: Sequence[int], k: int,
                       is_gallery: Sequence[bool] | None = None) -> list[list[Neighbour]]:
    """Top-k neighbours of each row in ``queries`` among the gallery rows of ``feats``.

    feats ``[N, D]``, labels ``[N]``, queries: row indices; ``is_gallery`` (optional boolean
    ``[N]``, default every row): the rows ranked. A query that is a gallery row is left out of its
    own list. ``Neighbour.index`` is a row of ``feats``.
    """
    labels = np.asarray(labels)
    q = np.asarray(queries, dtype=np.int64)
    g = _rows(is_gallery, len(feats))
    pos = np.full(len(feats), -1, dtype=np.int64)  # row → its column among the gallery rows
    pos[g] = np.arange(len(g))
    sims = similarities(feats[q], feats if is_gallery is None else feats[g])
    idx = top_k(sims, k, exclude=pos[q])
    return [
        [Neighbour(r + 1, int(g[j]), float(sims[i, j]), bool(labels[g[j]] == labels[qi])) for r, j in enumerate(row)]
        for i, (qi, row) in enumerate(zip(q, idx))
    ]


def external_neighbours(qfeats: np.ndarray, feats: np.ndarray, k: int) -> list[list[Neighbour]]:
    """Top-k gallery rows for query rows that are not in the gallery (nothing excluded)."""
    sims = similarities(qfeats, feats)
    idx = top_k(sims, k)
    return [[Neighbour(r + 1, int(j), float(sims[i, j]), None) for r, j in enumerate(row)]
            for i, row in enumerate(idx)]


def retrieval_rows(paths: Sequence[str], queries: Sequence[int], neighbours: Sequence[Sequence[Neighbour]]
                   ) -> list[list]:
    """CSV rows (``RETRIEVAL_COLUMNS``): similarity as the shortest repr that round-trips the float64,
    same_class as 1/0."""
    return [
        [paths[q], n.rank, paths[n.index], repr(n.similarity), int(n.same_class)]
        for q, ns in zip(queries, neighbours) for n in ns
    ]


def write_retrieval_csv(path: str | os.PathLike, paths: Sequence[str], queries: Sequence[int],
                        neighbours: Sequence[Sequence[Neighbour]]) -> None:
    from cfga.files import write_csv

    write_csv(path, RETRIEVAL_COLUMNS, retrieval_rows(paths, queries, neighbours))


@dataclass
class GalleryInputs:
    """What a gallery figure reads from one features file and its manifest, and the queries shown."""

    feats: dict  # {feature: float32 [N, D]}
    labels: np.ndarray  # [N]
    paths: list  # [N], as in the manifest
    names: dict  # {label: class name}
    queries: list  # feature-file rows (choose_queries)
    k: int  # neighbours per query (gallery_k)
    is_gallery: np.ndarray  # bool [N]


def gallery_inputs(features: str | os.PathLike, manifest: str | os.PathLike, n_queries: int, k: int) -> GalleryInputs:
    """Load a features file and its manifest; pick ``n_queries`` queries among the query rows
    (``choose_queries``) and the ``k`` the gallery rows allow (``gallery_k``)."""
    feats, labels, paths, _meta = load_features(features)
    rows = read_manifest(manifest)
    is_query, is_gallery = feature_roles(manifest, paths, features, rows=rows)
    queries = choose_queries(labels, n_queries, is_query)
    return GalleryInputs(feats, labels, paths, {r.label: r.class_name for r in rows}, queries,
                         gallery_k(k, queries, is_gallery), is_gallery)
