# Config validation and target lists. Everything the rules need to know about datasets,
# models and features comes from here (features from cfga.features).

import re

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from cfga.features import FEATURES, features_for

validate(config, "../schemas/config.schema.yaml")
config.setdefault("extraction", {})
config["extraction"].setdefault("device", "auto")
config["extraction"].setdefault("batch_size", 8)
config.setdefault("metrics", {}).setdefault("device", "cpu")
config.setdefault("tables", {}).setdefault("published", "paper/published_recall_at_1.csv")

DATASETS = config["datasets"]
MODELS = config["models"]


wildcard_constraints:
    dataset="|".join(map(re.escape, DATASETS)) or "^$",
    model="|".join(map(re.escape, MODELS)) or "^$",
    feature="|".join(FEATURES),


def model_datasets(model):
    """Datasets a model runs on: its `datasets:` list, or all of them."""
    names = MODELS[model].get("datasets", list(DATASETS))
    unknown = [d for d in names if d not in DATASETS]
    if unknown:
        raise WorkflowError(f"config: models.{model}.datasets names unknown datasets {unknown}")
    return names


def pairs():
    """(dataset, model) pairs to extract, in config order."""
    return [(d, m) for m in MODELS for d in model_datasets(m)]


def metric_targets():
    return [
        f"results/metrics/{d}/{m}/{f}.json"
        for d, m in pairs()
        for f in features_for(MODELS[m]["protocol"])
    ]


def all_targets():
    return [
        "results/tables/table5.csv",
        "results/tables/table5.md",
        "results/tables/all_metrics.csv",
        *[f"results/plots/recall_at_k_{d}.png" for d in DATASETS],
    ]


def synthetic_dir(dataset):
    return f"resources/synthetic/{dataset}"


def ingest_inputs(wildcards):
    """Archive files of a dataset: the config's paths, or the synthetic rule's outputs."""
    cfg = DATASETS[wildcards.dataset]
    if "synthetic" in cfg:
        root = synthetic_dir(wildcards.dataset)
        if cfg["format"] == "cub":
            return {"archive": f"{root}/CUB_200_2011.tgz"}
        return {"images_archive": f"{root}/car_ims.tgz", "annotations": f"{root}/cars_annos.mat"}
    if cfg["format"] == "cub":
        return {"archive": cfg["archive"]}
    return {"images_archive": cfg["images_archive"], "annotations": cfg["annotations"]}


def checkpoint_for(wildcards):
    """Weights file of a model on a dataset: the config's file, or the pretraining output."""
    cfg = MODELS[wildcards.model]
    if "pretrain" in cfg:
        return f"results/checkpoints/{wildcards.dataset}/{wildcards.model}.pth"
    return cfg["checkpoint"]
