"""Write a synthetic dataset as archives in the real CUB / Cars formats."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir)))  # noqa: F821
from _common import rule_logging

from cfga.data.synthetic import synthesize

with rule_logging(snakemake) as log:  # noqa: F821
    out_dir = Path(snakemake.output[0]).parent  # noqa: F821
    written = synthesize(snakemake.params.cfg, out_dir)  # noqa: F821
    log.info("wrote %s", written)
