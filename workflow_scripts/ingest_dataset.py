"""Archive(s) → manifest CSV + extracted images (md5 verified first when configured)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir)))  # noqa: F821
from _common import rule_logging

from cfga.data.formats import ingest_dataset

with rule_logging(snakemake) as log:  # noqa: F821
    cfg = {**snakemake.params.settings, **dict(snakemake.input.items())}  # noqa: F821
    ingest_dataset(cfg, snakemake.output.manifest, snakemake.output.root)  # noqa: F821
    log.info("manifest %s", snakemake.output.manifest)  # noqa: F821
