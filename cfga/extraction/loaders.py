"""Image loaders for extraction: exact-size buckets, in-process decoding on the CPU, a DataLoader elsewhere.

Images of the ``scda`` protocol keep their own sizes, so they are bucketed by exact network input
size; each batch holds images of one size (method.md S13).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch

from cfga.extraction.preprocess import (
    ImageLike,
    load_rgb,
    preprocess,
    resize_image,
    to_normalized_tensor,
)
from cfga.registry.protocols import Protocol
from cfga.runtime import usable_cores


class _ImageSet(torch.utils.data.Dataset):
    def __init__(self, images: Sequence[ImageLike], protocol: Protocol):
        self.images = images
        self.resize = protocol.resize

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return i, preprocess(self.images[i], self.resize)


def _collate(items):
    idx, xs = zip(*items)
    return torch.tensor(idx), torch.stack(xs)


# In-process loading (CPU, num_workers=0). PIL's decode and resize release the GIL, so JPEGs are
# decoded in threads, in one of two ways:
# * ahead: one background thread decodes batch k+1 while the model runs on batch k. That hides
#   the JPEG cost, but only where a core is idle: with torch's threads on every core the decode
#   thread preempts one of them and every parallel region waits for it, which slows the
#   convolutions by more than the decoding it hides (BENCHMARKS.md);
# * in parallel: each batch's images are decoded side by side on every usable core, between two
#   model steps (nothing to preempt; cheaper than decoding one by one, BENCHMARKS.md).
# "auto" decodes ahead only when torch leaves a core free; True/False force ahead / in parallel.
# The torch half of the preprocessing (ToTensor + Normalize) stays on the calling thread, so no
# second intra-op pool is started.
DECODE_AHEAD: bool | str = "auto"


def decode_ahead_wanted(mode: bool | str | None = None) -> bool:
    """Whether in-process CPU loading should decode ahead (``DECODE_AHEAD`` when mode is None)."""
    mode = DECODE_AHEAD if mode is None else mode
    if mode == "auto":
        return torch.get_num_threads() < usable_cores()
    if isinstance(mode, bool):
        return mode
    raise ValueError(f"DECODE_AHEAD must be True, False or 'auto', got {mode!r}")


def _decode_one(images: Sequence[ImageLike], i: int, resize):
    return resize_image(load_rgb(images[i]), resize)


def _decode_pil(images: Sequence[ImageLike], idx: list[int], resize) -> list:
    return [_decode_one(images, i, resize) for i in idx]


def _decode_ahead(images: Sequence[ImageLike], batches: list[list[int]], resize):
    """Yield (indices, x [B, 3, H, W]) like the in-process DataLoader, with the PIL decoding of
    batch k+1 running while the caller works on batch k. Same pixels (``preprocess``'s own steps),
    same order; an unreadable image raises its ImageError when its batch is reached."""
    if not batches:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cfga-decode") as pool:
        pending = pool.submit(_decode_pil, images, batches[0], resize)
        for k, idx in enumerate(batches):
            pils = pending.result()
            if k + 1 < len(batches):
                pending = pool.submit(_decode_pil, images, batches[k + 1], resize)
            yield torch.tensor(idx), torch.stack([to_normalized_tensor(im) for im in pils])


def _decode_parallel(images: Sequence[ImageLike], batches: list[list[int]], resize, workers: int | None = None):
    """Yield (indices, x [B, 3, H, W]) like ``_decode_ahead``, each batch decoded on ``workers``
    threads (default: every usable core) before it is yielded. Same pixels, same order; the first
    unreadable image of a batch raises its ImageError."""
    if not batches:
        return
    with ThreadPoolExecutor(max_workers=workers or usable_cores(), thread_name_prefix="cfga-decode") as pool:
        for idx in batches:
            pils = list(pool.map(lambda i: _decode_one(images, i, resize), idx))
            yield torch.tensor(idx), torch.stack([to_normalized_tensor(im) for im in pils])


def in_process_batches(images: Sequence[ImageLike], batches: list[list[int]], resize):
    """The CPU's in-process loader: decode ahead or in parallel (see ``DECODE_AHEAD``)."""
    if decode_ahead_wanted():
        return _decode_ahead(images, batches, resize)
    return _decode_parallel(images, batches, resize)


