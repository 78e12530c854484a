"""How images are grouped into batches: exact network input size first (pure Python, no torch,
so the feature store can plan shards without importing torch)."""
from __future__ import annotations

from typing import Sequence


def size_buckets(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices grouped by equal size, chunked to ``batch_size``; buckets in order of first use."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(sizes):
        groups.setdefault(s, []).append(i)
    return [g[j : j + batch_size] for g in groups.values() for j in range(0, len(g), batch_size)]
