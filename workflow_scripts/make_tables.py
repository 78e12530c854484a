"""All metrics JSON → Table 5 (csv, md) and the long all_metrics.csv."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir)))  # noqa: F821
from _common import rule_logging

from cfga import io
from cfga.tables import load_published, long_rows, read_cells, table5

sm = snakemake  # noqa: F821
with rule_logging(sm) as log:
    cells = read_cells(sm.input.metrics)
    published = load_published(sm.input.published)
    header, rows, md = table5(cells, sm.params.datasets, sm.params.models, published)
    io.write_csv(sm.output.table5_csv, header, rows)
    io.write_text(sm.output.table5_md, md)
    io.write_csv(sm.output.long, *long_rows(cells))
    log.info("%d cells, %d table rows", len(cells), len(rows))
