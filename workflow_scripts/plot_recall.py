"""Recall@K curves of one dataset → results/plots/recall_at_k_{dataset}.png."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir)))  # noqa: F821
from _common import rule_logging

from cfga.outputs.plots import recall_plot
from cfga.outputs.tables import read_cells

sm = snakemake  # noqa: F821
with rule_logging(sm):
    recall_plot(read_cells(sm.input.metrics), sm.output[0], f"Recall@K on {sm.wildcards.dataset}")
