"""Fine-tune a ResNet with a deep-metric-learning loss and save it in the authors' format.

Offline stand-in for the authors' trained DML checkpoints (method.md §1.1): start from a torchvision
backbone state, add a 512-d embedding head, train it with pytorch-metric-learning, and write the
result in exactly the layout the evaluation loads (:mod:`cfga.checkpoints`):

==============  =====================================  ================  ==================
loss            embedding (trained = evaluated)        pml loss          saved format
==============  =====================================  ================  ==================
``ms``          L2(Linear(GMP(F)))                     MultiSimilarity   ``ms``
                                                       (+ its miner)
``cosface``     L2(Linear(GMP(F)))                     CosFace           ``ms``
``arcface``     L2(Linear(GMP(F)))                     ArcFace           ``ms``
``proxy_anchor`` L2(Linear(GMP(F) + GAP(F)))           ProxyAnchor       ``proxy_anchor``
==============  =====================================  ================  ==================

Choices (recorded by :func:`settings_record`):

* **BatchNorm frozen** (eval mode, affine parameters fixed). Batches hold only
  ``batch_size / m_per_class`` classes of a few images, so batch statistics would be noisy and
  would drift the running statistics away from the backbone's; the evaluation runs in eval mode,
  so with frozen BN the training forward is exactly the evaluated forward; and the authors'
  Proxy-Anchor training freezes BN by default too.
* **Learning rates:** AdamW; the backbone at ``lr``, the new embedding Linear at
  ``HEAD_LR_MULT × lr``, the loss's own parameters (proxies / class weights of Proxy Anchor,
  CosFace, ArcFace) at ``LOSS_LR_MULT × lr`` without weight decay (Proxy Anchor's published
  setting is proxies at 100× the backbone lr). Constant lr: the runs are a few epochs long.
* **Trainable layers:** ``trainable="layer4"`` fine-tunes only ``layer4`` and the head (the
  layers CFGA reads); ``conv1``–``layer3`` stay as the backbone has them and run without
  autograd, which makes a step at the evaluation's crop size (224–227 px) affordable on a CPU.
  The default (``"all"``) trains the whole trunk, as the authors did.
* **Sampler:** :class:`pytorch_metric_learning.samplers.MPerClassSampler`, m images per class
  per batch (classes with fewer images are drawn with replacement); one epoch = as many
  samples as there are training images, rounded down to whole batches (at least one batch).
* Mixed precision (autocast fp16 + GradScaler) only on CUDA; the head and the loss always run
  in float32. On CPU a run is deterministic given ``settings.seed`` (and the thread count).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cfga.backbones import family_of
from cfga.backbones.heads import dml_embedding, head_embedding, trunk_features
from cfga.backbones.resnet import ARCHS, FEAT_DIM
from cfga.checkpoints.formats import to_torchvision
from cfga.checkpoints.save import save_ms, save_proxy_anchor, save_swin_ms
from cfga.registry.archs import arch_info
from cfga.registry.config import schema_defaults
from cfga.registry.features import EMBED_DIM
from cfga.registry.losses import LOSSES as _LOSSES
from cfga.training.pretrain import seed_everything, training_views

log = logging.getLogger(__name__)

LOSSES = tuple(_LOSSES)
# Embedding head the loss trains (= the head its evaluation protocol uses), and the saved format
# (cfga.registry.losses).
HEAD_FOR_LOSS = {name: loss.head for name, loss in _LOSSES.items()}
FORMAT_FOR_LOSS = {name: loss.format for name, loss in _LOSSES.items()}

HEAD_LR_MULT = 10.0
LOSS_LR_MULT = 100.0
FREEZE_BN = True
TRAINABLE = ("all", "layer4")

# The config schema is the one home of these defaults (models.<name>.train).
_DEFAULTS = schema_defaults("models", "*", "train")


@dataclass(frozen=True)
class TrainSettings:
    """epochs: passes over the train split; image_size: square training crop in px;
    batch_size: images per step (clamped to m_per_class × classes, a multiple of m_per_class);
    lr: backbone learning rate (head ×10, loss parameters ×100); m_per_class: sampler's m;
    trainable: "all" or "layer4" (only layer4 + head learn); min_crop_area: smallest area
    fraction of the random training crop."""

    epochs: int = _DEFAULTS["epochs"]
    image_size: int = _DEFAULTS["image_size"]
    batch_size: int = _DEFAULTS["batch_size"]
    lr: float = _DEFAULTS["lr"]
    weight_decay: float = 1e-4  # not a config key
    m_per_class: int = _DEFAULTS["m_per_class"]
    seed: int = _DEFAULTS["seed"]
    trainable: str = _DEFAULTS["trainable"]
    min_crop_area: float = _DEFAULTS["min_crop_area"]


def build_loss(loss: str, num_classes: int):
    """→ (pml loss module, miner or None) with the papers' usual hyper-parameters (pml defaults)."""
    from pytorch_metric_learning import losses, miners

    if loss == "ms":
        return losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5), miners.MultiSimilarityMiner(epsilon=0.1)
    if loss == "proxy_anchor":
        return losses.ProxyAnchorLoss(num_classes, EMBED_DIM, margin=0.1, alpha=32), None
    if loss == "cosface":
        return losses.CosFaceLoss(num_classes, EMBED_DIM, margin=0.35, scale=64), None
    if loss == "arcface":
        return losses.ArcFaceLoss(num_classes, EMBED_DIM, margin=28.6, scale=64), None
    raise ValueError(f"unknown DML loss {loss!r}; known: {', '.join(LOSSES)}")


