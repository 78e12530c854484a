# Aggregated outputs a person looks at: paper-layout tables, the long table, recall@K plots.
#
# The tables' layout is cfga/tables.py, the columns of cfga/features.py and the writers of
# cfga/io.py (params `code`, see code_digest in features.smk), make_tables.py (script mtime),
# the published values (input) and the datasets' and models' config (params): a change to any of
# them reruns the tables alone.


rule tables:
    input:
        metrics=metric_targets(),
        published=config["tables"]["published"],
    output:
        **{
            f"{t}_{ext}": report(f"results/tables/{t}.{ext}", category="Tables", caption=f"../report/{t}.rst")
            for t in TABLE_NAMES
            for ext in ("csv", "md")
        },
        long=report("results/tables/all_metrics.csv", category="Tables", caption="../report/all_metrics.rst"),
    params:
        datasets=DATASETS,
        models=MODELS,
        tables=TABLE_NAMES,
        code=code_digest(("outputs/tables.py", "registry/features.py", "registry/archs.py", "files.py")),
    log:
        "logs/tables/tables.log",
    script:
        "../workflow_scripts/make_tables.py"


rule recall_plot:
    input:
        metrics=lambda wc: [t for t in metric_targets() if t.startswith(f"results/metrics/{wc.dataset}/")],
    output:
        report("results/plots/recall_at_k_{dataset}.png", category="Plots", caption="../report/recall_plot.rst"),
    log:
        "logs/plots/{dataset}.log",
    script:
        "../workflow_scripts/plot_recall.py"
