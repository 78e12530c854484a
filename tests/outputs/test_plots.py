"""Readable plots: one colour per feature everywhere, small multiples, R@1 bars with published marks."""
import numpy as np
from PIL import Image

from cfga.outputs.plots import FEATURE_COLORS, recall_at_1_plot, recall_plot
from cfga.outputs.tables import published_value
from cfga.registry.features import FEATURES, RECALL_KS, features_for


def _cells(models):
    rng = np.random.default_rng(0)
    cells = []
    for m, proto in models.items():
        for f in features_for(proto):
            r = np.sort(rng.uniform(0.2, 1.0, len(RECALL_KS)))
            cells.append({"dataset": "d", "model": m, "feature": f, **{f"recall@{k}": float(v)
                                                                       for k, v in zip(RECALL_KS, r)}})
    return cells


def test_every_feature_has_its_own_colour():
    """Every feature has a colour, and no two features one model can produce share one."""
    from cfga.registry.archs import ARCH_INFO, FAMILY_PROTOCOLS
    from cfga.registry.features import features_for

    assert set(FEATURE_COLORS) == set(FEATURES)
    for a in ARCH_INFO.values():
        for p in FAMILY_PROTOCOLS[a.family]:
            names = features_for(p, a.name if a.family != "resnet" else None)
            assert len({FEATURE_COLORS[f] for f in names}) == len(names), (a.name, p)


def test_small_multiples_and_bars_are_written(tmp_path):
    cells = _cells({"a": "scda", "b": "ms", "c": "proxy_anchor", "d": "ms"})
    recall_plot(cells, tmp_path / "k.png", "t")
    recall_at_1_plot(cells, tmp_path / "r1.png", "t", {("a", "cfga_plus"): 63.3})
    k, r1 = Image.open(tmp_path / "k.png"), Image.open(tmp_path / "r1.png")
    assert k.width > 3 * 300 and k.height > 2 * 250  # 3 × 2 panels for four models
    assert r1.width > 500


def test_published_value_only_for_paper_rows():
    pub = {("table5", "cub", "resnet50_imagenet", "cfga_plus"): 63.3,
           ("table3", "cub", "resnet50_imagenet", "cfga_plus"): 63.3}
    real = {"format": "cub", "archive": "x", "paper": "cub"}
    model = {"protocol": "scda", "paper": "resnet50_imagenet"}
    assert published_value(pub, real, model, "cfga_plus") == 63.3
    assert published_value(pub, real, model, "scda") is None
    assert published_value(pub, {"format": "cub", "synthetic": {}, "paper": "cub"}, model, "cfga_plus") is None
    assert published_value(pub, real, {"protocol": "scda"}, "cfga_plus") is None
