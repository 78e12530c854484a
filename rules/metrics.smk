# One table cell: Recall@{1,2,4,8,16,32} and MAP@R of one feature.


rule compute_metrics:
    input:
        features="results/features/{dataset}/{model}.npz",
    output:
        metrics="results/metrics/{dataset}/{model}/{feature}.json",
    params:
        device=config["metrics"]["device"],
    log:
        "logs/metrics/{dataset}/{model}/{feature}.log",
    script:
        "../workflow_scripts/compute_metrics.py"
