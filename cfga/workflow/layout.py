"""Where the workflow puts things, and which retrieval outputs a config asks for.

The rules (rules/*.smk) and the ``cfga`` command read these, so a path or a choice is spelled once.
Torch-free.
"""
from __future__ import annotations

from typing import Mapping

from cfga.registry.features import features_for


def features_path(dataset: str, model: str) -> str:
    return f"results/features/{dataset}/{model}.npz"


def manifest_path(dataset: str) -> str:
    return f"results/manifests/{dataset}.csv"


def dataset_root(dataset: str) -> str:
    return f"results/datasets/{dataset}"


def checkpoint_path(models: Mapping[str, Mapping], dataset: str, model: str) -> str:
    """Weights file of a model on a dataset: the config's file, or what the pipeline trains."""
    cfg = models[model]
    if "pretrain" in cfg:
        return f"results/checkpoints/pretrained/{dataset}/{model}.pth"
    if "train" in cfg:
        return f"results/checkpoints/trained/{dataset}/{model}.pth"
    return cfg["checkpoint"]


def model_datasets(datasets: Mapping, models: Mapping[str, Mapping], model: str) -> list[str]:
    """Datasets a model runs on: its ``datasets:`` list, or all of them."""
    return list(models[model].get("datasets", list(datasets)))


def gallery_features(retrieval: Mapping, protocol: str, arch: str | None = None) -> list[str]:
    """The config's ``retrieval.features`` that ``protocol`` produces on ``arch``, in the config's order."""
    have = features_for(protocol, arch)
    return [f for f in retrieval["features"] if f in have]


def compare_model(datasets: Mapping, models: Mapping[str, Mapping], retrieval: Mapping, dataset: str) -> str | None:
    """The first model (config order) on ``dataset`` whose protocol has both ``retrieval.compare``
    features; None if there is none."""
    for m, cfg in models.items():
        if dataset in model_datasets(datasets, models, m) and all(
                f in features_for(cfg["protocol"], cfg["arch"]) for f in retrieval["compare"]):
            return m
    return None
