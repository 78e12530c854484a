# Aggregated outputs a person looks at: paper-layout tables, the long table, recall@K plots.
#
# The tables depend on the code make_tables.py imports (params `code`: cfga.outputs.tables, the
# feature and loss registries, cfga.files; cfga.workflow.fingerprint), make_tables.py (script
# mtime), the published values (input) and the few dataset and model keys they show (params,
# cfga.outputs.tables.table_config): a change to any of them reruns the tables alone.

from cfga.outputs.tables import table_config
from cfga.workflow.fingerprint import tables_fingerprint

_TABLE_DATASETS, _TABLE_MODELS = table_config(DATASETS, MODELS)


rule tables:
    input:
        metrics=metric_targets(),
        published=published_table(),
    output:
        **{
            f"{t}_{ext}": report(f"results/tables/{t}.{ext}", category="Tables", caption=f"../report/{t}.rst")
            for t in TABLE_NAMES
            for ext in ("csv", "md")
        },
        long=report("results/tables/all_metrics.csv", category="Tables", caption="../report/all_metrics.rst"),
    params:
        datasets=_TABLE_DATASETS,
        models=_TABLE_MODELS,
        tables=TABLE_NAMES,
        code=tables_fingerprint([os.path.join(workflow.basedir, "workflow_scripts", "make_tables.py")]),
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


rule recall_at_1_plot:
    input:
        metrics=lambda wc: [t for t in metric_targets() if t.startswith(f"results/metrics/{wc.dataset}/")],
        published=published_table(),
    output:
        report("results/plots/recall_at_1_{dataset}.png", category="Plots", caption="../report/recall_at_1.rst"),
    params:
        datasets=DATASETS,
        models=MODELS,
    log:
        "logs/plots/recall_at_1_{dataset}.log",
    script:
        "../workflow_scripts/plot_recall_at_1.py"
