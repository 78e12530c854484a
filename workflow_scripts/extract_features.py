"""Features of every test image of one dataset for one model → results/features/{dataset}/{model}.npz."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir)))  # noqa: F821
from _common import rule_logging

import torch

from cfga import extract_features, load_model
from cfga.datasets import read_manifest
from cfga.featurestore import provenance, save_features

sm = snakemake  # noqa: F821
with rule_logging(sm) as log:
    torch.set_num_threads(sm.threads)
    ex = sm.params.extraction
    rows = [r for r in read_manifest(sm.input.manifest) if r.split == "test"]
    root = Path(sm.input.root)
    model = load_model(sm.params.arch, sm.params.protocol, sm.input.checkpoint,
                       device=ex.get("device", "auto"), allow_pickle=sm.params.allow_pickle,
                       format=sm.params.format)
    device = str(next(model.parameters()).device)
    log.info("%s / %s: %d test images on %s", sm.wildcards.dataset, sm.wildcards.model, len(rows), device)
    feats = extract_features(model, [root / r.path for r in rows], sm.params.protocol,
                             batch_size=ex.get("batch_size"), num_workers=ex.get("num_workers"),
                             progress=True, desc=f"{sm.wildcards.dataset}/{sm.wildcards.model}")
    meta = provenance(checkpoint=sm.input.checkpoint, manifest=sm.input.manifest, device=device,
                      extra={"arch": sm.params.arch, "protocol": sm.params.protocol})
    save_features(sm.output.features, feats, [r.label for r in rows], [r.path for r in rows], meta)
