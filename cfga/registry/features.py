"""The one place that names every feature: its key, dimension and paper column.

Rules, tables, metrics and tests all read this registry; nothing else spells a feature name.
Dimensions are for the ResNet-50/101/152 trunks (2048 channels out of ``layer4``; SPEC §1.3, §5.2).
"""
from __future__ import annotations

from dataclasses import dataclass

# Width of the DML embedding heads (ms, proxy_anchor; SPEC §1.2).
EMBED_DIM = 512


@dataclass(frozen=True)
class Feature:
    """One stored feature.

    name:    key in the features ``.npz`` and in ``results/metrics/{dataset}/{model}/{name}.json``.
    dim:     length of one row.
    column:  the paper's column header (Tables 3, 5, 6).
    authors_file: the JSON file the authors' scripts write it to (SPEC §1.3), for provenance.
    """

    name: str
    dim: int
    column: str
    authors_file: str


# (block, conv) of the six CFGA weights, in the order the authors emit them (SPEC §5.4).
CFGA_LAYERS: tuple[tuple[int, int], ...] = ((1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3))


def cfga_name(block: int, conv: int) -> str:
    """Feature key of ``layer4.{block}.conv{conv}.weight``, e.g. ``cfga_4_1_2``."""
    return f"cfga_4_{block}_{conv}"


def _cfga_dim(conv: int) -> int:
    # Input channels of the conv: 2048 for conv1, 512 for conv2/conv3 (SPEC §5.2 table).
    return 2048 if conv == 1 else 512


FEATURES: dict[str, Feature] = {
    f.name: f
    for f in [
        Feature("pooling", 4096, "Pooling", "embedding_max_avg.json"),
        Feature("scda", 4096, "SCDA", "scda_max_avg_norm.json"),
        Feature("scda_original", 4096, "SCDA original", "scda_norm_max_avg.json"),
        *[
            Feature(cfga_name(b, c), _cfga_dim(c), f"CFGA 4-{b}-{c}", f"layer4_{b}_conv{c}_weight.json")
            for b, c in CFGA_LAYERS
        ],
        Feature("cfga_plus", 1024, "CFGA+", "layer4_conv2_weight.json"),
        # The DML protocols' own embedding: 512-d for ms/proxy_anchor, 4096 for dgpcrl (feature_dim).
        Feature("embedding", EMBED_DIM, "embedding", "embedding_max_avg.json"),
    ]
}

CFGA_FEATURES: tuple[str, ...] = tuple(cfga_name(b, c) for b, c in CFGA_LAYERS)

# The layers CFGA+ concatenates, in its order (layer4.1.conv2, layer4.2.conv2; SPEC §5.5).
CFGA_PLUS_LAYERS: tuple[str, ...] = (cfga_name(1, 2), cfga_name(2, 2))

# Features each protocol produces, in storage order (SPEC §1.3, §5.5).
PROTOCOL_FEATURES: dict[str, tuple[str, ...]] = {
    "scda": ("pooling", "scda", "scda_original", *CFGA_FEATURES, "cfga_plus"),
    "ms": ("embedding", "scda", "scda_original", *CFGA_FEATURES, "cfga_plus"),
    "proxy_anchor": ("embedding", *CFGA_FEATURES, "cfga_plus"),
    "dgpcrl": ("embedding", "scda", "scda_original", *CFGA_FEATURES, "cfga_plus"),
}

# Where a protocol's feature differs from FEATURES' dimension: DGPCRL's embedding is Pooling.
_PROTOCOL_DIMS: dict[tuple[str, str], int] = {("dgpcrl", "embedding"): 4096}

# Table 5 columns, in the paper's order (SPEC §1.3).
TABLE5_COLUMNS: tuple[str, ...] = ("pooling", "scda", "cfga_plus", *CFGA_FEATURES)

RECALL_KS: tuple[int, ...] = (1, 2, 4, 8, 16, 32)


def feature_dim(name: str, protocol: str | None = None) -> int:
    """Row length of feature ``name`` under ``protocol`` (ResNet-50/101/152 trunks)."""
    return _PROTOCOL_DIMS.get((protocol, name), FEATURES[name].dim)


def features_for(protocol: str) -> tuple[str, ...]:
    """Feature names ``protocol`` produces; raises ``ValueError`` naming the known protocols."""
    try:
        return PROTOCOL_FEATURES[protocol]
    except KeyError:
        raise ValueError(
            f"unknown protocol {protocol!r}; known: {', '.join(sorted(PROTOCOL_FEATURES))}"
        ) from None
