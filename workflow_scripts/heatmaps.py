"""CFGA heatmaps of the gallery queries of one dataset, every model → results/heatmaps/{dataset}/{model}.png."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir)))  # noqa: F821
import torch
from _common import rule_logging

from cfga import load_model
from cfga.data.manifest import evaluation_roles, evaluation_rows, read_manifest
from cfga.extraction.maps import cfga_heatmaps
from cfga.outputs.heatmaps import heatmap_figure
from cfga.outputs.retrieval import choose_queries

sm = snakemake  # noqa: F821
with rule_logging(sm) as log:
    torch.set_num_threads(sm.threads)
    manifest = read_manifest(sm.input.manifest)
    rows = evaluation_rows(manifest)  # the feature files' rows: the galleries' queries are among them
    queries = choose_queries([r.label for r in rows], sm.params.queries, evaluation_roles(manifest)[0])
    images = [Path(sm.input.root) / rows[i].path for i in queries]
    for (name, m), ckpt, out in zip(sm.params.models.items(), sm.input.checkpoints, sm.output):
        model = load_model(m["arch"], m["protocol"], ckpt, device=sm.params.device,
                           allow_pickle=bool(m["allow_pickle"]), format=m["format"])
        log.info("%s: %d queries %s on %s", name, len(queries), queries, next(model.parameters()).device)
        items = cfga_heatmaps(model, images, m["protocol"])
        heatmap_figure(items, [f"label {rows[i].label}" for i in queries], out,
                       f"{sm.params.dataset} / {name}: CFGA maps of the CFGA+ layers")
        del model, items
