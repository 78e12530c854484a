"""Batched, exact feature extraction: images → {feature name: float32 [N, D]}.

Images of the ``scda`` protocol keep their own sizes, so they are bucketed by exact network input
size; each batch holds images of one size, which keeps every conv, pool, mask and gradient
identical to a batch-size-1 run up to float summation order (method.md S13). On CPU a row is in fact
bit-identical whatever else shares its batch (tests/test_extract.py checks it): the trunk's
kernels treat images independently and the CFGA step works image by image
(``cfga.gradients.kernel_responses``)."""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cfga.backbones import embedding_fc, family_of
from cfga.backbones.heads import head_embedding
from cfga.backbones.resnet import Layer4Tail, trunk_to_layer4_0
from cfga.extraction.batching import size_buckets
from cfga.extraction.loaders import _collate, _ImageSet, in_process_batches
from cfga.extraction.preprocess import ImageLike, cap_700, output_size, peek_size
from cfga.extraction.transformer import check_transformer, empty_features, transformer_batch_features
from cfga.numerics.mask import scda_mask
from cfga.numerics.pooling import l2_normalize, pooling_feature, scda_features
from cfga.numerics.scalar import cfga_scalar
from cfga.registry.features import CFGA_LAYERS, CFGA_PLUS_LAYERS, cfga_name, feature_dim
from cfga.registry.protocols import HEADS, Protocol, get_protocol
from cfga.runtime import keep_freed_memory, model_device, usable_cores

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
    by zero in the authors' code (method.md S6); here it falls back to the whole map, with a warning.
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


def stored_embedding(net: nn.Module, F: torch.Tensor, kind: str) -> torch.Tensor:
    """A DML net's embedding of maps F [B, C, h, w] → [B, 512], normalised again as the authors'
    numpy does (method.md §4.4, S15); ``kind`` is a head of ``cfga.checkpoints.HEADS``."""
    return l2_normalize(head_embedding(net.fc, F, kind))


def batch_features(net: nn.Module, x: torch.Tensor, protocol: Protocol, maps: dict | None = None
                   ) -> dict[str, torch.Tensor]:
    """All features of one same-size batch x [B, 3, H, W] → {name: float32 [B, D]} on x's device.

    ``maps`` (opt-in, for heatmaps): a dict filled, from this very forward pass, with ``mask``
    (the SCDA mask, bool [B, h, w]) and ``inputs`` ({CFGA+ layer name: its input activations
    [B, C_in, h, w]}, in CFGA+ order: ``CFGA_PLUS_LAYERS`` for a ResNet, the qkv layers for a
    Transformer, whose inputs are tokens on the grid; method.md §T9). None (the default)
    computes nothing extra.
    """
    if family_of(net, default="resnet") != "resnet":
        return transformer_batch_features(net, x, protocol, maps)
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
    if maps is not None:
        maps["mask"] = masks.detach()
        maps["inputs"] = tail.layer_inputs(CFGA_PLUS_LAYERS)
    if protocol.embedding in HEADS:
        with torch.no_grad():
            out["embedding"] = stored_embedding(net, Fd, protocol.embedding)
    for i, v in tail.vectors(L):
        b, c = CFGA_LAYERS[i]
        out[cfga_name(b, c)] = v
    out["cfga_plus"] = torch.cat([out[n] for n in CFGA_PLUS_LAYERS], dim=1)
    return {k: out[k] for k in protocol.features}


def default_batch_size(device: torch.device) -> int:
    """Images per batch when the caller gives none: 32 on CUDA, 8 on CPU (on the CPU faster per
    image than 4, and larger batches gained nothing: BENCHMARKS.md)."""
    return 32 if device.type == "cuda" else 8


def extract_features(
    model: nn.Module,
    images: Sequence[ImageLike],
    protocol: str | Protocol,
    *,
    batch_size: int | None = None,
    num_workers: int | None = None,
    progress: bool = False,
    desc: str = "extract",
    sink=None,
) -> dict[str, np.ndarray]:
    """Every feature of ``protocol`` for ``images`` (paths or PIL images), in input order.

    model:  a torchvision-layout ResNet, Swin or ViT (``cfga.load_model``), eval mode, on its device.
    Returns {feature name: float32 [N, D]} with the names of ``cfga.features.features_for``.
    sink:   a ``cfga.extraction.store.FeatureWriter`` for N images: each batch's rows are written
            to it as they come (memory independent of N) and an empty dict is returned.
    """
    proto = get_protocol(protocol)
    device = model_device(model)
    if model.training:
        raise ValueError("model must be in eval() mode (BN running statistics; method.md §3)")
    family = family_of(model, default="resnet")
    names = check_transformer(model, proto) if family != "resnet" else proto.features
    if proto.embedding in HEADS and getattr(embedding_fc(model), "out_features", None) != 512:
        raise ValueError(f"protocol {proto.name} needs the 512-d embedding head as model.fc (load the "
                         "checkpoint with cfga.load_model)")
    if batch_size is None:
        batch_size = default_batch_size(device)
    if device.type == "cpu":
        keep_freed_memory()
    if num_workers is None:  # GPU: JPEG decoding is what limits images/s (BENCHMARKS.md)
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
                if sink is not None:
                    sink.write(name, idx.numpy(), arr)
                    continue
                if name not in out:
                    out[name] = np.zeros((len(images), arr.shape[1]), dtype=np.float32)
                out[name][idx.numpy()] = arr
            bar.update(len(idx))
    if not images:
        if family != "resnet":
            out = empty_features(model, proto)
        else:
            out = {n: np.zeros((0, feature_dim(n, proto.name)), np.float32) for n in names}
        if sink is not None:
            for name, arr in out.items():
                sink.write(name, [], arr)
            out = {}
    return out
