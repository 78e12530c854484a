"""One table cell: Recall@K and MAP@R of one feature → results/metrics/{dataset}/{model}/{feature}.json.

Queries against the gallery as the manifest's is_query / is_gallery roles say (leave-one-out
when every image is both); K from the dataset's metrics.ks or its format's default."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir)))  # noqa: F821
from _common import rule_logging

from cfga.data.manifest import feature_roles
from cfga.extraction.store import load_features
from cfga.files import write_json
from cfga.outputs.cells import metrics_record

sm = snakemake  # noqa: F821
with rule_logging(sm) as log:
    name = sm.wildcards.feature
    feats, labels, paths, meta = load_features(sm.input.features, names=[name])
    if name not in feats:
        raise KeyError(f"{sm.input.features} has no feature {name!r}; rerun its extraction")
    is_query, is_gallery = feature_roles(sm.input.manifest, paths, sm.input.features)
    rec = metrics_record(feats[name], labels, dataset=sm.wildcards.dataset, model=sm.wildcards.model,
                         feature=name, provenance=meta, device=sm.params.device,
                         is_query=is_query, is_gallery=is_gallery,
                         ks=tuple(sm.params.ks))
    log.info("%s", rec)
    write_json(sm.output.metrics, rec)
