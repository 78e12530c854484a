# cfga: raw archives → manifests → features → Recall@K / MAP@R → paper tables.
# Thin on purpose: config + validation and target lists live in rules/common.smk.

from snakemake.utils import min_version

min_version("9.0")

# The embedded default, unless a config was given (`--configfile configs/paper.yaml`): merging
# the two would add the synthetic datasets to a real run.
if not config.get("datasets"):

    configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/datasets.smk"
include: "rules/models.smk"
include: "rules/train.smk"
include: "rules/features.smk"
include: "rules/metrics.smk"
include: "rules/tables.smk"
include: "rules/retrieval.smk"


report: "report/workflow.rst"


rule all:
    input:
        all_targets(),
    default_target: True
