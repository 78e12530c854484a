"""Evaluation protocols (method.md §1.1): how each table row preprocesses and masks.

``scda``: ImageNet rows (Table 5, Table 3 "Pre-trained"); ``ms``: MS loss, CosFace, ArcFace;
``proxy_anchor``; ``dgpcrl``; ``scda_224`` (Transformers only, method.md §T7). Only ``scda``
and ``scda_224`` keep the largest connected component (method.md S5).
"""
from __future__ import annotations

from dataclasses import dataclass

from cfga.registry.features import features_for


@dataclass(frozen=True)
class Resize:
    """How a protocol resizes (method.md §2).

    short:    target short side in px.
    upsample: False → the authors' ``scda``/``dgpcrl`` rule (only shrink, half-to-even rounding);
              True → torchvision ``Resize(short)`` (long side truncated, small images upsampled).
    crop:     centre-crop size in px, or None.
    """

    short: int
    upsample: bool = False
    crop: int | None = None


@dataclass(frozen=True)
class Protocol:
    """name: protocol id; resize: method.md §2 rule; lcc: keep the largest connected component
    of the SCDA mask (ImageNet rows only, method.md S5); features: what it produces (cfga.features)."""

    name: str
    resize: Resize
    lcc: bool
    # How the table's "embedding" comes from the layer4 map: None (no embedding feature),
    # a DML head of cfga.checkpoints.HEADS ("ms", "proxy_anchor"), or "pooling" = Pooling.
    embedding: str | None = None

    @property
    def features(self) -> tuple[str, ...]:
        """Features on a ResNet; ``features_for(name, arch)`` for any arch."""
        return features_for(self.name)


PROTOCOLS: dict[str, Protocol] = {
    "scda": Protocol("scda", Resize(short=256, upsample=False, crop=None), lcc=True),
    "ms": Protocol("ms", Resize(short=256, upsample=True, crop=227), lcc=False, embedding="ms"),
    "proxy_anchor": Protocol("proxy_anchor", Resize(short=256, upsample=True, crop=224), lcc=False,
                             embedding="proxy_anchor"),
    "dgpcrl": Protocol("dgpcrl", Resize(short=280, upsample=False, crop=None), lcc=False, embedding="pooling"),
    # Swin and ViT (method.md §T7): proxy_anchor's Resize(256) + CenterCrop(224), with LCC.
    "scda_224": Protocol("scda_224", Resize(short=256, upsample=True, crop=224), lcc=True),
}

# Protocols whose network carries a 512-d embedding head (``fc = Linear(2048, 512)``); the
# protocol's name is the head's name (cfga.backbones.heads).
HEADS = tuple(p.name for p in PROTOCOLS.values() if p.embedding == p.name)


def get_protocol(name: str | Protocol) -> Protocol:
    if isinstance(name, Protocol):
        return name
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"unknown protocol {name!r}; known: {', '.join(sorted(PROTOCOLS))}") from None
