"""The DML losses the pipeline trains with, and what follows from each (no torch).

Read by rules/common.smk (which protocol a trained model must be evaluated with),
cfga.training.dml (head and saved format), cfga.outputs.tables (row family) and the schema test
(``models.<name>.train.loss`` enumerates exactly these).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Loss:
    """name: the config's ``train.loss``; head: the embedding head it trains (a head of
    cfga.registry.protocols.HEADS); format: the authors' checkpoint layout it is saved in;
    protocol: the evaluation protocol that reads that head; family: its row of Tables 3/6
    (cfga.outputs.tables.FAMILIES)."""

    name: str
    head: str
    format: str
    protocol: str
    family: str


LOSSES: dict[str, Loss] = {
    loss.name: loss
    for loss in [
        Loss("ms", head="ms", format="ms", protocol="ms", family="msloss"),
        Loss("proxy_anchor", head="proxy_anchor", format="proxy_anchor", protocol="proxy_anchor",
             family="proxy_anchor"),
        Loss("cosface", head="ms", format="ms", protocol="ms", family="cosface"),
        Loss("arcface", head="ms", format="ms", protocol="ms", family="arcface"),
    ]
}


def get_loss(name: str) -> Loss:
    """The loss ``name``; raises ``ValueError`` naming the known losses."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown DML loss {name!r}; known: {', '.join(LOSSES)}") from None
