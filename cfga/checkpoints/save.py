"""Writers of the authors' checkpoint layouts (method.md §1.2), atomically: what the pipeline's own
trained models are saved as, so they are read back by the very loader the authors' files use.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from cfga.backbones.resnet import FEAT_DIM
from cfga.files import atomic_path
from cfga.registry.features import EMBED_DIM


def _trunk_of(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items() if not k.startswith("fc.")}


def _embedding_fc(net: nn.Module) -> nn.Linear:
    fc = getattr(net, "fc", None)
    if not isinstance(fc, nn.Linear) or fc.in_features != FEAT_DIM or fc.out_features != EMBED_DIM or fc.bias is None:
        raise ValueError(f"net.fc must be Linear({FEAT_DIM}, {EMBED_DIM}) with bias (the embedding head); got {fc}")
    return fc


def _save(path, obj) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def ms_state(net: nn.Module) -> dict:
    fc = _embedding_fc(net)
    state = _trunk_of(net)
    state["class_fc.weight"] = fc.weight.detach().cpu().clone()
    state["class_fc.bias"] = fc.bias.detach().cpu().clone()
    return {"model": state}


def proxy_anchor_state(net: nn.Module, fc_seed: int = 0) -> dict:
    fc = _embedding_fc(net)
    gen = torch.Generator().manual_seed(fc_seed)
    bound = 1.0 / FEAT_DIM**0.5  # nn.Linear's default init range, from a fixed generator
    state = {f"model.{k}": v for k, v in _trunk_of(net).items()}
    state["model.fc.weight"] = (torch.rand(1000, FEAT_DIM, generator=gen) * 2 - 1) * bound
    state["model.fc.bias"] = (torch.rand(1000, generator=gen) * 2 - 1) * bound
    state["model.embedding.weight"] = fc.weight.detach().cpu().clone()
    state["model.embedding.bias"] = fc.bias.detach().cpu().clone()
    return {"model_state_dict": state}


def dgpcrl_state(net: nn.Module, n_cls: int, seed: int = 0) -> dict:
    if int(n_cls) < 1:
        raise ValueError(f"n_cls must be positive, got {n_cls}")
    gen = torch.Generator().manual_seed(seed)
    state = _trunk_of(net)
    state["class_fc.weight"] = torch.randn(int(n_cls), FEAT_DIM, generator=gen) * 0.01
    state["class_fc_2.weight"] = torch.randn(int(n_cls), 2 * FEAT_DIM, generator=gen) * 0.01
    return {"model": state}


def save_ms(path: str | os.PathLike, net: nn.Module) -> None:
    """{'model': trunk + class_fc.weight [512,2048] + class_fc.bias [512]} (MS/CosFace/ArcFace)."""
    _save(path, ms_state(net))


def save_proxy_anchor(path: str | os.PathLike, net: nn.Module) -> None:
    """{'model_state_dict': model.<trunk> + random 1000-way model.fc.* + model.embedding.*}."""
    _save(path, proxy_anchor_state(net))


def save_dgpcrl(path: str | os.PathLike, net: nn.Module, n_cls: int, seed: int = 0) -> None:
    """{'model': trunk + random bias-free class_fc.weight [n_cls,2048], class_fc_2.weight [n_cls,4096]}.

    ``net.fc`` is ignored (DGPCRL's embedding is parameter-free pooling).
    """
    _save(path, dgpcrl_state(net, n_cls, seed))


def swin_ms_state(net: nn.Module) -> dict:
    """A Swin DML net → {'model': torchvision Swin keys without head.* + class_fc.weight [512, C] +
    class_fc.bias [512]} (method.md §T7: the authors' MS-loss layout on a Swin trunk)."""
    head = net.head
    if not isinstance(head, nn.Linear) or head.out_features != EMBED_DIM or head.bias is None:
        raise ValueError(f"net.head must be Linear(C, {EMBED_DIM}) with bias (the embedding head); got {head}")
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items() if not k.startswith("head.")}
    state["class_fc.weight"] = head.weight.detach().cpu().clone()
    state["class_fc.bias"] = head.bias.detach().cpu().clone()
    return {"model": state}


def save_swin_ms(path: str | os.PathLike, net: nn.Module) -> None:
    _save(path, swin_ms_state(net))
