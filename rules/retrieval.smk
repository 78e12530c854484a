# Retrieval you can see: galleries of a few test queries per (dataset, model, feature), one
# side-by-side figure per dataset, and CFGA heatmaps of the same queries per (dataset, model).
#
# Queries: cfga.outputs.retrieval.choose_queries over the features file's query rows (round robin
# over the classes); neighbours: exact top-k of its gallery rows by the raw dot product of the
# stored features, ties in manifest order, the query excluded when it is a gallery row. Roles:
# the manifest's is_query / is_gallery (cfga.data.manifest.feature_roles, as the metrics read
# them; leave-one-out datasets: every row both). Config: `retrieval:` (defaults in the schema).

import re as _re

from cfga.workflow.fingerprint import scripts_fingerprint

# Rerun triggers: the cfga code each script runs, followed through its imports
# (cfga.workflow.fingerprint); the heatmaps also follow extraction's.
_RSCRIPTS = os.path.join(workflow.basedir, "workflow_scripts")
RETRIEVAL_CODE = scripts_fingerprint(
    [os.path.join(_RSCRIPTS, s) for s in ("retrieval_gallery.py", "retrieval_compare.py")]
)
HEATMAP_CODE = scripts_fingerprint(
    [os.path.join(_RSCRIPTS, "heatmaps.py")], extra={"extraction": EXTRACTION_PARAMS["code"]}
)


def _gallery_rule(model):
    """One job per (dataset, model): every gallery feature of the model (a rule per model, since
    the features it writes depend on its protocol)."""
    feats = layout.gallery_features(RETRIEVAL, MODELS[model]["protocol"], MODELS[model]["arch"])
    if not feats:
        return
    base = f"results/retrieval/{{dataset}}/{model}"

    rule:
        name:
            "retrieval_gallery_" + _re.sub(r"\W", "_", model)
        input:
            features=f"results/features/{{dataset}}/{model}.npz",
            manifest="results/manifests/{dataset}.csv",
            root="results/datasets/{dataset}",
        output:
            **{f"csv_{f}": report(f"{base}/{f}.csv", category="Retrieval", subcategory="{dataset}",
                                  caption="../report/retrieval_csv.rst",
                                  labels={"model": model, "feature": FEATURES[f].column, "shows": "neighbours (CSV)"})
               for f in feats},
            **{f"png_{f}": report(f"{base}/{f}.png", category="Retrieval", subcategory="{dataset}",
                                  caption="../report/gallery.rst",
                                  labels={"model": model, "feature": FEATURES[f].column, "shows": "gallery"})
               for f in feats},
        wildcard_constraints:
            dataset=name_pattern(model_datasets(model)),
        params:
            model=model,
            features=feats,
            queries=RETRIEVAL["queries"],
            k=RETRIEVAL["k"],
            code=RETRIEVAL_CODE,
        log:
            f"logs/retrieval/{{dataset}}/{model}.log",
        benchmark:
            f"results/benchmarks/retrieval/{{dataset}}/{model}.tsv"
        script:
            "../workflow_scripts/retrieval_gallery.py"


for _m in MODELS:
    _gallery_rule(_m)


def _compare_features(wildcards):
    return layout.features_path(wildcards.dataset, layout.compare_model(DATASETS, MODELS, RETRIEVAL, wildcards.dataset))


rule retrieval_compare:
    input:
        features=_compare_features,
        manifest="results/manifests/{dataset}.csv",
        root="results/datasets/{dataset}",
    output:
        report("results/retrieval/{dataset}/compare.png", category="Retrieval", subcategory="{dataset}",
               caption="../report/compare.rst",
               labels=lambda wc: {"model": layout.compare_model(DATASETS, MODELS, RETRIEVAL, wc.dataset),
                                  "feature": " vs ".join(FEATURES[f].column for f in RETRIEVAL["compare"]),
                                  "shows": "side by side"}),
    params:
        model=lambda wc: layout.compare_model(DATASETS, MODELS, RETRIEVAL, wc.dataset),
        features=RETRIEVAL["compare"],
        queries=RETRIEVAL["queries"],
        k=RETRIEVAL["k"],
        code=RETRIEVAL_CODE,
    log:
        "logs/retrieval/{dataset}/compare.log",
    benchmark:
        "results/benchmarks/retrieval/{dataset}/compare.tsv"
    script:
        "../workflow_scripts/retrieval_compare.py"


# The queries' images through each model once more (one forward + backward each), for the CFGA
# maps of the CFGA+ layers from that same pass (cfga.extraction.maps). One job per dataset for all
# its models: the imports (torch, torchvision) cost more CPU than one model's eight images.
def _heatmap_rule(dataset):
    models = [m for d, m in pairs() if d == dataset]
    if not models:
        return

    rule:
        name:
            "heatmaps_" + _re.sub(r"\W", "_", dataset)
        input:
            manifest=f"results/manifests/{dataset}.csv",
            root=f"results/datasets/{dataset}",
            checkpoints=[checkpoint_path(dataset, m) for m in models],
        output:
            [report(f"results/heatmaps/{dataset}/{m}.png", category="Heatmaps", subcategory=dataset,
                    caption="../report/heatmaps.rst", labels={"model": m, "shows": "CFGA maps"}) for m in models],
        params:
            dataset=dataset,
            models={m: {k: MODELS[m].get(k) for k in ("arch", "protocol", "allow_pickle", "format")} for m in models},
            device=config["extraction"]["device"],
            queries=RETRIEVAL["queries"],
            code=HEATMAP_CODE,
        log:
            f"logs/heatmaps/{dataset}.log",
        benchmark:
            f"results/benchmarks/heatmaps/{dataset}.tsv"
        resources:
            gpu=1,
        script:
            "../workflow_scripts/heatmaps.py"


for _d in DATASETS:
    _heatmap_rule(_d)
