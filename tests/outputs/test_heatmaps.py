"""CFGA maps: the definition ReLU(Σ_i v[i]·X[i]) upsampled to the image, from the extraction's own
forward pass, and the opt-in leaves the default extraction's results untouched."""
import numpy as np
import pytest
import torch
from PIL import Image

from cfga import extract_features, load_model
from cfga.backbones.resnet import cfga_convs
from cfga.extraction.maps import cfga_heatmaps
from cfga.extraction.pipeline import batch_features, image_level_features
from cfga.extraction.preprocess import preprocess
from cfga.numerics.cam import cfga_map
from cfga.outputs.heatmaps import heatmap_figure, mask_outline
from cfga.registry.features import CFGA_LAYERS, CFGA_PLUS_LAYERS, cfga_name
from cfga.registry.protocols import get_protocol
from tests.reference.spec_reference import build_dml_model, jitter_bn


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(120, 150), (96, 96), (150, 110)]):
        p = root / f"q{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def model(tmp_path_factory, images):
    torch.set_num_threads(1)
    net = jitter_bn(build_dml_model("resnet50", seed=3), seed=4, images=images[:2])
    path = tmp_path_factory.mktemp("ckpt") / "backbone.pth"
    torch.save(net.state_dict(), path)
    return load_model("resnet50", "scda", path, device="cpu")


def test_cfga_map_is_relu_of_the_weighted_channel_sum():
    g = torch.Generator().manual_seed(0)
    v, X = torch.randn(5, generator=g), torch.rand(5, 3, 4, generator=g)
    m = cfga_map(v, X)
    want = torch.tensor([[max(0.0, float(sum(v[i] * X[i, r, c] for i in range(5)))) for c in range(4)]
                         for r in range(3)])
    torch.testing.assert_close(m, want, rtol=1e-5, atol=1e-6)
    up = cfga_map(v, X, (30, 40))
    assert up.shape == (30, 40) and float(up.min()) >= 0
    torch.testing.assert_close(
        up, torch.nn.functional.interpolate(m[None, None], size=(30, 40), mode="bilinear", align_corners=False)[0, 0])
    with pytest.raises(ValueError, match="same C"):
        cfga_map(torch.ones(4), X)


def test_opt_in_does_not_change_features_and_taps_the_same_pass(model, images):
    proto = get_protocol("scda")
    x = preprocess(images[0], proto.resize)[None]
    plain = batch_features(model, x, proto)
    taps = {}
    tapped = batch_features(model, x, proto, maps=taps)
    assert plain.keys() == tapped.keys()
    for k in plain:
        assert torch.equal(plain[k], tapped[k]), k
    # the taps are what the CFGA+ convs saw, and the SCDA mask of the same layer4 map
    seen = {}
    convs = dict(zip([cfga_name(b, c) for b, c in CFGA_LAYERS], cfga_convs(model)))
    hooks = [convs[n].register_forward_hook(lambda _m, inp, _o, n=n: seen.__setitem__(n, inp[0].detach()))
             for n in CFGA_PLUS_LAYERS]
    with torch.no_grad():
        F = model.layer4(model.layer3(model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x))))))))
    for h in hooks:
        h.remove()
    assert list(taps["inputs"]) == list(CFGA_PLUS_LAYERS)
    for n in CFGA_PLUS_LAYERS:
        torch.testing.assert_close(taps["inputs"][n], seen[n], rtol=1e-4, atol=1e-5)
        assert taps["inputs"][n].shape[1] == plain[n].shape[1]  # C_in = the CFGA vector's length
    assert torch.equal(taps["mask"], image_level_features(F, proto)[1])


def test_cfga_heatmaps_match_extract_features(model, images):
    feats = extract_features(model, images, "scda", batch_size=1)
    items = cfga_heatmaps(model, images, "scda")
    for i, it in enumerate(items):
        for k, v in feats.items():
            assert np.array_equal(it.features[k], v[i]), k  # CPU: rows do not depend on the batch
        H, W = it.image.height, it.image.width
        assert it.mask.dtype == bool and it.mask.any()
        for n in CFGA_PLUS_LAYERS:
            assert it.cfga_maps[n].shape == (H, W) and it.cfga_maps[n].min() >= 0
        assert it.image.size == Image.open(images[i]).size  # short side ≤ 256 px: scda keeps the size


def test_heatmap_figure_and_outline(model, images, tmp_path):
    items = cfga_heatmaps(model, images[:2], "scda")
    heatmap_figure(items, ["a", "b"], tmp_path / "h.png", "title")
    im = Image.open(tmp_path / "h.png")
    assert im.width > 3 * 192 and im.height > 2 * 192
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    out = mask_outline(mask, (40, 40))
    assert out[10, 10] and out[10, 20] and not out[20, 20] and not out[5, 5]
