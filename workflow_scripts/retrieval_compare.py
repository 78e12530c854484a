"""Two features side by side on the same queries → results/retrieval/{dataset}/compare.png."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir)))  # noqa: F821
from _common import rule_logging

from cfga.data.manifest import feature_roles, read_manifest
from cfga.extraction.store import load_features
from cfga.outputs.gallery import compare_figure
from cfga.outputs.retrieval import choose_queries, gallery_k, gallery_neighbours
from cfga.registry.features import FEATURES

sm = snakemake  # noqa: F821
with rule_logging(sm):
    feats, labels, paths, _meta = load_features(sm.input.features)
    manifest = read_manifest(sm.input.manifest)
    names = {r.label: r.class_name for r in manifest}
    is_query, is_gallery = feature_roles(sm.input.manifest, paths, sm.input.features, rows=manifest)
    queries = choose_queries(labels, sm.params.queries, is_query)
    k = gallery_k(sm.params.k, queries, is_gallery)
    groups = [(f"{FEATURES[f].column}: top-{k}", gallery_neighbours(feats[f], labels, queries, k, is_gallery))
              for f in sm.params.features]
    a, b = (FEATURES[f].column for f in sm.params.features)
    compare_figure(sm.input.root, paths, labels, names, queries, groups, sm.output[0],
                   f"{sm.wildcards.dataset} / {sm.params.model}: {a} (left) vs {b} (right), same queries "
                   "(green: same class; red: other class)")
