"""The workflow config's JSON schema, shipped with the package: the only source of defaults.

Snakemake validates a config against ``config.schema.yaml`` and fills its defaults; the settings
dataclasses of the Python API read their defaults from the same file, so a default is written once.
"""
from __future__ import annotations

import functools
from pathlib import Path

import yaml

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


@functools.lru_cache(maxsize=None)
def config_schema() -> dict:
    with open(SCHEMA_PATH, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def schema_defaults(*path: str) -> dict:
    """{key: default} of the object schema at ``path`` (property names from the root), e.g.
    ``schema_defaults("models", "*", "pretrain")``; "*" steps into additionalProperties."""
    node = config_schema()
    for key in path:
        node = node["additionalProperties"] if key == "*" else node["properties"][key]
    return {k: v["default"] for k, v in node.get("properties", {}).items() if "default" in v}
