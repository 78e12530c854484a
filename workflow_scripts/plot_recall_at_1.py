"""Recall@1 bars of one dataset → results/plots/recall_at_1_{dataset}.png (published values marked)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir)))  # noqa: F821
from _common import rule_logging

from cfga.outputs.plots import recall_at_1_plot
from cfga.outputs.tables import load_published, published_value, read_cells

sm = snakemake  # noqa: F821
with rule_logging(sm):
    cells = read_cells(sm.input.metrics)
    pub = load_published(sm.input.published)
    dcfg = sm.params.datasets[sm.wildcards.dataset]
    marks = {(c["model"], c["feature"]): v for c in cells
             if (v := published_value(pub, dcfg, sm.params.models[c["model"]], c["feature"])) is not None}
    recall_at_1_plot(cells, sm.output[0], f"Recall@1 on {sm.wildcards.dataset}", marks)
