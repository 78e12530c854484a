"""CFGA maps: the definition ReLU(Σ_i v[i]·X[i]) upsampled to the image, from the extraction's own
forward pass, and the opt-in leaves the default extraction's results untouched. ResNet (the
CFGA+ convs' inputs) and Swin v1/v2 and ViT (the qkv linears' input tokens on the grid, method.md
§T9), the real torchvision builders with random weights."""
import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

from cfga import extract_features, load_model
from cfga.backbones import builder, family_module, family_of
from cfga.backbones.capture import LinearCapture
from cfga.backbones.resnet import cfga_convs
from cfga.extraction.maps import cfga_heatmaps
from cfga.extraction.pipeline import batch_features, image_level_features
from cfga.extraction.preprocess import preprocess
from cfga.numerics.cam import cfga_map
from cfga.outputs.heatmaps import heatmap_figure, mask_outline
from cfga.numerics.mask import scda_mask
from cfga.outputs import heatmaps
from cfga.registry.features import CFGA_LAYERS, CFGA_PLUS_LAYERS, cfga_name, cfga_plus_parts
from cfga.registry.protocols import get_protocol
from tests.reference.spec_reference import build_dml_model, jitter_bn
from tests.reference.transformer_reference import jitter_norms


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


# ---- Transformers (method.md §T9): the CFGA+ layers are the two qkv linears ----

# arch → (protocol, image sizes (h, w), the figure's layer labels). Swin at 232×300: an 8×10 token
# grid, padded to whole windows, cyclically shifted in the last block (v1: 7×7 windows, shift on
# both axes; v2: 8×8 windows, shift on the width only); at 64×96: 2×3, padded, one window, no
# shift. ViT-B/16: 224 px, 14×14 patches and a class token.
TRANSFORMERS = {
    "swin_t": ("scda", [(232, 300), (64, 96)], ["4-0 qkv", "4-1 qkv"]),
    "swin_v2_t": ("scda", [(232, 300)], ["4-0 qkv", "4-1 qkv"]),
    "vit_b_16": ("scda_224", [(240, 260)], ["10 qkv", "11 qkv"]),
}


@pytest.fixture(scope="module", params=list(TRANSFORMERS))
def transformer(request):
    """(arch, torchvision net with random weights and LayerNorms, protocol, pictures)."""
    arch = request.param
    proto, sizes, _ = TRANSFORMERS[arch]
    torch.manual_seed(0)
    net = jitter_norms(builder(arch)(), 0).eval()
    with torch.no_grad():  # random weights make v about uniform, so Σ v·X is about X's channel
        for m in net.modules():  # mean: LayerNorm biases leaning positive keep the maps from all-zero
            if isinstance(m, torch.nn.LayerNorm):
                m.bias.add_(1.0)
    rng = np.random.default_rng(1)
    pics = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    return arch, net, get_protocol(proto), pics


@pytest.fixture(scope="module")
def transformer_items(transformer):
    arch, net, proto, pics = transformer
    return cfga_heatmaps(net, pics, proto)


def torchvision_qkv_inputs(net, x, capture=False):
    """torchvision's own forward of x [1, 3, H, W] (the whole model, no cfga code): what each CFGA
    block's attention module receives (Swin [1, h, w, C], ViT [1, 1 + h·w, C]) and, with
    ``capture``, a LinearCapture of the qkv weights (what F.linear receives: Swin's windows)."""
    blocks = family_module(family_of(net)).cfga_blocks(net)
    mods = [b.attn if hasattr(b, "attn") else b.self_attention for b in blocks]
    seen = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach())) for m in mods]
    weights = [m.qkv.weight for m in mods] if capture else []
    try:
        # no torch-function mode for ViT: it would turn off nn.MultiheadAttention's fast path,
        # which the extraction's trunk takes
        with torch.no_grad(), LinearCapture(weights) if capture else contextlib.nullcontext() as cap:
            F = net.permute(net.norm(net.features(x))) if hasattr(net, "features") else None
            net(x)
    finally:
        for h in hooks:
            h.remove()
    return seen, cap, F


