"""Dataset formats as published: the files each format is read from (no torch), and the
field's Recall@K conventions for each.

Read by rules/common.smk and rules/datasets.smk (config keys, synthetic archive names),
cfga.data.synthetic (the names it writes), cfga.data.formats (ingestion), the metrics rule
(default ``ks``) and the schema test (each format's keys).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from cfga.registry.features import RECALL_KS

# The field's Recall@K for each benchmark: CUB/Cars (and one's own data) 1..32, SOP up to 1000
# (Oh Song et al., CVPR 2016), In-Shop up to 50 (Liu et al., CVPR 2016).
SOP_KS: tuple[int, ...] = (1, 10, 100, 1000)
INSHOP_KS: tuple[int, ...] = (1, 10, 20, 30, 40, 50)


@dataclass(frozen=True)
class DatasetFormat:
    """name: the config's ``format``; files: config key → the published file name, in the
    order ingestion reads them (every key is required unless the dataset is synthetic; None:
    the user's own file or folder, no published name); md5: how the config gives checksums,
    ``"single"`` (one md5 string, for the one file), ``"per_file"`` (a mapping from some of the
    ``files`` keys to md5 strings) or ``"none"`` (a folder: nothing to check);
    ks: the K of Recall@K reported by default (config ``datasets.<name>.metrics.ks`` overrides);
    dirs: ``files`` keys that may (or must) name a directory rather than a file;
    synthetic: whether ``cfga.data.synthetic`` writes offline stand-ins in this format."""

    name: str
    files: dict[str, str | None]
    md5: str
    ks: tuple[int, ...] = RECALL_KS
    dirs: tuple[str, ...] = field(default=())
    synthetic: bool = False


FORMATS: dict[str, DatasetFormat] = {
    f.name: f
    for f in [
        DatasetFormat("cub", files={"archive": "CUB_200_2011.tgz"}, md5="single", synthetic=True),
        DatasetFormat("cars", files={"images_archive": "car_ims.tgz", "annotations": "cars_annos.mat"},
                      md5="per_file", synthetic=True),
        # One sub-directory per class (torchvision ImageFolder layout).
        DatasetFormat("folder", files={"root": None}, md5="none", dirs=("root",)),
        # open-metric-learning's table: label,path,split[,is_query,is_gallery], paths under root.
        DatasetFormat("csv", files={"table": None, "root": None}, md5="per_file", dirs=("root",)),
        # Stanford Online Products: the zip, or the folder it unpacks to.
        DatasetFormat("sop", files={"archive": "Stanford_Online_Products.zip"}, md5="single", ks=SOP_KS,
                      dirs=("archive",)),
        # In-Shop Clothes Retrieval (DeepFashion): Img/img.zip (or its folder) and Eval/list_eval_partition.txt.
        DatasetFormat("inshop", files={"images_archive": "img.zip", "partition": "list_eval_partition.txt"},
                      md5="per_file", ks=INSHOP_KS, dirs=("images_archive",)),
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


def dataset_ks(cfg: Mapping, name: str = "<name>") -> tuple[int, ...]:
    """The K of Recall@K for a dataset config: its ``metrics.ks``, else its format's default."""
    ks = (cfg.get("metrics") or {}).get("ks")
    if ks is None:
        return get_format(cfg["format"]).ks
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks) or list(ks) != sorted(set(ks)):
        raise ValueError(f"config: datasets.{name}.metrics.ks must be increasing positive integers, got {list(ks)}")
    return ks
