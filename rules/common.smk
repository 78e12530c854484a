# Config validation, target lists, and what each rule reads of the config. Everything the rules
# need to know about datasets, models and features comes from here (facts from cfga.registry).

import os
import re
import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from cfga.registry.archs import check_protocol
from cfga.registry.datasets import dataset_ks, get_format
from cfga.registry.features import FEATURES, features_for
from cfga.registry.losses import LOSSES
from cfga.workflow.locks import guard_run
from cfga.workflow import layout

# The schema is the only source of defaults: validate fills them in. Nothing below writes to
# `config`; what is derived from it is read through the functions here.
validate(config, "../schemas/config.schema.yaml")

DATASETS = config["datasets"]
MODELS = config["models"]

# Which protocols fit which backbone family (cfga.registry.archs): a misfit stops here, at once.
for _name, _m in MODELS.items():
    try:
        check_protocol(_m["arch"], _m["protocol"])
    except ValueError as _err:
        raise WorkflowError(f"config: models.{_name}: {_err}") from None


def published_table():
    """`tables.published`; a relative path that is not in the working directory (a run with
    --directory elsewhere) is the repository's file."""
    path = config["tables"]["published"]
    if not os.path.isabs(path) and not os.path.exists(path):
        shipped = os.path.join(workflow.basedir, path)
        if os.path.exists(shipped):
            return shipped
    return path


def shards(dataset):
    """Extraction jobs per (dataset, model): `datasets.<name>.extraction_shards`, else the global
    `extraction_shards` (1: one job, no shard files)."""
    return DATASETS[dataset].get("extraction_shards", config["extraction_shards"])


SHARDED = [d for d in DATASETS if shards(d) > 1]


def name_pattern(names):
    return "|".join(map(re.escape, names)) or "^$"


def shard_files(wildcards):
    n = shards(wildcards.dataset)
    return [f"results/features/{wildcards.dataset}/shards/{wildcards.model}.{i}-of-{n}.npz" for i in range(n)]

wildcard_constraints:
    dataset=name_pattern(DATASETS),
    model=name_pattern(MODELS),
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


RETRIEVAL = config["retrieval"]
for _key in ("features", "compare"):
    _unknown = [f for f in RETRIEVAL[_key] if f not in FEATURES]
    if _unknown:
        raise WorkflowError(f"config: retrieval.{_key} names unknown features {_unknown}; known: {', '.join(FEATURES)}")


def gallery_targets():
    """Per (dataset, model): a CSV and a PNG per retrieval feature the model's protocol has; per
    dataset the side-by-side figure; per (dataset, model) the heatmaps."""
    out = []
    for d, m in pairs():
        for f in layout.gallery_features(RETRIEVAL, MODELS[m]["protocol"], MODELS[m]["arch"]):
            out += [f"results/retrieval/{d}/{m}/{f}.csv", f"results/retrieval/{d}/{m}/{f}.png"]
        out.append(f"results/heatmaps/{d}/{m}.png")
    for d in DATASETS:
        if layout.compare_model(DATASETS, MODELS, RETRIEVAL, d):
            out.append(f"results/retrieval/{d}/compare.png")
    return out


def all_targets():
    return [
        *[f"results/tables/{t}.{ext}" for t in TABLE_NAMES for ext in ("csv", "md")],
        "results/tables/all_metrics.csv",
        *[f"results/plots/recall_at_k_{d}.png" for d in DATASETS],
        *[f"results/plots/recall_at_1_{d}.png" for d in DATASETS],
        *gallery_targets(),
    ]


def synthetic_dir(dataset):
    return f"resources/synthetic/{dataset}"


def synthetic_file(fmt, key):
    """Where the synthesize rule writes file `key` of format `fmt` (the published file name)."""
    return f"resources/synthetic/{{dataset}}/{get_format(fmt).files[key]}"


def ingest_inputs(wildcards):
    """Files of a dataset's format: the config's paths, or the synthetic rule's outputs."""
    cfg = DATASETS[wildcards.dataset]
    files = get_format(cfg["format"]).files
    if "synthetic" in cfg:
        return {key: f"{synthetic_dir(wildcards.dataset)}/{name}" for key, name in files.items()}
    return {key: cfg[key] for key in files}


def synthetic_settings(wildcards):
    return DATASETS[wildcards.dataset]["synthetic"]


def ingest_settings(wildcards):
    """What ingestion reads of a dataset's config besides its files: the format, md5s and (class
    folders) the split."""
    cfg = DATASETS[wildcards.dataset]
    return {k: cfg[k] for k in ("format", "md5", "split") if k in cfg}


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
        want = LOSSES[train["loss"]].protocol
        if cfg["protocol"] != want:
            raise WorkflowError(
                f"config: models.{name}: a {train['loss']} checkpoint is evaluated with protocol {want}, "
                f"not {cfg['protocol']}"
            )
        missing = set(model_datasets(name)) - set(model_datasets(src))
        if missing:
            raise WorkflowError(f"config: models.{name} runs on {sorted(missing)}, where its backbone {src} does not")


_check_models()


def _check_datasets():
    for name, cfg in DATASETS.items():
        try:
            dataset_ks(cfg, name)
        except ValueError as err:
            raise WorkflowError(str(err)) from None


_check_datasets()


def checkpoint_path(dataset, model):
    """Weights file of a model on a dataset: the config's file, or what the pipeline trains."""
    return layout.checkpoint_path(MODELS, dataset, model)


def checkpoint_for(wildcards):
    return checkpoint_path(wildcards.dataset, wildcards.model)


def backbone_for(wildcards):
    """The checkpoint a trained model starts from (its `train.from` model, same dataset)."""
    return checkpoint_path(wildcards.dataset, MODELS[wildcards.model]["train"]["from"])


# A run killed with SIGKILL (or a power loss) leaves Snakemake's locks behind. They are removed
# here only when they provably belong to dead runs of this host (cfga.workflow.locks); otherwise
# Snakemake's own lock check stops a run that needs the locked files, and `snakemake --unlock`
# is the user's call.
if workflow.is_main_process:
    _locks = guard_run(".snakemake")
    if _locks is not None and _locks.message:
        print(_locks.message, file=sys.stderr)
