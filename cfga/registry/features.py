"""The one place that names every feature: its key, dimension and paper column.

Rules, tables, metrics and tests all read this registry; nothing else spells a feature name.
``Feature.dim`` is for the ResNet-50/101/152 trunks (2048 channels out of ``layer4``; method.md §1.3,
§5.2); Transformer dimensions depend on the arch (method.md §T5, §6): ask ``feature_dim``
with the arch.
"""
from __future__ import annotations

from dataclasses import dataclass

from cfga.registry.archs import arch_info, check_protocol

# Width of the DML embedding heads (ms, proxy_anchor; method.md §1.2).
EMBED_DIM = 512


@dataclass(frozen=True)
class Feature:
    """One stored feature.

    name:    key in the features ``.npz`` and in ``results/metrics/{dataset}/{model}/{name}.json``.
    dim:     length of one row.
    column:  the paper's column header (Tables 3, 5, 6).
    authors_file: the JSON file the authors' scripts write it to (method.md §1.3), for provenance.
    """

    name: str
    dim: int | None  # None: depends on the arch (Transformer features; see feature_dim)
    column: str
    authors_file: str


# (block, conv) of the six CFGA weights, in the order the authors emit them (method.md §5.4).
CFGA_LAYERS: tuple[tuple[int, int], ...] = ((1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3))


def cfga_name(block: int, conv: int) -> str:
    """Feature key of ``layer4.{block}.conv{conv}.weight``, e.g. ``cfga_4_1_2``."""
    return f"cfga_4_{block}_{conv}"


def _cfga_dim(conv: int) -> int:
    # Input channels of the conv: 2048 for conv1, 512 for conv2/conv3 (method.md §5.2 table).
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

# The four CFGA linears of a Transformer block (method.md §T5), in named_parameters order.
TRANSFORMER_LAYERS: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")


def block_labels(family: str, layers: int | None = None) -> tuple[str, str]:
    """Labels of the two CFGA blocks in feature names: ("4_0", "4_1") for Swin (stage 4's two
    blocks), (str(L-2), str(L-1)) for a ViT of L encoder layers (method.md §T6)."""
    if family == "swin":
        return ("4_0", "4_1")
    if family == "vit":
        return (str(layers - 2), str(layers - 1))
    raise ValueError(f"family {family!r} is not a Transformer")


def transformer_blocks(arch: str) -> tuple[str, str]:
    """``block_labels`` of a Transformer arch."""
    a = arch_info(arch)
    return block_labels(a.family, a.layers)


def transformer_cfga_name(block: str, layer: str) -> str:
    return f"cfga_{block}_{layer}"


def _transformer_features() -> list[Feature]:
    from cfga.registry.archs import ARCH_INFO

    labels = sorted({b for a in ARCH_INFO.values() if a.family != "resnet" for b in transformer_blocks(a.name)},
                    key=lambda b: [int(x) for x in b.split("_")])
    out = [Feature(transformer_cfga_name(b, l), None, f"CFGA {b.replace('_', '-')} {l}", "")
           for b in labels for l in TRANSFORMER_LAYERS]
    out.append(Feature("class_token", None, "Class token", ""))
    return out


FEATURES.update((f.name, f) for f in _transformer_features())

CFGA_FEATURES: tuple[str, ...] = tuple(cfga_name(b, c) for b, c in CFGA_LAYERS)

# The layers CFGA+ concatenates, in its order (layer4.1.conv2, layer4.2.conv2; method.md §5.5).
CFGA_PLUS_LAYERS: tuple[str, ...] = (cfga_name(1, 2), cfga_name(2, 2))

# Features each protocol produces, in storage order (method.md §1.3, §5.5).
PROTOCOL_FEATURES: dict[str, tuple[str, ...]] = {
    "scda": ("pooling", "scda", "scda_original", *CFGA_FEATURES, "cfga_plus"),
    "ms": ("embedding", "scda", "scda_original", *CFGA_FEATURES, "cfga_plus"),
    "proxy_anchor": ("embedding", *CFGA_FEATURES, "cfga_plus"),
    "dgpcrl": ("embedding", "scda", "scda_original", *CFGA_FEATURES, "cfga_plus"),
}

