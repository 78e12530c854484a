"""Dataset formats as published: the files each format is read from (no torch).

Read by rules/common.smk and rules/datasets.smk (config keys, synthetic archive names),
cfga.data.synthetic (the names it writes) and the schema test (each format's keys).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetFormat:
    """name: the config's ``format``; files: config key → the published file name, in the
    order ingestion reads them (every key is required unless the dataset is synthetic);
    md5: how the config gives checksums, ``"single"`` (one md5 string, for the one file) or
    ``"per_file"`` (a mapping from some of the ``files`` keys to md5 strings)."""

    name: str
    files: dict[str, str]
    md5: str


FORMATS: dict[str, DatasetFormat] = {
    f.name: f
    for f in [
        DatasetFormat("cub", files={"archive": "CUB_200_2011.tgz"}, md5="single"),
        DatasetFormat("cars", files={"images_archive": "car_ims.tgz", "annotations": "cars_annos.mat"},
                      md5="per_file"),
    ]
}


def get_format(name: str) -> DatasetFormat:
    """The format ``name``; raises ``ValueError`` naming the known formats."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown dataset format {name!r}; known: {', '.join(FORMATS)}") from None


def file_keys(name: str) -> tuple[str, ...]:
    """Config keys of the files format ``name`` is read from (all required for a real dataset)."""
    return tuple(get_format(name).files)
