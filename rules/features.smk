# One (dataset, model) extraction: every feature of the model's protocol for the test split.
#
# extraction_shards = 1 (default): one job, `extract_features`. N > 1 (config `extraction_shards`,
# or `datasets.<name>.extraction_shards`): N jobs `extract_features_shard` (temporary shard files
# results/features/{dataset}/shards/{model}.{i}-of-{N}.npz), joined by `gather_features` into the
# same results/features/{dataset}/{model}.npz, byte for byte (cfga.extraction.store.shard_plan).
#
# Rerun triggers besides Snakemake's defaults (input mtime, params, the script's mtime): the
# params `code` = a fingerprint of the cfga code the features depend on (code_digest), so an edit
# that changes that code re-extracts, and one that only touches comments, docstrings or layout
# does not.

import ast
import fcntl
import hashlib
import json
import sys
from pathlib import Path

import cfga as _cfga
from cfga.registry.archs import ARCH_INFO, FAMILY_PROTOCOLS
from cfga.registry.features import CFGA_LAYERS, PROTOCOL_FEATURES, feature_dim, features_for

# The package the workflow imported (beside the Snakefile, else the installed one).
CFGA_DIR = Path(_cfga.__file__).resolve().parent


def _strip_docstrings(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def code_digest(modules, extra=None):
    """sha256 of the code of cfga modules (names relative to cfga/), plus JSON-able ``extra``.

    The code is each module's syntax tree without docstrings: comments, docstrings and
    formatting do not count, any change to what runs does.
    """
    h = hashlib.sha256()
    for name in modules:
        tree = _strip_docstrings(ast.parse((CFGA_DIR / name).read_text(encoding="utf-8"), filename=name))
        h.update(f"{name}\0{ast.dump(tree, include_attributes=False)}\0".encode())
    if extra is not None:
        h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()


# What a feature file depends on besides its inputs and params: the extraction code, the feature
# file writer, and of cfga/features.py only what extraction reads (feature names and dimensions
# per protocol, the CFGA layers), so that renaming a table column does not re-extract.
# Not included: cfga/datasets.py (the manifest itself is an input), _malloc.py (memory only),
# __init__.py (version string).
EXTRACTION_CODE = (
    "extraction/pipeline.py", "extraction/loaders.py", "extraction/preprocess.py", "extraction/store.py",
    "numerics/gradients.py", "numerics/aggregation.py", "numerics/mask.py", "numerics/pooling.py",
    "numerics/scalar.py", "registry/protocols.py", "backbones/resnet.py", "backbones/heads.py",
    "checkpoints/formats.py", "checkpoints/load.py", "files.py", "runtime.py",
    # the Transformer path (TRANSFORMERS.md)
    "extraction/transformer.py", "backbones/__init__.py", "backbones/capture.py", "backbones/swin.py",
    "backbones/vit.py", "checkpoints/transformer.py", "registry/archs.py",
)
EXTRACTION_DIGEST = code_digest(
    EXTRACTION_CODE,
    extra={
        "cfga_layers": CFGA_LAYERS,
        "features": {p: [[f, feature_dim(f, p)] for f in fs] for p, fs in PROTOCOL_FEATURES.items()},
        "transformer_features": {
            a.name: {p: [[f, feature_dim(f, p, a.name)] for f in features_for(p, a.name)]
                     for p in FAMILY_PROTOCOLS[a.family]}
            for a in ARCH_INFO.values() if a.family != "resnet"
        },
    },
)


# The params of every rule that writes a (dataset, model) feature file or a shard of one: what
# the script reads, and the rerun triggers (extraction settings, code fingerprint).
EXTRACTION_PARAMS = dict(
    arch=lambda wc: MODELS[wc.model]["arch"],
    protocol=lambda wc: MODELS[wc.model]["protocol"],
    allow_pickle=lambda wc: MODELS[wc.model].get("allow_pickle", False),
    format=lambda wc: MODELS[wc.model].get("format"),
    extraction=config["extraction"],
    code=EXTRACTION_DIGEST,
)


def _dataset_pattern(names):
    return "|".join(map(re.escape, names)) or "^$"


SHARDED = [d for d, n in SHARDS.items() if n > 1]


def shard_files(wildcards):
    n = SHARDS[wildcards.dataset]
    return [f"results/features/{wildcards.dataset}/shards/{wildcards.model}.{i}-of-{n}.npz" for i in range(n)]


rule extract_features:
    input:
        manifest="results/manifests/{dataset}.csv",
        root="results/datasets/{dataset}",
        checkpoint=checkpoint_for,
    output:
        features="results/features/{dataset}/{model}.npz",
    wildcard_constraints:
        dataset=_dataset_pattern([d for d in DATASETS if d not in SHARDED]),
    params:
        **EXTRACTION_PARAMS,
    log:
        "logs/features/{dataset}/{model}.log",
    benchmark:
        "results/benchmarks/features/{dataset}/{model}.tsv"
    resources:
        gpu=1,
    script:
        "../workflow_scripts/extract_features.py"


# One shard: the rows shard_plan deals to shard {shard} of {nshards} (whole batches of the
# unsharded run, in manifest order). Same inputs, params, script and resources as above.
rule extract_features_shard:
    input:
        manifest="results/manifests/{dataset}.csv",
        root="results/datasets/{dataset}",
        checkpoint=checkpoint_for,
    output:
        features=temp("results/features/{dataset}/shards/{model}.{shard}-of-{nshards}.npz"),
    wildcard_constraints:
        shard="[0-9]+",
        nshards="[0-9]+",
    params:
        **EXTRACTION_PARAMS,
    log:
        "logs/features/{dataset}/shards/{model}.{shard}-of-{nshards}.log",
    benchmark:
        "results/benchmarks/features/{dataset}/shards/{model}.{shard}-of-{nshards}.tsv"
    resources:
        gpu=1,
    script:
        "../workflow_scripts/extract_features.py"


# The shards, rows back in manifest order, checked against the manifest. Same triggers as
# extract_features (checkpoint input, params), so whatever re-extracts re-gathers, which
# re-runs the (deleted, temporary) shards.
rule gather_features:
    input:
        shards=shard_files,
        manifest="results/manifests/{dataset}.csv",
        checkpoint=checkpoint_for,
    output:
        features="results/features/{dataset}/{model}.npz",
    wildcard_constraints:
        dataset=_dataset_pattern(SHARDED),
    params:
        **EXTRACTION_PARAMS,
    log:
        "logs/features/{dataset}/{model}.log",
    script:
        "../workflow_scripts/gather_features.py"


def _shards_like_extraction():
    """A shard job gets extract_features' threads and resources (profiles' set-threads and
    set-resources name extract_features), except those set for extract_features_shard itself.
    Same threads matter: on CPU the float results depend on torch's thread count."""
    rs = workflow.resource_settings
    own = set(rs.overwrite_resources.get("extract_features_shard", {}))
    if "extract_features_shard" in rs.overwrite_threads:
        own.add("_cores")
    src = workflow.get_rule("extract_features").resources
    dst = workflow.get_rule("extract_features_shard").resources
    for name, value in src.items():
        if name not in own:
            dst[name] = value


_shards_like_extraction()


# --------------------------------------------------------------------------------------------
# A run killed with SIGKILL (or a power loss) leaves Snakemake's locks behind, and the next run
# would refuse to start until `snakemake --unlock`. Every main Snakemake process of this workflow
# holds a shared flock on .snakemake/cfga-run.flock while it lives (the kernel drops it when the
# process dies, however it dies); one that can take the lock exclusively knows no other run of
# this workflow is alive in this directory, so the locks left are stale and it removes them.
# Where flock does not work (some network file systems), nothing is removed.
_RUN_FLOCK = []


def _release_stale_locks():
    if not workflow.is_main_process:
        return
    state = Path(".snakemake")
    try:
        state.mkdir(exist_ok=True)
        fh = open(state / "cfga-run.flock", "a")
    except OSError:
        return
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # another run is alive: its locks are real
        else:
            stale = sorted((state / "locks").glob("*.lock"))
            for f in stale:
                f.unlink(missing_ok=True)
            if stale:
                print(f"cfga: removed {len(stale)} stale lock(s) of a killed run in {state.resolve()}",
                      file=sys.stderr)
        fcntl.flock(fh, fcntl.LOCK_SH)
    except OSError:
        fh.close()
        return
    _RUN_FLOCK.append(fh)  # held until this process exits


_release_stale_locks()
