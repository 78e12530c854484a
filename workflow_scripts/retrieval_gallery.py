"""Galleries of one (dataset, model): per feature, results/retrieval/{dataset}/{model}/{feature}.csv and .png.

Queries chosen among the query rows, ranked against the gallery rows (the manifest's roles)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir)))  # noqa: F821
from _common import rule_logging

from cfga.data.manifest import feature_roles, read_manifest
from cfga.extraction.store import load_features
from cfga.outputs.gallery import gallery_figure
from cfga.outputs.retrieval import choose_queries, gallery_k, gallery_neighbours, write_retrieval_csv
from cfga.registry.features import FEATURES

sm = snakemake  # noqa: F821
with rule_logging(sm) as log:
    feats, labels, paths, _meta = load_features(sm.input.features)
    manifest = read_manifest(sm.input.manifest)
    names = {r.label: r.class_name for r in manifest}
    is_query, is_gallery = feature_roles(sm.input.manifest, paths, sm.input.features, rows=manifest)
    queries = choose_queries(labels, sm.params.queries, is_query)
    k = gallery_k(sm.params.k, queries, is_gallery)
    log.info("queries (feature-file rows): %s", queries)
    for f in sm.params.features:
        ns = gallery_neighbours(feats[f], labels, queries, k, is_gallery)
        write_retrieval_csv(sm.output[f"csv_{f}"], paths, queries, ns)
        gallery_figure(sm.input.root, paths, labels, names, queries, ns, sm.output[f"png_{f}"],
                       f"{sm.wildcards.dataset} / {sm.params.model} / {FEATURES[f].column}: top-{k} "
                       "by dot product (blue: query; green: same class; red: other class)")
