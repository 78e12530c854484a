"""Two features side by side on the same queries → results/retrieval/{dataset}/compare.png."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir)))  # noqa: F821
from _common import rule_logging

from cfga.outputs.gallery import compare_figure
from cfga.outputs.retrieval import gallery_inputs, gallery_neighbours
from cfga.registry.features import FEATURES

sm = snakemake  # noqa: F821
with rule_logging(sm):
    g = gallery_inputs(sm.input.features, sm.input.manifest, sm.params.queries, sm.params.k)
    groups = [(f"{FEATURES[f].column}: top-{g.k}",
               gallery_neighbours(g.feats[f], g.labels, g.queries, g.k, g.is_gallery))
              for f in sm.params.features]
    a, b = (FEATURES[f].column for f in sm.params.features)
    compare_figure(sm.input.root, g.paths, g.labels, g.names, g.queries, groups, sm.output[0],
                   f"{sm.wildcards.dataset} / {sm.params.model}: {a} (left) vs {b} (right), same queries "
                   "(green: same class; red: other class)")
