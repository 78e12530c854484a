"""One table cell: Recall@K and MAP@R of one feature → results/metrics/{dataset}/{model}/{feature}.json."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir)))  # noqa: F821
from _common import rule_logging

from cfga.extraction.store import load_features
from cfga.files import write_json
from cfga.outputs.cells import metrics_record

sm = snakemake  # noqa: F821
with rule_logging(sm) as log:
    feats, labels, _paths, meta = load_features(sm.input.features)
    name = sm.wildcards.feature
    if name not in feats:
        raise KeyError(f"{sm.input.features} has no feature {name!r} (has: {', '.join(sorted(feats))})")
    rec = metrics_record(feats[name], labels, dataset=sm.wildcards.dataset, model=sm.wildcards.model,
                         feature=name, provenance=meta, device=sm.params.device)
    log.info("%s", rec)
    write_json(sm.output.metrics, rec)
