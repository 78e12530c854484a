"""Shard jobs run like the unsharded extraction job: same threads, same resources.

Profiles and ``--set-threads``/``--set-resources`` name ``extract_features``; a shard job
(``extract_features_shard``) gets those values too, except the ones set for the shard rule
itself. Same threads matter: on CPU the float results depend on torch's thread count, and the
gathered file must be the unsharded job's bytes.
"""
from __future__ import annotations

from typing import Mapping

THREADS = "_cores"  # how Snakemake names a rule's threads among its resources


def inherited_resources(source: Mapping, target: Mapping, own: set[str]) -> dict:
    """``target``'s resources after taking ``source``'s, except those named in ``own``
    (set for the target rule itself; ``THREADS`` for its threads)."""
    out = dict(target)
    out.update({name: value for name, value in source.items() if name not in own})
    return out


def overridden(resource_settings, rule: str) -> set[str]:
    """Resources (and ``THREADS``) the command line or a profile sets for ``rule``."""
    own = set((getattr(resource_settings, "overwrite_resources", None) or {}).get(rule, {}))
    if rule in (getattr(resource_settings, "overwrite_threads", None) or {}):
        own.add(THREADS)
    return own


def inherit_resources(workflow, source: str = "extract_features", target: str = "extract_features_shard") -> None:
    """Give rule ``target`` the threads and resources of rule ``source`` (call after both are
    declared). Reads the workflow's resource settings: Snakemake has no public way to say
    "these two rules share their settings"."""
    src = workflow.get_rule(source).resources
    dst = workflow.get_rule(target).resources
    new = inherited_resources(src, dst, overridden(workflow.resource_settings, target))
    for name, value in new.items():
        dst[name] = value