# Where a protocol's feature differs from FEATURES' dimension: DGPCRL's embedding is Pooling.
_PROTOCOL_DIMS: dict[tuple[str, str], int] = {("dgpcrl", "embedding"): 4096}

# Table 5 columns, in the paper's order (method.md §1.3).
TABLE5_COLUMNS: tuple[str, ...] = ("pooling", "scda", "cfga_plus", *CFGA_FEATURES)

RECALL_KS: tuple[int, ...] = (1, 2, 4, 8, 16, 32)


def _is_transformer(arch: str | None) -> bool:
    return arch is not None and arch_info(arch).family != "resnet"


def feature_dim(name: str, protocol: str | None = None, arch: str | None = None) -> int:
    """Row length of feature ``name`` under ``protocol`` for ``arch`` (None: a ResNet-50/101/152)."""
    if not _is_transformer(arch):
        return _PROTOCOL_DIMS.get((protocol, name), FEATURES[name].dim)
    if name not in features_for(protocol or "scda_224", arch):
        raise ValueError(f"{arch} under protocol {protocol} has no feature {name!r}")
    return transformer_feature_dim(name, arch_info(arch).channels)


def transformer_feature_dim(name: str, C: int) -> int:
    """Row length of a Transformer feature for a token map of C channels (method.md §T3, §5)."""
    if name == "embedding":
        return EMBED_DIM
    if name == "class_token":
        return C
    if name in ("pooling", "scda", "scda_original", "cfga_plus"):
        return 2 * C
    return 4 * C if name.endswith("_fc2") else C  # a linear's input width (method.md §T5)


def transformer_cfga_features(arch: str) -> tuple[str, ...]:
    """The eight CFGA features of a Transformer arch: block b0 then b1, qkv, proj, fc1, fc2 each."""
    return cfga_names_of_blocks(transformer_blocks(arch))


def cfga_names_of_blocks(blocks: tuple[str, str]) -> tuple[str, ...]:
    return tuple(transformer_cfga_name(b, l) for b in blocks for l in TRANSFORMER_LAYERS)


def transformer_features(protocol: str, family: str, layers: int | None = None) -> tuple[str, ...]:
    """Features of a Transformer of ``family`` (ViT: with ``layers`` encoder layers) under
    ``protocol``, in storage order (method.md §T6)."""
    cfga = (*cfga_names_of_blocks(block_labels(family, layers)), "cfga_plus")
    if protocol == "ms":
        return ("embedding", "scda", "scda_original", *cfga)
    return ("pooling", "scda", "scda_original", *(("class_token",) if family == "vit" else ()), *cfga)


def cfga_plus_parts(arch: str | None = None) -> tuple[str, str]:
    """The two features CFGA+ concatenates: conv2 of layer4.1 and layer4.2 (ResNet), the qkv of
    both CFGA blocks (Transformer; method.md §T6)."""
    if not _is_transformer(arch):
        return cfga_name(1, 2), cfga_name(2, 2)
    return transformer_cfga_plus(transformer_blocks(arch))


def transformer_cfga_plus(blocks: tuple[str, str]) -> tuple[str, str]:
    """CFGA+ of a Transformer: the attention input projections (qkv) of both CFGA blocks."""
    return tuple(transformer_cfga_name(b, "qkv") for b in blocks)


def features_for(protocol: str, arch: str | None = None) -> tuple[str, ...]:
    """Feature names ``protocol`` produces on ``arch`` (None: a ResNet); raises ``ValueError``
    naming the known protocols, or the protocols that fit the arch."""
    if arch is not None:
        check_protocol(arch, protocol)
    if not _is_transformer(arch):
        try:
            return PROTOCOL_FEATURES[protocol]
        except KeyError:
            raise ValueError(
                f"unknown protocol {protocol!r}; known: {', '.join(sorted(PROTOCOL_FEATURES))}"
                + (" (scda_224 is for Swin and ViT backbones)" if protocol == "scda_224" else "")
            ) from None
    return transformer_features(protocol, arch_info(arch).family, arch_info(arch).layers)
