"""All metrics JSON → Tables 3, 5, 6 (csv, md) and the long all_metrics.csv."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir)))  # noqa: F821
from _common import rule_logging

from cfga import files
from cfga.outputs.tables import load_published, long_rows, paper_table, read_cells

sm = snakemake  # noqa: F821
with rule_logging(sm) as log:
    cells = read_cells(sm.input.metrics)
    published = load_published(sm.input.published)
    for name in sm.params.tables:
        header, rows, md = paper_table(name, cells, sm.params.datasets, sm.params.models, published)
        files.write_csv(sm.output[f"{name}_csv"], header, rows)
        files.write_text(sm.output[f"{name}_md"], md)
        log.info("%s: %d rows", name, len(rows))
    files.write_csv(sm.output.long, *long_rows(cells))