def _freeze_bn(net: nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)


def effective_batch_size(settings: TrainSettings, n_classes: int) -> int:
    """settings.batch_size clamped to what MPerClassSampler allows: a multiple of m, ≤ m·classes."""
    m = settings.m_per_class
    bs = min(settings.batch_size, m * n_classes)
    bs -= bs % m
    if bs < 2 * m:
        raise ValueError(
            f"batch_size {settings.batch_size} with m_per_class {m} and {n_classes} classes leaves "
            f"fewer than two classes per batch; a DML loss needs negatives (batch_size ≥ {2 * m})"
        )
    return bs


def embed(net: nn.Module, x: torch.Tensor, loss: str) -> torch.Tensor:
    """The evaluated embedding of a net trained with ``loss`` (cfga.checkpoints.dml_embedding)."""
    return dml_embedding(net, x, HEAD_FOR_LOSS[loss])


def train_dml(
    backbone_state: dict,
    arch: str,
    images: Sequence,
    labels: Sequence[int],
    loss: str,
    settings: TrainSettings,
    *,
    device: str | torch.device = "auto",
    progress: bool = False,
) -> tuple[nn.Module, list[dict]]:
    """Fine-tune ``arch`` from ``backbone_state`` with DML ``loss`` → (net in eval mode, history).

    backbone_state: a torchvision state dict (``fc.*`` dropped; the trunk is loaded strictly);
    images: paths or PIL images; labels: any ints (remapped to 0..C-1 in sorted order).
    The returned net is a torchvision ResNet whose ``fc`` is the trained ``Linear(2048, 512)``
    embedding head, on ``device``; its embedding is :func:`embed` (``HEAD_FOR_LOSS[loss]``).
    history: one ``{epoch, loss, steps}`` per epoch (mean loss over the epoch's steps).
    """
    from pytorch_metric_learning.samplers import MPerClassSampler

    if loss not in LOSSES:
        raise ValueError(f"unknown DML loss {loss!r}; known: {', '.join(LOSSES)}")
    family = arch_info(arch).family
    if family not in ("resnet", "swin"):
        raise ValueError(f"DML training supports ResNet and Swin backbones, not {arch} ({family})")
    if family == "swin" and HEAD_FOR_LOSS.get(loss) != "ms":
        raise ValueError(f"loss {loss!r} trains the {HEAD_FOR_LOSS.get(loss)} head, which a Swin does not have; "
                         "a Swin takes the ms head (losses ms, cosface, arcface; method.md §T7)")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if settings.trainable not in TRAINABLE:
        raise ValueError(f"trainable {settings.trainable!r}; known: {', '.join(TRAINABLE)}")
    from cfga.runtime import resolve_device

    device = resolve_device(device)
    classes = sorted(set(int(x) for x in labels))
    if len(classes) < 2:
        raise ValueError("DML training needs at least two classes")
    remap = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([remap[int(x)] for x in labels])
    bs = effective_batch_size(settings, len(classes))
    if bs != settings.batch_size:
        log.info("batch size %d → %d (m_per_class %d, %d classes)", settings.batch_size, bs,
                 settings.m_per_class, len(classes))
    head = HEAD_FOR_LOSS[loss]
    use_amp = device.type == "cuda"

    if family == "resnet":
        trunk, _ = to_torchvision(backbone_state, "torchvision", arch, path="<backbone state>")
        seed_everything(settings.seed)
        net = ARCHS[arch](weights=None)
        net.fc = nn.Linear(FEAT_DIM, EMBED_DIM)
        net.load_state_dict({**net.state_dict(), **trunk}, strict=True)
    else:
        net = _swin_with_head(backbone_state, arch, settings.seed)
    fc, trainable_prefixes, features = _FAMILY_HOOKS[family](net)
    net.to(device)
    loss_fn, miner = build_loss(loss, len(classes))
    loss_fn.to(device)

    small, aug = training_views(images, settings.image_size, settings.min_crop_area)
    sampler = MPerClassSampler(y.numpy(), settings.m_per_class, batch_size=bs,
                               length_before_new_iter=max(len(y), bs))

    if FREEZE_BN:
        _freeze_bn(net)
    if settings.trainable == "layer4":
        for name, p in net.named_parameters():
            if not name.startswith(trainable_prefixes):
                p.requires_grad_(False)
    bn_params = {id(p) for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                 for p in m.parameters()}
    groups = [
        {"params": [p for n, p in net.named_parameters()
                    if not n.startswith(trainable_prefixes[-1]) and p.requires_grad and id(p) not in bn_params],
         "lr": settings.lr},
        {"params": list(fc.parameters()), "lr": settings.lr * HEAD_LR_MULT},
    ]
    loss_params = [p for p in loss_fn.parameters() if p.requires_grad]
    if loss_params:
        groups.append({"params": loss_params, "lr": settings.lr * LOSS_LR_MULT, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    history = []
    for epoch in tqdm(range(settings.epochs), desc=f"train {loss}", unit="epoch", disable=not progress):
        net.train()
        if FREEZE_BN:
            _freeze_bn(net)
        order = list(iter(sampler))
        losses, steps = [], 0
        for j in range(0, len(order) - bs + 1, bs):
            idx = order[j : j + bs]
            x = torch.stack([aug(small[i]) for i in idx]).to(device)
            t = y[idx].to(device)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                F = features(net, x)
            emb = head_embedding(fc, F.float(), head)
            pairs = miner(emb, t) if miner is not None else None
            value = loss_fn(emb, t, pairs)
            if not torch.isfinite(value):
                raise FloatingPointError(
                    f"{loss} loss became {float(value)} in epoch {epoch + 1}; lower lr (now {settings.lr})"
                )
            opt.zero_grad(set_to_none=True)
            scaler.scale(value).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(float(value.detach()))
            steps += 1
        rec = {"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else float("nan"), "steps": steps}
        history.append(rec)
        log.info("%s epoch %d loss %.4f (%d steps of %d)", loss, rec["epoch"], rec["loss"], steps, bs)
    net.eval()
    return net, history


def save_trained(path, net: nn.Module, loss: str) -> None:
    """Write ``net`` in the authors' format for ``loss``: ms/cosface/arcface → ms, proxy_anchor → proxy
    (a Swin: the ms layout of method.md §T7)."""
    fmt = FORMAT_FOR_LOSS.get(loss)
    if fmt is None:
        raise ValueError(f"unknown DML loss {loss!r}; known: {', '.join(LOSSES)}")
    if family_of(net) == "swin":
        save_swin_ms(path, net)
        return
    (save_ms if fmt == "ms" else save_proxy_anchor)(path, net)


def _swin_with_head(backbone_state: dict, arch: str, seed: int) -> nn.Module:
    """A torchvision Swin with the backbone's weights (``head.*`` dropped) and a new 512-d head."""
    from cfga.backbones import builder

    seed_everything(seed)
    net = builder(arch)(weights=None)
    net.head = nn.Linear(net.head.in_features, EMBED_DIM)
    trunk = {k: v for k, v in backbone_state.items() if not k.startswith("head.")}
    net.load_state_dict({**net.state_dict(), **trunk}, strict=True)
    return net


def _swin_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The token map F [B, C, h, w] (method.md §T2); stages whose weights are all frozen run
    without autograd (``trainable="layer4"``: only the last stage, the final norm and the head learn)."""
    stages = list(net.features)
    i = 0
    while i < len(stages) - 1 and not any(p.requires_grad for p in stages[i].parameters()):
        i += 1
    with torch.no_grad():
        for st in stages[:i]:
            st.eval()  # frozen: no stochastic depth either, as at evaluation
        h = nn.Sequential(*stages[:i])(x) if i else x
    for st in stages[i:]:
        h = st(h)
    return net.permute(net.norm(h))


# family → net → (embedding head module, parameter-name prefixes that learn under
# trainable="layer4" -- the head's last --, the feature map function).
_FAMILY_HOOKS = {
    "resnet": lambda net: (net.fc, ("layer4.", "fc."), trunk_features),
    "swin": lambda net: (net.head, (f"features.{len(net.features) - 1}.", "norm.", "head."), _swin_features),
}


def settings_record(
    settings: TrainSettings,
    *,
    loss: str,
    arch: str,
    n_images: int | None = None,
    n_classes: int | None = None,
    history: list[dict] | None = None,
    backbone: str | None = None,
    backbone_sha256: str | None = None,
) -> dict:
    """JSON-ready record of a training run, to write next to the checkpoint."""
    import pytorch_metric_learning

    rec = {
        "loss": loss,
        "format": FORMAT_FOR_LOSS[loss],
        "embedding_head": HEAD_FOR_LOSS[loss],
        "arch": arch,
        "settings": asdict(settings),
        "batch_size_used": effective_batch_size(settings, n_classes) if n_classes else None,
        "optimizer": "AdamW",
        "lr_multipliers": {"backbone": 1.0, "embedding_head": HEAD_LR_MULT, "loss_parameters": LOSS_LR_MULT},
        "freeze_bn": FREEZE_BN,
        "sampler": f"MPerClassSampler(m={settings.m_per_class})",
        "augmentation": f"RandomResizedCrop({settings.image_size}, scale=({settings.min_crop_area}, 1.0)) "
                        "+ RandomHorizontalFlip",
        "trainable": settings.trainable,
        "n_images": n_images,
        "n_classes": n_classes,
        "backbone": backbone,
        "backbone_sha256": backbone_sha256,
        "history": list(history) if history is not None else None,
        "versions": {"torch": torch.__version__, "pytorch_metric_learning": pytorch_metric_learning.__version__},
    }
    return rec
