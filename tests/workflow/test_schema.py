"""The config schema: the only source of defaults, each dataset format's own keys, enums = registries.

What the schema accepts the code accepts, and what the code would reject at run time the schema
rejects first, naming the key.
"""
import copy
import re
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from cfga.data.archives import DatasetError
from cfga.data.formats import ingest_dataset
from cfga.registry.datasets import FORMATS
from cfga.registry.losses import LOSSES
from cfga.registry.protocols import PROTOCOLS

REPO = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO / "schemas" / "config.schema.yaml"
SCHEMA = yaml.safe_load(SCHEMA_PATH.read_text())
MD5 = "0123456789abcdef0123456789abcdef"
MODELS = {"m": {"arch": "resnet50", "protocol": "scda", "checkpoint": "m.pth"}}


def check(cfg):
    validate(cfg, str(SCHEMA_PATH))
    return cfg


def real(fmt, **extra):
    """A real dataset of format ``fmt``: a path for each of its files (cfga.registry.datasets)."""
    return {"format": fmt, **{k: f"raw/{name}" for k, name in FORMATS[fmt].files.items()}, **extra}


def config(**datasets):
    return {"datasets": datasets, "models": copy.deepcopy(MODELS)}


def rejected(cfg, key):
    with pytest.raises(Exception, match=key) as err:
        check(cfg)
    return str(err.value)


def code_rejects_md5(cfg, tmp_path) -> bool:
    """Does ingestion refuse the dataset config for its md5 (before looking for the files)?"""
    try:
        ingest_dataset(cfg, tmp_path / "m.csv", tmp_path / "root")
    except DatasetError as err:
        return "md5" in str(err)
    raise AssertionError("ingestion accepted missing files")


# --------------------------------------------------------------------------------------------
# defaults: the schema fills them, nothing else does


def test_validate_fills_every_default():
    cfg = check({"datasets": {"d": {"format": "cub", "synthetic": {"classes": 4, "images_per_class": 4}}},
                 "models": {"m": {"arch": "resnet50", "protocol": "scda", "pretrain": {}},
                            "t": {"arch": "resnet50", "protocol": "ms", "train": {"loss": "ms", "from": "m"}}}})
    assert cfg["extraction_shards"] == 1
    assert cfg["extraction"] == {"device": "auto", "batch_size": 8}
    assert cfg["metrics"] == {"device": "cpu"}
    assert cfg["tables"] == {"published": "paper/published_recall_at_1.csv"}
    assert cfg["datasets"]["d"]["synthetic"]["seed"] == 0
    assert cfg["models"]["m"]["allow_pickle"] is False
    assert cfg["models"]["m"]["pretrain"] == {"epochs": 8, "image_size": 96, "batch_size": 32, "lr": 0.002, "seed": 0}
    assert cfg["models"]["t"]["train"]["epochs"] == 3 and cfg["models"]["t"]["train"]["trainable"] == "all"
    # a branch that does not apply fills nothing
    assert set(cfg["datasets"]["d"]) == {"format", "synthetic"}


def test_rules_do_not_set_defaults_or_write_the_config():
    for smk in [REPO / "Snakefile", *(REPO / "rules").glob("*.smk")]:
        text = smk.read_text()
        assert ".setdefault(" not in text and ".pop(" not in text, smk
        assert not re.search(r"config(\[[^]]+\])+\s*=[^=]", text), smk


# --------------------------------------------------------------------------------------------
# each format's keys


@pytest.mark.parametrize("name", ["config.yaml", "configs/paper.yaml"])
def test_shipped_configs_validate(name):
    check(yaml.safe_load((REPO / name).read_text()))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_a_real_dataset_needs_exactly_its_formats_files(fmt):
    check(config(d=real(fmt)))
    for key in FORMATS[fmt].files:
        cfg = config(d=real(fmt))
        del cfg["datasets"]["d"][key]
        rejected(cfg, key)
    for other in FORMATS:
        for key in set(FORMATS[other].files) - set(FORMATS[fmt].files):
            rejected(config(d=real(fmt, **{key: "raw/x"})), key)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_a_synthetic_dataset_has_no_files(fmt):
    syn = {"classes": 4, "images_per_class": 4}
    if not FORMATS[fmt].synthetic:  # no offline writer for this format
        rejected(config(d={"format": fmt, "synthetic": syn}), fmt)
        return
    check(config(d={"format": fmt, "synthetic": syn}))
    for key in FORMATS[fmt].files:
        rejected(config(d={"format": fmt, "synthetic": syn, key: "raw/x"}), key)


