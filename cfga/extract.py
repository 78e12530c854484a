"""Batched, exact feature extraction: images → {feature name: float32 [N, D]}.

Images of the ``scda`` protocol keep their own sizes, so they are bucketed by exact network input
size; each batch holds images of one size, which keeps every conv, pool, mask and gradient
identical to a batch-size-1 run up to float summation order (SPEC S13). On CPU a row is in fact
bit-identical whatever else shares its batch (tests/test_extract.py checks it): the trunk's
kernels treat images independently and the CFGA step works image by image
(``cfga.gradients.kernel_responses``).
"""
from __future__ import annotations

import contextlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as Fn
from torch import nn
from tqdm.auto import tqdm

from ._malloc import keep_freed_memory
from .checkpoints import HEADS
from .checkpoints import head_embedding as dml_head
from .features import CFGA_LAYERS, cfga_name, feature_dim
from .gradients import Layer4Tail, cfga_scalar, trunk_to_layer4_0
from .preprocess import (ImageLike, cap_700, load_rgb, output_size, peek_size, preprocess, resize_image,
                         to_normalized_tensor)
from .protocols import Protocol, get_protocol
from .scda import l2_normalize, pooling_feature, scda_features, scda_mask


log = logging.getLogger(__name__)


class FeatureError(RuntimeError):
    """A feature came out non-finite; the message names the image."""


@contextlib.contextmanager
def exact_float32():
    """TF32 off for the CFGA path: the strict selections flip on TF32-sized errors."""
    prev = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


def image_level_features(F: torch.Tensor, protocol: Protocol) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Mask and mask-free features of maps F [..., C, h, w] (one image or a batch) →
    ({name: [..., D]}, masks bool [..., h, w]). Each map is treated on its own.

    Without LCC an empty mask (constant map, e.g. a 1×1 map from an input ≤ 32 px) would divide
    by zero in the authors' code (SPEC S6); here it falls back to the whole map, with a warning.
    """
    mask = scda_mask(F, protocol.lcc)
    empty = ~mask.flatten(-2).any(dim=-1)
    if bool(empty.any()):
        log.warning("empty SCDA mask (constant layer4 map of size %s) in %d image(s): using the whole map",
                    tuple(F.shape[-2:]), int(empty.sum()))
        mask = mask | empty[..., None, None]
    feats = {}
    if "scda" in protocol.features:
        scda, original = scda_features(F, mask, float64=protocol.lcc)
        feats.update(scda=scda.float(), scda_original=original.float())
    if "pooling" in protocol.features or protocol.embedding == "pooling":
        pooled = pooling_feature(F)
        if "pooling" in protocol.features:
            feats["pooling"] = pooled
        if protocol.embedding == "pooling":
            feats["embedding"] = pooled
    return feats, mask


def head_embedding(net: nn.Module, F: torch.Tensor, kind: str) -> torch.Tensor:
    """A DML net's embedding of maps F [B, C, h, w] → [B, 512], normalised again as the authors'
    numpy does (SPEC §4.4, S15); ``kind`` is a head of ``cfga.checkpoints.HEADS``."""
    return l2_normalize(dml_head(net.fc, F, kind))


def batch_features(net: nn.Module, x: torch.Tensor, protocol: Protocol) -> dict[str, torch.Tensor]:
    """All features of one same-size batch x [B, 3, H, W] → {name: float32 [B, D]} on x's device."""
    with torch.no_grad():
        h = trunk_to_layer4_0(net, cap_700(x))
    tail = Layer4Tail(net)
    F = tail.forward(h)
    Fd = F.detach()
    fh, fw = F.shape[2:]

    out, masks = image_level_features(Fd, protocol)
    mask_t = masks.to(torch.float32).unsqueeze(1)
    a = mask_t.flatten(1).sum(dim=1).double()
    coef = ((fh * fw) / a).float()  # (h·w)/a as a Python-float-like double, then float32 as torch does

    L = cfga_scalar(F, mask_t, coef)
    if protocol.embedding in HEADS:
        with torch.no_grad():
            out["embedding"] = head_embedding(net, Fd, protocol.embedding)
    for i, v in tail.vectors(L):
        b, c = CFGA_LAYERS[i]
        out[cfga_name(b, c)] = v
    out["cfga_plus"] = torch.cat([out[cfga_name(1, 2)], out[cfga_name(2, 2)]], dim=1)
    return {k: out[k] for k in protocol.features}


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
#   thread preempts one of them and every parallel region waits for it (measured on 2 cores with
#   2 threads: the convolutions ~10 % slower, more than the decoding it hides);
# * in parallel: each batch's images are decoded side by side on every usable core, between two
#   model steps (nothing to preempt; on 2 cores ~1.5 ms/image less than decoding one by one).
# "auto" decodes ahead only when torch leaves a core free; True/False force ahead / in parallel.
# The torch half of the preprocessing (ToTensor + Normalize) stays on the calling thread, so no
# second intra-op pool is started.
DECODE_AHEAD: bool | str = "auto"


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a SLURM or cgroup allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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


