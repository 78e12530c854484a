# One (dataset, model) extraction: every feature of the model's protocol for the test split.


rule extract_features:
    input:
        manifest="results/manifests/{dataset}.csv",
        root="results/datasets/{dataset}",
        checkpoint=checkpoint_for,
    output:
        features="results/features/{dataset}/{model}.npz",
    params:
        arch=lambda wc: MODELS[wc.model]["arch"],
        protocol=lambda wc: MODELS[wc.model]["protocol"],
        allow_pickle=lambda wc: MODELS[wc.model].get("allow_pickle", False),
        format=lambda wc: MODELS[wc.model].get("format"),
        extraction=config["extraction"],
    log:
        "logs/features/{dataset}/{model}.log",
    benchmark:
        "results/benchmarks/features/{dataset}/{model}.tsv"
    resources:
        gpu=1,
    script:
        "../workflow_scripts/extract_features.py"
