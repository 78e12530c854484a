"""Write a synthetic dataset as archives in the real CUB / Cars formats."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir)))  # noqa: F821
from _common import rule_logging

from cfga.data.synthetic import synthesize

with rule_logging(snakemake) as log:  # noqa: F821
    out_dir = Path(snakemake.output[0]).parent  # noqa: F821
    cfg = {"format": snakemake.params.format, "synthetic": snakemake.params.synthetic}  # noqa: F821
    written = synthesize(cfg, out_dir)
    log.info("wrote %s", written)
