"""Galleries of one (dataset, model): per feature, results/retrieval/{dataset}/{model}/{feature}.csv and .png."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir)))  # noqa: F821
from _common import rule_logging

from cfga.data.manifest import read_manifest
from cfga.extraction.store import load_features
from cfga.outputs.gallery import gallery_figure
from cfga.outputs.retrieval import choose_queries, gallery_k, gallery_neighbours, write_retrieval_csv
from cfga.registry.features import FEATURES

sm = snakemake  # noqa: F821
with rule_logging(sm) as log:
    feats, labels, paths, _meta = load_features(sm.input.features)
    names = {r.label: r.class_name for r in read_manifest(sm.input.manifest)}
    queries = choose_queries(labels, sm.params.queries)
    k = gallery_k(sm.params.k, len(labels))
    log.info("queries (feature-file rows): %s", queries)
    for f in sm.params.features:
        ns = gallery_neighbours(feats[f], labels, queries, k)
        write_retrieval_csv(sm.output[f"csv_{f}"], paths, queries, ns)
        gallery_figure(sm.input.root, paths, labels, names, queries, ns, sm.output[f"png_{f}"],
                       f"{sm.wildcards.dataset} / {sm.params.model} / {FEATURES[f].column}: top-{k} "
                       "by dot product (blue: query; green: same class; red: other class)")
