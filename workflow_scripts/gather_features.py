"""Shard files of one (dataset, model) extraction → results/features/{dataset}/{model}.npz, the bytes
one unsharded job writes (rows back in manifest order; checks in cfga.extraction.store.gather_shards)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir)))  # noqa: F821
from _common import rule_logging

from cfga.data.manifest import evaluation_rows, read_manifest
from cfga.extraction.store import gather_shards

sm = snakemake  # noqa: F821
with rule_logging(sm) as log:
    expected = [r.path for r in evaluation_rows(read_manifest(sm.input.manifest))]
    n = gather_shards(list(sm.input.shards), sm.output.features, expected_paths=expected)
    log.info("%s / %s: %d rows from %d shards", sm.wildcards.dataset, sm.wildcards.model, n, len(sm.input.shards))
