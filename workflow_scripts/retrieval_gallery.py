"""Galleries of one (dataset, model): per feature, results/retrieval/{dataset}/{model}/{feature}.csv and .png.

Queries chosen among the query rows, ranked against the gallery rows (the manifest's roles)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir)))  # noqa: F821
from _common import rule_logging

from cfga.outputs.gallery import gallery_figure
from cfga.outputs.retrieval import gallery_inputs, gallery_neighbours, write_retrieval_csv
from cfga.registry.features import FEATURES

sm = snakemake  # noqa: F821
with rule_logging(sm) as log:
    g = gallery_inputs(sm.input.features, sm.input.manifest, sm.params.queries, sm.params.k)
    log.info("queries (feature-file rows): %s", g.queries)
    for f in sm.params.features:
        ns = gallery_neighbours(g.feats[f], g.labels, g.queries, g.k, g.is_gallery)
        write_retrieval_csv(sm.output[f"csv_{f}"], g.paths, g.queries, ns)
        gallery_figure(sm.input.root, g.paths, g.labels, g.names, g.queries, ns, sm.output[f"png_{f}"],
                       f"{sm.wildcards.dataset} / {sm.params.model} / {FEATURES[f].column}: top-{g.k} "
                       "by dot product (blue: query; green: same class; red: other class)")
