"""Batched, exact CFGA features of a Swin or ViT (TRANSFORMERS.md): one same-size batch →
{name: float32 [B, D]}.

The trunk up to the second-to-last block runs without autograd; the last two blocks run with
it, recording each CFGA linear's input X and output Y per token. ``autograd.grad(L, Y)`` gives
every image's dL/dY (LayerNorm, attention and MLP never mix images, so the batch's summed
scalar yields each image's own gradient); image n's weight gradient is ``dY_nᵀ X_n``
(``cfga.numerics.gradients.linear_vectors``), never a whole-network backward.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from cfga.backbones import embedding_fc, family_module, family_of
from cfga.backbones.heads import head_embedding
from cfga.numerics.gradients import linear_vectors
from cfga.numerics.mask import scda_mask
from cfga.numerics.pooling import l2_normalize, masked_scda_features, pooling_feature64
from cfga.numerics.scalar import masked_scalar
from cfga.registry.archs import check_family_protocol
from cfga.registry.features import (
    block_labels,
    cfga_names_of_blocks,
    transformer_cfga_plus,
    transformer_feature_dim,
    transformer_features,
)
from cfga.registry.protocols import Protocol

log = logging.getLogger(__name__)


def net_features(net: nn.Module, protocol: Protocol) -> tuple[str, ...]:
    """Feature names ``protocol`` produces on this Transformer net (its own depth decides ViT names)."""
    fam = family_of(net)
    return transformer_features(protocol.name, fam, family_module(fam).block_count(net))


def transformer_batch_features(net: nn.Module, x: torch.Tensor, protocol: Protocol, maps: dict | None = None
                               ) -> dict[str, torch.Tensor]:
    """All features of one same-size batch x [B, 3, H, W] of a Swin or ViT → {name: float32 [B, D]}.

    ``maps``: as ``cfga.extraction.pipeline.batch_features``'s; the CFGA+ layers' inputs are the
    qkv linears' captured inputs on the token grid (``qkv_input_map``; method.md §T9).
    """
    fam = family_of(net)
    bb = family_module(fam)
    with torch.no_grad():
        h = bb.trunk(net, x)
    h = h.detach().requires_grad_(True)  # builds the graph even if the weights are frozen
    with torch.enable_grad():
        F, cls, io = bb.tail(net, h)
        Fd = F.detach()
        mask = scda_mask(Fd, protocol.lcc)
        empty = ~mask.flatten(-2).any(dim=-1)
        if bool(empty.any()):
            log.warning("empty SCDA mask (constant token map of size %s) in %d image(s): using the whole map",
                        tuple(F.shape[-2:]), int(empty.sum()))
            mask = mask | empty[:, None, None]
        L = masked_scalar(F, mask)
    out: dict[str, torch.Tensor] = {}
    scda, original = masked_scda_features(Fd, mask)
    out.update(scda=scda.float(), scda_original=original.float(), pooling=pooling_feature64(Fd).float())
    if cls is not None:
        out["class_token"] = l2_normalize(cls.detach())
    if protocol.embedding == "ms":
        with torch.no_grad():
            out["embedding"] = l2_normalize(head_embedding(embedding_fc(net), Fd, "ms"))
    elif protocol.embedding is not None:
        raise ValueError(f"protocol {protocol.name} has no Transformer embedding head")

    B = x.shape[0]
    blocks = block_labels(fam, bb.block_count(net))
    names = cfga_names_of_blocks(blocks)
    if maps is not None:  # before the loop below frees the captured inputs
        maps["mask"] = mask
        maps["inputs"] = qkv_inputs(bb, net, io, blocks, tuple(F.shape[-2:]))
    dYs = list(torch.autograd.grad(L, [y for _, y in io]))
    for i, name in enumerate(names):
        X, Y = io[i]
        io[i] = None
        dY, dYs[i] = dYs[i], None
        out[name] = linear_vectors(X.reshape(B, -1, X.shape[-1]), dY.reshape(B, -1, dY.shape[-1]))
        del X, Y, dY
    out["cfga_plus"] = torch.cat([out[n] for n in transformer_cfga_plus(blocks)], dim=1)
    return {k: out[k] for k in net_features(net, protocol)}


def qkv_inputs(bb, net: nn.Module, io: list, blocks: tuple[str, str], size: tuple[int, int]
               ) -> dict[str, torch.Tensor]:
    """{CFGA+ feature name: its qkv linear's input on the token grid, [B, C, h, w]} from the
    tail's io (``cfga_names_of_blocks`` order), in CFGA+ order."""
    names = cfga_names_of_blocks(blocks)
    return {n: bb.qkv_input_map(blk, io[names.index(n)][0], size)
            for blk, n in zip(bb.cfga_blocks(net), transformer_cfga_plus(blocks))}


def check_transformer(net: nn.Module, protocol: Protocol) -> tuple[str, ...]:
    """Refuse a protocol that does not fit the net's family (a ViT with ``scda``: its input size
    is fixed) with the protocols that fit; → the feature names."""
    check_family_protocol(family_of(net), protocol.name)
    return net_features(net, protocol)


def empty_features(net: nn.Module, protocol: Protocol) -> dict:
    """{name: float32 [0, D]} for an empty image list."""
    import numpy as np

    fam = family_of(net)
    bb = family_module(fam)
    # A CFGA feature is as long as its weight's input; the rest follow the token map's C.
    dims = dict(zip(cfga_names_of_blocks(block_labels(fam, bb.block_count(net))),
                    (w.shape[1] for w in bb.cfga_weights(net))))
    C = bb.channels(net)
    return {n: np.zeros((0, dims[n] if n in dims else transformer_feature_dim(n, C)), np.float32)
            for n in net_features(net, protocol)}
