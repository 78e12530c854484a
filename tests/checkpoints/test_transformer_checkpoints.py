"""load_model for Swin / ViT: every layout recognised from its keys (TRANSFORMERS.md §1), mapped
onto torchvision exactly (timm files written by timm itself), and bad files refused clearly."""
import hashlib
import shutil

import pytest
import torch

from cfga import extract_features, load_model
from cfga.checkpoints.formats import CheckpointError
from tests.reference.transformer_reference import jitter_norms

timm = pytest.importorskip("timm")


def _perturbed(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


@pytest.fixture(scope="module")
def tv_swin(tmp_path_factory):
    """A torchvision swin_t with non-trivial weights, saved as a torchvision state dict."""
    from torchvision.models import swin_t

    torch.manual_seed(0)
    net = jitter_norms(swin_t(), 2).eval()
    path = tmp_path_factory.mktemp("ckpt") / "my_swin.pth"
    torch.save(net.state_dict(), path)
    return net, path


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    for k, v in sa.items():
        if k.startswith(("head.", "heads.")):
            continue
        assert torch.equal(v, sb[k]), k


def test_torchvision_layout(tv_swin):
    net, path = tv_swin
    got = load_model("swin_t", "scda", path)
    _same_state(net, got)
    assert got.cfga_meta["layout"] == "torchvision" and not got.training


def _to_microsoft(state):
    """torchvision swin_t keys → the official Microsoft layout (downsample at the end of a stage,
    attn_mask / relative_position_index buffers present), under 'model'."""
    out = {}
    for k, v in state.items():
        p = k.split(".")
        if k.startswith("features.0.0."):
            out["patch_embed.proj." + p[-1]] = v
        elif k.startswith("features.0.2."):
            out["patch_embed.norm." + p[-1]] = v
        elif p[0] == "features" and int(p[1]) % 2 == 1:
            rest = ".".join(p[3:]).replace("mlp.0.", "mlp.fc1.").replace("mlp.3.", "mlp.fc2.")
            out[f"layers.{(int(p[1]) - 1) // 2}.blocks.{p[2]}.{rest}"] = v
        elif p[0] == "features":
            out[f"layers.{int(p[1]) // 2 - 1}.downsample." + ".".join(p[2:])] = v
        else:
            out[k] = v
    out["layers.3.blocks.1.attn_mask"] = torch.zeros(1, 49, 49)  # only shifted blocks have one
    return {"model": out}


def test_microsoft_layout(tv_swin, tmp_path):
    net, _ = tv_swin
    path = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save(_to_microsoft(net.state_dict()), path)
    got = load_model("swin_t", "scda", path)
    _same_state(net, got)
    assert got.cfga_meta["layout"] == "microsoft"


@pytest.mark.slow
@pytest.mark.parametrize("timm_name,arch,size,proto", [
    ("swin_tiny_patch4_window7_224", "swin_t", 224, "scda"),
    ("vit_base_patch32_224", "vit_b_32", 224, "scda_224"),
])
def test_timm_layouts_give_timms_features(tmp_path, timm_name, arch, size, proto):
    """A genuine timm file: the loaded torchvision net computes timm's own token map."""
    torch.set_num_threads(2)
    m = _perturbed(timm.create_model(timm_name, pretrained=False))
    path = tmp_path / "timm.pth"
    torch.save(m.state_dict(), path)
    net = load_model(arch, proto, path)
    assert net.cfga_meta["layout"] == "timm"
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        want = m.forward_features(x)
        if arch.startswith("swin"):
            got = net.norm(net.features(x))
        else:
            got = net.encoder(torch.cat([net.class_token.expand(1, -1, -1), net._process_input(x)], dim=1))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_hub_name_hash_checked(tv_swin, tmp_path):
    _, path = tv_swin
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    good = tmp_path / f"swin_t-{digest[:8]}.pth"
    shutil.copy(path, good)
    load_model("swin_t", "scda", good)
    bad = tmp_path / "swin_t-deadbeef.pth"
    shutil.copy(path, bad)
    with pytest.raises(CheckpointError, match="sha256"):
        load_model("swin_t", "scda", bad)
    with pytest.raises(CheckpointError, match="file name says swin_t"):
        load_model("swin_s", "scda", good)


def test_wrong_family_refused(tv_swin, tmp_path):
    _, path = tv_swin
    with pytest.raises(CheckpointError, match="swin checkpoint.*arch: vit_b_16"):
        load_model("vit_b_16", "scda_224", path)
    with pytest.raises(CheckpointError, match="swin checkpoint.*arch: resnet50"):
        load_model("resnet50", "scda", path)


def test_missing_keys_named(tv_swin, tmp_path):
    net, _ = tv_swin
    state = net.state_dict()
    del state["features.7.1.mlp.3.weight"]
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"assumed layout: torchvision.*features\.7\.1\.mlp\.3\.weight.*extra\.weight"):
        load_model("swin_t", "scda", path)
    # swin_s has 18 blocks in stage 3: a swin_t file misses most of them
    with pytest.raises(CheckpointError, match="does not fit swin_s"):
        load_model("swin_s", "scda", tv_swin[1])


def test_nan_and_truncated_refused(tv_swin, tmp_path):
    net, path = tv_swin
    state = net.state_dict()
    state["features.7.0.attn.qkv.weight"] = state["features.7.0.attn.qkv.weight"].clone()
    state["features.7.0.attn.qkv.weight"][0, 0] = float("nan")
    nan = tmp_path / "nan.pth"
    torch.save(state, nan)
    with pytest.raises(CheckpointError, match="NaN"):
        load_model("swin_t", "scda", nan)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_model("swin_t", "scda", cut)


def test_unknown_layout_names_layouts(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"foo.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="microsoft.*timm"):
        load_model("swin_t", "scda", path)


def test_protocol_misfits(tv_swin):
    _, path = tv_swin
    with pytest.raises(ValueError, match="scda_224"):
        load_model("vit_b_16", "scda", path)
    with pytest.raises(ValueError, match="does not fit"):
        load_model("swin_t", "proxy_anchor", path)
    with pytest.raises(CheckpointError, match="512-d embedding head"):
        load_model("swin_t", "ms", path)


def test_ms_layout_roundtrip(tv_swin, tmp_path):
    """The pipeline's Swin DML file: torchvision keys without head.* + class_fc.*."""
    net, _ = tv_swin
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("head.")}
    state["class_fc.weight"] = torch.randn(512, 768) * 0.02
    state["class_fc.bias"] = torch.zeros(512)
    path = tmp_path / "ms.pth"
    torch.save({"model": state}, path)
    got = load_model("swin_t", "ms", path)
    assert got.cfga_meta["format"] == "ms"
    assert torch.equal(got.head.weight, state["class_fc.weight"])
    from PIL import Image
    feats = extract_features(got, [Image.new("RGB", (40, 30), (200, 10, 10))], "ms")
    assert feats["embedding"].shape == (1, 512)