def on_grid(t: torch.Tensor, size) -> torch.Tensor:
    """An attention input on the token grid [1, C, h, w]: Swin's is already a grid; ViT's drops
    the class token, patches row-major."""
    if t.dim() == 4:
        return t.permute(0, 3, 1, 2)
    return t[:, 1:].reshape(t.shape[0], *size, t.shape[-1]).permute(0, 3, 1, 2)


def test_transformer_opt_in_taps_the_qkv_inputs_on_the_token_grid(transformer):
    arch, net, proto, pics = transformer
    swin = arch.startswith("swin")
    for pic in pics:
        x = preprocess(pic, proto.resize)[None]
        plain = batch_features(net, x, proto)
        taps = {}
        tapped = batch_features(net, x, proto, maps=taps)
        assert plain.keys() == tapped.keys()
        for k in plain:
            assert torch.equal(plain[k], tapped[k]), k  # the opt-in changes no bit
        assert list(taps["inputs"]) == list(cfga_plus_parts(arch))
        seen, cap, F = torchvision_qkv_inputs(net, x, capture=swin)
        size = tuple(taps["mask"].shape[1:])
        if swin:
            assert size == tuple(F.shape[2:]) and torch.equal(taps["mask"], scda_mask(F, proto.lcc))
        else:
            assert size == (14, 14)
        for i, n in enumerate(taps["inputs"]):
            got = taps["inputs"][n]
            assert got.shape == (1, plain[n].shape[1], *size), n  # C_in = the CFGA vector's length
            want = on_grid(seen[i], size)
            if swin or i == 0:
                assert torch.equal(got, want), n
            else:  # the ViT's last block: its input went through torchvision's fast-path attention
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            if swin:  # what F.linear received: each grid token once, all other rows zero padding
                X = cap.io[i][0].reshape(-1, got.shape[1])
                tokens = got[0].flatten(1).T
                assert bool((tokens[:, None] == X[None]).all(-1).any(1).all()), n
                assert int((X == 0).all(-1).sum()) == X.shape[0] - tokens.shape[0] > 0, n


def test_transformer_cfga_maps_are_relu_of_v_dot_the_qkv_inputs(transformer, transformer_items):
    arch, net, proto, pics = transformer
    for pic, it in zip(pics, transformer_items):
        x = preprocess(pic, proto.resize)[None]
        assert it.image.size == (x.shape[3], x.shape[2])
        assert list(it.cfga_maps) == list(cfga_plus_parts(arch))
        seen, _, _ = torchvision_qkv_inputs(net, x)
        for i, n in enumerate(it.cfga_maps):
            X = on_grid(seen[i], it.mask.shape)[0]
            v = torch.from_numpy(it.features[n])
            m = torch.relu((v[:, None, None] * X).sum(0))
            want = torch.nn.functional.interpolate(m[None, None], size=x.shape[2:], mode="bilinear",
                                                   align_corners=False)[0, 0]
            got = torch.from_numpy(it.cfga_maps[n])
            assert got.shape == x.shape[2:]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(1.0, float(want.max())))
            assert float(want.max()) > 0 and float(want.std()) > 0, n  # something to compare


def test_transformer_heatmap_figure_labels_its_own_layers(transformer, transformer_items, tmp_path, monkeypatch):
    arch = transformer[0]
    heads = []
    real = heatmaps.render_grid
    monkeypatch.setattr(heatmaps, "render_grid", lambda rows, path, title, group_titles, thumb: (
        heads.extend(group_titles), real(rows, path, title, group_titles=group_titles, thumb=thumb)))
    heatmap_figure(transformer_items, [f"q{i}" for i in range(len(transformer_items))], tmp_path / "h.png", arch)
    assert [t for _, t in heads[1:]] == [f"CFGA map {label}" for label in TRANSFORMERS[arch][2]]
    im = Image.open(tmp_path / "h.png")
    assert im.width > 3 * 192 and im.height > len(transformer_items) * 192
