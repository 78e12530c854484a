# One table cell: Recall@K (K: the dataset's metrics.ks, else its format's; cfga.registry.datasets)
# and MAP@R of one feature, queries against the gallery as the manifest's roles say.


rule compute_metrics:
    input:
        features="results/features/{dataset}/{model}.npz",
        manifest="results/manifests/{dataset}.csv",
    output:
        metrics="results/metrics/{dataset}/{model}/{feature}.json",
    params:
        device=config["metrics"]["device"],
        ks=lambda wc: list(dataset_ks(DATASETS[wc.dataset], wc.dataset)),
    log:
        "logs/metrics/{dataset}/{model}/{feature}.log",
    script:
        "../workflow_scripts/compute_metrics.py"
