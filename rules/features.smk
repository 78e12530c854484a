# One (dataset, model) extraction: every feature of the model's protocol for the test split.
#
# extraction_shards = 1 (default): one job, `extract_features`. N > 1 (config `extraction_shards`,
# or `datasets.<name>.extraction_shards`): N jobs `extract_features_shard` (temporary shard files
# results/features/{dataset}/shards/{model}.{i}-of-{N}.npz), joined by `gather_features` into the
# same results/features/{dataset}/{model}.npz, byte for byte (cfga.extraction.store.shard_plan).
#
# Rerun triggers besides Snakemake's defaults (input mtime, params, the script's mtime): the
# params `code` = a fingerprint of the cfga code the features depend on, so an edit that changes
# that code re-extracts, and one that only touches comments, docstrings or layout does not.

from cfga.workflow.fingerprint import extraction_fingerprint
from cfga.workflow.resources import inherit_resources

_SCRIPTS = os.path.join(workflow.basedir, "workflow_scripts")

# The params of every rule that writes a (dataset, model) feature file or a shard of one: what
# the script reads, and the rerun triggers (extraction settings, code fingerprint of the cfga
# modules the scripts import, cfga.workflow.fingerprint).
EXTRACTION_PARAMS = dict(
    arch=lambda wc: MODELS[wc.model]["arch"],
    protocol=lambda wc: MODELS[wc.model]["protocol"],
    allow_pickle=lambda wc: MODELS[wc.model]["allow_pickle"],
    format=lambda wc: MODELS[wc.model].get("format"),
    extraction=config["extraction"],
    code=extraction_fingerprint(
        [os.path.join(_SCRIPTS, s) for s in ("extract_features.py", "gather_features.py")]
    ),
)


rule extract_features:
    input:
        manifest="results/manifests/{dataset}.csv",
        root="results/datasets/{dataset}",
        checkpoint=checkpoint_for,
    output:
        features="results/features/{dataset}/{model}.npz",
    wildcard_constraints:
        dataset=name_pattern([d for d in DATASETS if d not in SHARDED]),
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
        dataset=name_pattern(SHARDED),
    params:
        **EXTRACTION_PARAMS,
    log:
        "logs/features/{dataset}/{model}.log",
    script:
        "../workflow_scripts/gather_features.py"


# A shard job gets extract_features' threads and resources (profiles' set-threads and
# set-resources name extract_features), except those set for extract_features_shard itself.
inherit_resources(workflow, "extract_features", "extract_features_shard")

