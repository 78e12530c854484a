"""Which neighbours come back: deterministic query choice and exact top-k by the raw dot product.

Similarity is the dot product of the stored float32 rows, accumulated in float64 (so a
brute-force check in float64 gets the very same numbers and order). Neighbours are sorted by
similarity, highest first; equal similarities keep manifest order (a stable sort). A gallery
query is excluded from its own list, as Recall@K excludes it (method.md §8.1). Torch-free.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

RETRIEVAL_COLUMNS = ("query", "rank", "neighbour", "similarity", "same_class")
QUERY_COLUMNS = ("query", "rank", "path", "class", "similarity")


def choose_queries(labels: Sequence[int], n: int) -> list[int]:
    """``n`` row indices spread over the classes, deterministically.

    Round robin over the classes in ascending label order: the first image (manifest order) of
    each class, then the second of each, ...; so ``n`` ≤ number of classes gives one query per
    class, the first ``n`` classes. Fewer rows than ``n`` → every row.
    """
    labels = np.asarray(labels)
    by_class = [np.flatnonzero(labels == c).tolist() for c in np.unique(labels)]
    out: list[int] = []
    depth = 0
    while len(out) < min(n, len(labels)):
        for rows in by_class:
            if depth < len(rows) and len(out) < n:
                out.append(rows[depth])
        depth += 1
    return out


def similarities(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Raw dot products, float64: queries [Q, D], gallery [N, D] → [Q, N]."""
    return np.asarray(queries, dtype=np.float64) @ np.asarray(gallery, dtype=np.float64).T


def top_k(sims: np.ndarray, k: int, exclude: Sequence[int] | None = None) -> np.ndarray:
    """Indices [Q, k] of the k highest similarities per row, ties in gallery (manifest) order.

    ``exclude[q]`` (optional) is a gallery index removed from row q's candidates (the query itself).
    """
    sims = np.array(sims, dtype=np.float64, copy=True)
    n = sims.shape[1] - (0 if exclude is None else 1)
    if k > n:
        raise ValueError(f"k={k} is larger than the gallery ({n} candidates per query)")
    if exclude is not None:
        sims[np.arange(len(sims)), np.asarray(exclude)] = -np.inf
    # Stable sort of the negated values: equal similarities keep ascending index order.
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


@dataclass(frozen=True)
class Neighbour:
    rank: int
    index: int
    similarity: float
    same_class: bool | None


def gallery_k(k: int, n_rows: int) -> int:
    """The k a workflow gallery shows: the config's ``retrieval.k``, or every other row of a
    feature file that has fewer (a tiny dataset must not fail the run; ``cfga retrieve`` refuses
    a k larger than the gallery instead)."""
    return max(0, min(k, n_rows - 1))


def gallery_neighbours(feats: np.ndarray, labels: Sequence[int], queries: Sequence[int], k: int
                       ) -> list[list[Neighbour]]:
    """Top-k neighbours of each gallery row in ``queries`` among the other rows of ``feats``."""
    labels = np.asarray(labels)
    q = np.asarray(queries, dtype=np.int64)
    sims = similarities(feats[q], feats)
    idx = top_k(sims, k, exclude=q)
    return [
        [Neighbour(r + 1, int(j), float(sims[i, j]), bool(labels[j] == labels[qi])) for r, j in enumerate(row)]
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
