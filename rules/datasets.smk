# Raw archives → manifest + extracted images. Synthetic datasets are first written as archives
# in the real formats (file names: cfga.registry.datasets), so both go through the same ingestion.
# Each rule's params are only what its script reads, so no other config key reruns it.


rule synthesize_cub:
    output:
        archive=synthetic_file("cub", "archive"),
    params:
        format="cub",
        synthetic=synthetic_settings,
    log:
        "logs/synthesize/{dataset}.log",
    script:
        "../workflow_scripts/synthesize_dataset.py"


rule synthesize_cars:
    output:
        images_archive=synthetic_file("cars", "images_archive"),
        annotations=synthetic_file("cars", "annotations"),
    params:
        format="cars",
        synthetic=synthetic_settings,
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
        settings=ingest_settings,
    log:
        "logs/ingest/{dataset}.log",
    benchmark:
        "results/benchmarks/ingest/{dataset}.tsv"
    script:
        "../workflow_scripts/ingest_dataset.py"
