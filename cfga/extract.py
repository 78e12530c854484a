"""Batched, exact feature extraction: images → {feature name: float32 [N, D]}.

Images of the ``scda`` protocol keep their own sizes, so they are bucketed by exact network input
size; each batch holds images of one size, which keeps every conv, pool, mask and gradient
identical to a batch-size-1 run up to float summation order (SPEC S13).
"""
from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as Fn
from torch import nn
from tqdm.auto import tqdm

from .aggregation import grad_to_vector
from .features import CFGA_LAYERS, cfga_name
from .gradients import Layer4Tail, cfga_scalar, trunk_to_layer4_0
from .preprocess import ImageLike, cap_700, output_size, peek_size, preprocess
from .protocols import Protocol, get_protocol
from .scda import pooling_feature, scda_features, scda_mask


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
    """Mask and mask-free features of ONE map F [C, h, w] → ({name: [D]}, mask bool [h, w])."""
    mask = scda_mask(F, protocol.lcc)
    scda, original = scda_features(F, mask, float64=protocol.lcc)
    feats = {"scda": scda.float(), "scda_original": original.float()}
    if "pooling" in protocol.features:
        feats["pooling"] = pooling_feature(F)
    return feats, mask


def batch_features(net: nn.Module, x: torch.Tensor, protocol: Protocol) -> dict[str, torch.Tensor]:
    """All features of one same-size batch x [B, 3, H, W] → {name: float32 [B, D]} on x's device."""
    with torch.no_grad():
        h = trunk_to_layer4_0(net, cap_700(x))
    tail = Layer4Tail(net)
    F = tail.forward(h)
    Fd = F.detach()
    B, _, fh, fw = F.shape

    per_image: dict[str, list[torch.Tensor]] = defaultdict(list)
    masks = []
    for b in range(B):
        feats, mask = image_level_features(Fd[b], protocol)
        for k, v in feats.items():
            per_image[k].append(v)
        masks.append(mask)
    mask_t = torch.stack(masks).to(torch.float32).unsqueeze(1)
    a = mask_t.flatten(1).sum(dim=1).double()
    coef = ((fh * fw) / a).float()  # (h·w)/a as a Python-float-like double, then float32 as torch does

    L = cfga_scalar(F, mask_t, coef)
    out = {k: torch.stack(v) for k, v in per_image.items()}
    for i, G in tail.weight_grads(L):
        b, c = CFGA_LAYERS[i]
        out[cfga_name(b, c)] = grad_to_vector(G)
        del G
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


def size_buckets(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices grouped by equal size, chunked to ``batch_size``; buckets in order of first use."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(sizes):
        groups.setdefault(s, []).append(i)
    return [g[j : j + batch_size] for g in groups.values() for j in range(0, len(g), batch_size)]


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
    if batch_size is None:
        batch_size = 32 if device.type == "cuda" else 8
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0

    sizes = [output_size(*peek_size(im), proto.resize) for im in images]
    batches = size_buckets(sizes, batch_size)
    loader = torch.utils.data.DataLoader(
        _ImageSet(images, proto),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    out: dict[str, np.ndarray] = {}
    with exact_float32(), tqdm(total=len(images), unit="img", desc=desc, disable=not progress) as bar:
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
        from .features import FEATURES
        out = {n: np.zeros((0, FEATURES[n].dim), np.float32) for n in proto.features}
    return out
