# DML fine-tuning with pytorch-metric-learning; the checkpoint is written in the authors' format
# for its loss (method.md §1.2), so it is evaluated through the very loader their files use.


rule train_dml:
    input:
        manifest="results/manifests/{dataset}.csv",
        root="results/datasets/{dataset}",
        backbone=backbone_for,
    output:
        checkpoint="results/checkpoints/trained/{dataset}/{model}.pth",
        settings="results/checkpoints/trained/{dataset}/{model}.json",
    params:
        arch=lambda wc: MODELS[wc.model]["arch"],
        train=lambda wc: MODELS[wc.model]["train"],
        device=config["extraction"]["device"],
    log:
        "logs/train/{dataset}/{model}.log",
    benchmark:
        "results/benchmarks/train/{dataset}/{model}.tsv"
    resources:
        gpu=1,
    script:
        "../workflow_scripts/train_dml.py"
