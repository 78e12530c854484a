"""The feature registry (cfga.registry.features): names, dimensions, protocols, table columns."""
import pytest

from cfga.registry.features import (
    FEATURES,
    PROTOCOL_FEATURES,
    TABLE5_COLUMNS,
    features_for,
)


def test_feature_registry_is_consistent():
    assert features_for("scda") == PROTOCOL_FEATURES["scda"]
    assert set(TABLE5_COLUMNS) <= set(FEATURES)
    assert FEATURES["cfga_plus"].dim == FEATURES["cfga_4_1_2"].dim + FEATURES["cfga_4_2_2"].dim
    assert [FEATURES[f].dim for f in ("cfga_4_1_1", "cfga_4_1_2", "cfga_4_1_3")] == [2048, 512, 512]
    with pytest.raises(ValueError, match="unknown protocol"):
        features_for("nope")