# md5 per format: (format, md5 value, schema accepts)
MD5_CASES = [
    ("cub", MD5, True),
    ("cub", {"archive": MD5}, False),
    ("cub", "not-an-md5", False),
    ("cars", {"images_archive": MD5, "annotations": MD5}, True),
    ("cars", {"annotations": MD5}, True),
    ("cars", {}, True),
    ("cars", MD5, False),
    ("cars", {"archive": MD5}, False),
    ("cars", {"images_archive": "short"}, False),
    ("sop", MD5, True),
    ("sop", {"archive": MD5}, False),
    ("inshop", {"images_archive": MD5, "partition": MD5}, True),
    ("inshop", {"partition": MD5}, True),
    ("inshop", MD5, False),
    ("csv", {"table": MD5}, True),
    ("csv", {"root": MD5}, False),
    ("csv", MD5, False),
    ("folder", MD5, False),
    ("folder", {"root": MD5}, False),
]


@pytest.mark.parametrize("fmt,md5,ok", MD5_CASES)
def test_md5_per_format_schema_and_code_agree(fmt, md5, ok, tmp_path):
    cfg = config(d=real(fmt, md5=md5))
    if ok:
        check(cfg)
    else:
        msg = rejected(cfg, "md5")
        assert "['datasets']['d']['md5']" in msg  # the key's path in the config
    if isinstance(md5, str) and md5 != MD5 or isinstance(md5, dict) and any(v != MD5 for v in md5.values()):
        return  # a malformed digest: the code fails it only against a file's real md5
    assert code_rejects_md5(real(fmt, md5=md5), tmp_path) == (not ok)


def test_md5_for_cub_names_the_key_in_the_message():
    msg = rejected(config(d=real("cub", md5={"archive": MD5})), "md5")
    assert "is not of type 'string'" in msg


# --------------------------------------------------------------------------------------------
# enums are the registries


def enum(*path):
    node = SCHEMA
    for p in path:
        node = node[p]
    return node["enum"]


MODEL = ("properties", "models", "additionalProperties", "properties")
DATASET = ("properties", "datasets", "additionalProperties", "properties")


def test_schema_enums_are_the_registries():
    from cfga.outputs.tables import FAMILIES
    from cfga.registry.archs import ARCH_INFO

    assert set(enum(*MODEL, "train", "properties", "loss")) == set(LOSSES)
    assert set(enum(*MODEL, "protocol")) == set(PROTOCOLS)
    assert set(enum(*MODEL, "family")) == set(FAMILIES)
    assert set(enum(*MODEL, "arch")) == set(ARCH_INFO)
    assert set(enum(*DATASET, "format")) == set(FORMATS)


# --------------------------------------------------------------------------------------------
# a model's weights: exactly one of checkpoint, pretrain, train


@pytest.mark.parametrize("model,key", [
    ({"arch": "resnet50", "protocol": "scda"}, "checkpoint"),
    ({"arch": "resnet50", "protocol": "scda", "checkpoint": "m.pth", "pretrain": {}}, "pretrain"),
    ({"arch": "resnet50", "protocol": "ms", "checkpoint": "m.pth", "train": {"loss": "ms", "from": "m"}}, "train"),
    ({"arch": "resnet50", "protocol": "ms", "pretrain": {}, "train": {"loss": "ms", "from": "m"}}, "train"),
])
def test_one_source_of_weights_named_in_the_error(model, key):
    cfg = {"datasets": {"d": real("cub")}, "models": {**copy.deepcopy(MODELS), "x": model}}
    rejected(cfg, key)


def test_each_source_of_weights_alone_is_accepted():
    check({"datasets": {"d": real("cub")},
           "models": {"m": {"arch": "resnet50", "protocol": "scda", "checkpoint": "m.pth"},
                      "p": {"arch": "resnet50", "protocol": "scda", "pretrain": {}},
                      "t": {"arch": "resnet50", "protocol": "ms", "train": {"loss": "ms", "from": "p"}}}})
