"""Evaluation protocols (SPEC §1.1): how each table row preprocesses and masks.

Only the ImageNet ``scda`` protocol is defined so far; the DML protocols (ms, proxy_anchor,
dgpcrl) plug in here with their own ``Resize`` and ``lcc=False``.
"""
from __future__ import annotations

from dataclasses import dataclass

from .features import features_for
from .preprocess import Resize


@dataclass(frozen=True)
class Protocol:
    """name: protocol id; resize: SPEC §2 rule; lcc: keep the largest connected component
    of the SCDA mask (ImageNet rows only, SPEC S5); features: what it produces (cfga.features)."""

    name: str
    resize: Resize
    lcc: bool

    @property
    def features(self) -> tuple[str, ...]:
        return features_for(self.name)


PROTOCOLS: dict[str, Protocol] = {
    "scda": Protocol("scda", Resize(short=256, upsample=False, crop=None), lcc=True),
}


def get_protocol(name: str | Protocol) -> Protocol:
    if isinstance(name, Protocol):
        return name
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"unknown protocol {name!r}; known: {', '.join(sorted(PROTOCOLS))}") from None
