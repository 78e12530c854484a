"""Offline stand-in for ImageNet weights: a ResNet classifier trained on a dataset's train classes.

Writes a plain torchvision state dict (``fc`` sized to the train classes), which then goes through
exactly the loading path of the ImageNet V1 files (``cfga.models.load_model``).
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms as T
from torch import nn
from tqdm.auto import tqdm

from cfga.extraction.preprocess import IMAGENET_MEAN, IMAGENET_STD, load_rgb
from cfga.registry.config import schema_defaults

log = logging.getLogger(__name__)

# The config schema is the one home of these defaults (models.<name>.pretrain).
_DEFAULTS = schema_defaults("models", "*", "pretrain")


@dataclass(frozen=True)
class PretrainSettings:
    """epochs: passes over the train split; image_size: square training crop in px."""

    epochs: int = _DEFAULTS["epochs"]
    image_size: int = _DEFAULTS["image_size"]
    batch_size: int = _DEFAULTS["batch_size"]
    lr: float = _DEFAULTS["lr"]
    weight_decay: float = 1e-4  # not a config key
    seed: int = _DEFAULTS["seed"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def training_views(images: Sequence, size: int, min_crop_area: float = 0.4):
    """→ (decoded images with short side ≈1.15·size, the train-time augmentation to size×size).

    The crop covers ``min_crop_area``–1 of the image's area. Decoding once keeps the epochs'
    cost to the network alone.
    """
    small = [T.functional.resize(load_rgb(im), int(size * 1.15)) for im in images]
    aug = T.Compose(
        [
            T.RandomResizedCrop(size, scale=(min_crop_area, 1.0)),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    return small, aug


def train_classifier(
    arch_fn,
    images: Sequence,
    labels: Sequence[int],
    settings: PretrainSettings,
    *,
    device: torch.device,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Train ``arch_fn(num_classes=…)`` from scratch; → (CPU state dict, per-epoch history).

    images: paths or PIL images; labels: any ints (remapped to 0..C-1 in sorted order).
    """
    seed_everything(settings.seed)
    classes = sorted(set(int(x) for x in labels))
    remap = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([remap[int(x)] for x in labels])
    small, aug = training_views(images, settings.image_size)
    net: nn.Module = arch_fn(num_classes=len(classes)).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps = settings.epochs * ((len(small) + settings.batch_size - 1) // settings.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=max(steps, 1))
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(settings.seed)
    history = []
    net.train()
    for epoch in tqdm(range(settings.epochs), desc="pretrain", unit="epoch", disable=not progress):
        order = torch.randperm(len(small), generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for j in range(0, len(order), settings.batch_size):
            idx = order[j : j + settings.batch_size]
            if len(idx) < 2:  # BN needs two samples
                continue
            x = torch.stack([aug(small[int(i)]) for i in idx]).to(device)
            t = y[idx].to(device)
            out = net(x)
            loss = loss_fn(out, t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss) * len(idx)
            correct += int((out.argmax(1) == t).sum())
            total += len(idx)
        rec = {"epoch": epoch + 1, "loss": loss_sum / max(total, 1), "train_accuracy": correct / max(total, 1)}
        history.append(rec)
        log.info("epoch %d loss %.4f train acc %.3f", rec["epoch"], rec["loss"], rec["train_accuracy"])
    net.eval()
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}, history