def size_buckets(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices grouped by equal size, chunked to ``batch_size``; buckets in order of first use."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(sizes):
        groups.setdefault(s, []).append(i)
    return [g[j : j + batch_size] for g in groups.values() for j in range(0, len(g), batch_size)]


def default_batch_size(device: torch.device) -> int:
    """Images per batch when the caller gives none: 32 on CUDA, 8 on CPU (measured on the 2-core
    CPU: ~10 % faster per image than 4, no gain beyond 8)."""
    return 32 if device.type == "cuda" else 8


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None → CUDA when present, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def extract_features(
    model: nn.Module,
    images: Sequence[ImageLike],
    protocol: str | Protocol,
    *,
    batch_size: int | None = None,
    num_workers: int | None = None,
    progress: bool = False,
    desc: str = "extract",
) -> dict[str, np.ndarray]:
    """Every feature of ``protocol`` for ``images`` (paths or PIL images), in input order.

    model:  a torchvision-layout ResNet (``cfga.load_model``), eval mode, on its device.
    Returns {feature name: float32 [N, D]} with the names of ``cfga.features.features_for``.
    """
    proto = get_protocol(protocol)
    device = model_device(model)
    if model.training:
        raise ValueError("model must be in eval() mode (BN running statistics; SPEC §3)")
    if proto.embedding in HEADS and getattr(model.fc, "out_features", None) != 512:
        raise ValueError(f"protocol {proto.name} needs the 512-d embedding head as model.fc (load the "
                         "checkpoint with cfga.load_model)")
    if batch_size is None:
        batch_size = default_batch_size(device)
    if device.type == "cpu":
        keep_freed_memory()
    if num_workers is None:  # GPU: JPEG decoding (~4 ms/image/core) is what limits images/s
        num_workers = max(1, min(16, usable_cores() - 1)) if device.type == "cuda" else 0

    sizes = [output_size(*peek_size(im), proto.resize) for im in images]
    batches = size_buckets(sizes, batch_size)
    if num_workers == 0 and device.type == "cpu":
        loader = in_process_batches(images, batches, proto.resize)
    else:
        loader = torch.utils.data.DataLoader(
            _ImageSet(images, proto),
            batch_sampler=batches,
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=device.type == "cuda",
        )
    out: dict[str, np.ndarray] = {}
    with exact_float32(), tqdm(total=len(images), unit="img", desc=desc, disable=not progress) as bar, \
            contextlib.closing(iter(loader)) if isinstance(loader, Iterator) else contextlib.nullcontext():
        for idx, x in loader:
            feats = batch_features(model, x.to(device, non_blocking=True), proto)
            for name, v in feats.items():
                arr = v.cpu().numpy()
                if not np.isfinite(arr).all():
                    bad = images[int(idx[np.where(~np.isfinite(arr).all(axis=1))[0][0]])]
                    raise FeatureError(f"non-finite {name} feature for image {bad}")
                if name not in out:
                    out[name] = np.zeros((len(images), arr.shape[1]), dtype=np.float32)
                out[name][idx.numpy()] = arr
            bar.update(len(idx))
    if not images:
        out = {n: np.zeros((0, feature_dim(n, proto.name)), np.float32) for n in proto.features}
    return out
