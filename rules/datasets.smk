# Raw archives → manifest + extracted images. Synthetic datasets are first written as archives
# in the real formats, so both go through the same ingestion.


rule synthesize_cub:
    output:
        archive="resources/synthetic/{dataset}/CUB_200_2011.tgz",
    params:
        cfg=lambda wc: DATASETS[wc.dataset],
    log:
        "logs/synthesize/{dataset}.log",
    script:
        "../workflow_scripts/synthesize_dataset.py"


rule synthesize_cars:
    output:
        images_archive="resources/synthetic/{dataset}/car_ims.tgz",
        annotations="resources/synthetic/{dataset}/cars_annos.mat",
    params:
        cfg=lambda wc: DATASETS[wc.dataset],
    log:
        "logs/synthesize/{dataset}.log",
    script:
        "../workflow_scripts/synthesize_dataset.py"


rule ingest_dataset:
    input:
        unpack(ingest_inputs),
    output:
        manifest="results/manifests/{dataset}.csv",
        root=directory("results/datasets/{dataset}"),
    params:
        # without `metrics:` (the K of Recall@K): changing them reruns the cells, not the ingestion
        cfg=lambda wc: {k: v for k, v in DATASETS[wc.dataset].items() if k != "metrics"},
    log:
        "logs/ingest/{dataset}.log",
    benchmark:
        "results/benchmarks/ingest/{dataset}.tsv"
    script:
        "../workflow_scripts/ingest_dataset.py"
