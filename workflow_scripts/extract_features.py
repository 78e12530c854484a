"""Features of every evaluated image (query or gallery) of one dataset for one model →
results/features/{dataset}/{model}.npz, rows streamed to disk as they are computed.

As a shard job (wildcards ``shard``, ``nshards``) it extracts the rows ``cfga.extraction.store.shard_plan``
gives shard ``shard`` of ``nshards`` and writes them, with their row indices, to a shard file.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir)))  # noqa: F821
import torch
from _common import rule_logging

from cfga import extract_features, load_model
from cfga.data.manifest import evaluation_rows, read_manifest
from cfga.extraction.preprocess import output_size, peek_size
from cfga.extraction.store import FeatureWriter, provenance, shard_plan
from cfga.registry.protocols import get_protocol

sm = snakemake  # noqa: F821
with rule_logging(sm) as log:
    # The same bits from the same batches: on CPU the float results depend on the thread count
    # (shard jobs get extract_features' threads; rules/features.smk), on CUDA on cuDNN's algorithm.
    torch.set_num_threads(sm.threads)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    ex = sm.params.extraction
    rows = evaluation_rows(read_manifest(sm.input.manifest))
    root = Path(sm.input.root)
    take = None
    if "shard" in sm.wildcards.keys():
        shard, nshards = int(sm.wildcards.shard), int(sm.wildcards.nshards)
        if not 0 <= shard < nshards:
            raise ValueError(f"shard {shard} of {nshards}: shards are numbered 0 … {nshards - 1}")
        resize = get_protocol(sm.params.protocol).resize
        sizes = [output_size(*peek_size(root / r.path), resize) for r in rows]
        take = shard_plan(sizes, ex["batch_size"], nshards)[shard]
        log.info("shard %d of %d: %d of %d test images", shard, nshards, len(take), len(rows))
        rows = [rows[i] for i in take]
    model = load_model(sm.params.arch, sm.params.protocol, sm.input.checkpoint,
                       device=ex.get("device", "auto"), allow_pickle=sm.params.allow_pickle,
                       format=sm.params.format)
    device = str(next(model.parameters()).device)
    log.info("%s / %s: %d test images on %s, %d threads", sm.wildcards.dataset, sm.wildcards.model, len(rows),
             device, torch.get_num_threads())
    meta = provenance(checkpoint=sm.input.checkpoint, manifest=sm.input.manifest, device=device,
                      extra={"arch": sm.params.arch, "protocol": sm.params.protocol})
    with FeatureWriter(sm.output.features, len(rows)) as out:
        extract_features(model, [root / r.path for r in rows], sm.params.protocol,
                         batch_size=ex.get("batch_size"), num_workers=ex.get("num_workers"),
                         progress=True, desc=f"{sm.wildcards.dataset}/{sm.wildcards.model}", sink=out)
        out.finish([r.label for r in rows], [r.path for r in rows], meta, rows=take)
