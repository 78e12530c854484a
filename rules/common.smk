# Config validation and target lists. Everything the rules need to know about datasets,
# models and features comes from here (features from cfga.registry.features).

import os
import re

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from cfga.registry.archs import check_protocol
from cfga.registry.features import FEATURES, features_for

validate(config, "../schemas/config.schema.yaml")
config.setdefault("extraction", {})
config["extraction"].setdefault("device", "auto")
config["extraction"].setdefault("batch_size", 8)
config.setdefault("metrics", {}).setdefault("device", "cpu")
config.setdefault("tables", {}).setdefault("published", "paper/published_recall_at_1.csv")
# A relative `published` path that is not in the working directory (a run with --directory
# elsewhere) is the repository's file.
if not os.path.isabs(config["tables"]["published"]) and not os.path.exists(config["tables"]["published"]):
    _shipped = os.path.join(workflow.basedir, config["tables"]["published"])
    if os.path.exists(_shipped):
        config["tables"]["published"] = _shipped

DATASETS = config["datasets"]
MODELS = config["models"]

# Which protocols fit which backbone family (cfga.registry.archs): a misfit stops here, at once.
for _name, _m in MODELS.items():
    try:
        check_protocol(_m["arch"], _m["protocol"])
    except ValueError as _err:
        raise WorkflowError(f"config: models.{_name}: {_err}") from None

# Extraction shards per dataset: `datasets.<name>.extraction_shards`, else the global
# `extraction_shards` (default 1: one job per (dataset, model), no shard files). Taken out of the
# dataset's config, so that sharding never changes the params of synthesis, ingestion or tables.
SHARDS = {
    name: cfg.pop("extraction_shards", config.get("extraction_shards", 1)) for name, cfg in DATASETS.items()
}


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
        for f in features_for(MODELS[m]["protocol"], MODELS[m]["arch"])
    ]


TABLE_NAMES = ("table3", "table5", "table6", "transformers")


def all_targets():
    return [
        *[f"results/tables/{t}.{ext}" for t in TABLE_NAMES for ext in ("csv", "md")],
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


# Protocol a DML loss is evaluated with (the head it trains is the head that protocol reads).
LOSS_PROTOCOL = {"ms": "ms", "cosface": "ms", "arcface": "ms", "proxy_anchor": "proxy_anchor"}


def _check_models():
    for name, cfg in MODELS.items():
        model_datasets(name)
        train = cfg.get("train")
        if train is None:
            continue
        src = train["from"]
        if src not in MODELS:
            raise WorkflowError(f"config: models.{name}.train.from names unknown model {src!r}")
        if MODELS[src]["arch"] != cfg["arch"]:
            raise WorkflowError(f"config: models.{name} (arch {cfg['arch']}) trains from {src} (arch {MODELS[src]['arch']})")
        want = LOSS_PROTOCOL[train["loss"]]
        if cfg["protocol"] != want:
            raise WorkflowError(
                f"config: models.{name}: a {train['loss']} checkpoint is evaluated with protocol {want}, "
                f"not {cfg['protocol']}"
            )
        missing = set(model_datasets(name)) - set(model_datasets(src))
        if missing:
            raise WorkflowError(f"config: models.{name} runs on {sorted(missing)}, where its backbone {src} does not")


_check_models()


def checkpoint_path(dataset, model):
    """Weights file of a model on a dataset: the config's file, or what the pipeline trains."""
    cfg = MODELS[model]
    if "pretrain" in cfg:
        return f"results/checkpoints/pretrained/{dataset}/{model}.pth"
    if "train" in cfg:
        return f"results/checkpoints/trained/{dataset}/{model}.pth"
    return cfg["checkpoint"]


def checkpoint_for(wildcards):
    return checkpoint_path(wildcards.dataset, wildcards.model)


def backbone_for(wildcards):
    """The checkpoint a trained model starts from (its `train.from` model, same dataset)."""
    return checkpoint_path(wildcards.dataset, MODELS[wildcards.model]["train"]["from"])
