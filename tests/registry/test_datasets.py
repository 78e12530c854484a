"""Dataset formats (cfga.registry.datasets): the synthetic writer uses the published file names."""
import pytest

from cfga.registry.datasets import FORMATS, file_keys, get_format
from cfga.registry.features import RECALL_KS


@pytest.mark.parametrize("fmt", sorted(f for f, d in FORMATS.items() if d.synthetic))
def test_synthetic_archives_carry_the_registry_names(fmt, tmp_path):
    from cfga.data.synthetic import synthesize

    out = synthesize({"format": fmt, "synthetic": {"classes": 4, "images_per_class": 2, "seed": 0}}, tmp_path)
    assert {k: v.split("/")[-1] for k, v in out.items() if k != "format"} == FORMATS[fmt].files
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FORMATS[fmt].files.values())


def test_format_lookup():
    assert file_keys("cars") == ("images_archive", "annotations")
    assert get_format("cub").md5 == "single"
    with pytest.raises(ValueError, match="cub"):
        get_format("sop_typo")


def test_metrics_default_ks_are_the_registrys():
    from cfga.numerics.metrics import DEFAULT_KS

    assert DEFAULT_KS is RECALL_KS
