"""The authors' checkpoint formats (SPEC §1.2): writers → sniffing → strict mapping → loading."""
import argparse
import hashlib
import re

import pytest
import torch
import torch.nn.functional as Fn
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cfga.backbones.heads import dml_embedding, head_embedding, trunk_features
from cfga.checkpoints.formats import (
    _CONTAINER,
    FORMATS,
    CheckpointError,
    dgpcrl_n_cls,
    sniff_format,
    to_torchvision,
)
from cfga.checkpoints.formats import CheckpointError as ModelsCheckpointError
from cfga.checkpoints.load import load_checkpoint
from cfga.checkpoints.save import (
    _trunk_of,
    dgpcrl_state,
    ms_state,
    proxy_anchor_state,
    save_dgpcrl,
    save_ms,
    save_proxy_anchor,
)

WRITERS = {
    "ms": save_ms,
    "proxy_anchor": save_proxy_anchor,
    "dgpcrl": lambda path, net: save_dgpcrl(path, net, n_cls=100, seed=3),
    "torchvision": lambda path, net: torch.save(
        {**_trunk_of(net), "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}, path
    ),
}


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    m = torchvision.models.resnet50()
    m.fc = nn.Linear(2048, 512)
    with torch.no_grad():  # non-trivial BN buffers, so a mix-up of buffers would show
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                mod.num_batches_tracked.fill_(7)
    return m.eval()


@pytest.fixture(scope="module")
def trunk(net):
    return _trunk_of(net)


@pytest.fixture(scope="module")
def files(net, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    out = {}
    for fmt, write in WRITERS.items():
        out[fmt] = d / f"{fmt}.pth"
        write(out[fmt], net)
    return out


@pytest.fixture(scope="module")
def objs(net):
    """In-memory checkpoint objects (what torch.load returns), for the cheap error tests."""
    return {
        "ms": ms_state(net),
        "proxy_anchor": proxy_anchor_state(net),
        "dgpcrl": dgpcrl_state(net, 100, seed=3),
    }


def _copy(obj):
    """Shallow copy of a checkpoint object: new dicts, the same tensors."""
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in obj.items()}


# ---- writers: exactly the authors' key layouts ----------------------------------------------

def test_writers_use_the_authors_key_layouts(files, trunk):
    ms = torch.load(files["ms"], weights_only=True)
    assert list(ms) == ["model"]
    assert set(ms["model"]) == set(trunk) | {"class_fc.weight", "class_fc.bias"}
    assert ms["model"]["class_fc.weight"].shape == (512, 2048) and ms["model"]["class_fc.bias"].shape == (512,)

    px = torch.load(files["proxy_anchor"], weights_only=True)
    assert list(px) == ["model_state_dict"]
    expect = {f"model.{k}" for k in trunk} | {"model.fc.weight", "model.fc.bias",
                                              "model.embedding.weight", "model.embedding.bias"}
    assert set(px["model_state_dict"]) == expect
    assert px["model_state_dict"]["model.fc.weight"].shape == (1000, 2048)
    assert list(px["model_state_dict"])[-2:] == ["model.embedding.weight", "model.embedding.bias"]

    dg = torch.load(files["dgpcrl"], weights_only=True)
    assert list(dg) == ["model"]
    assert set(dg["model"]) == set(trunk) | {"class_fc.weight", "class_fc_2.weight"}
    assert dg["model"]["class_fc.weight"].shape == (100, 2048)
    assert dg["model"]["class_fc_2.weight"].shape == (100, 4096)


def test_writers_refuse_a_net_without_the_embedding_head(tmp_path):
    with torch.device("meta"):
        plain = torchvision.models.resnet50()
    with pytest.raises(ValueError, match=r"Linear\(2048, 512\)"):
        save_ms(tmp_path / "x.pth", plain)
    assert not (tmp_path / "x.pth").exists()


def test_dgpcrl_heads_are_seeded(net):
    a, b = dgpcrl_state(net, 98, seed=1)["model"], dgpcrl_state(net, 98, seed=1)["model"]
    assert torch.equal(a["class_fc_2.weight"], b["class_fc_2.weight"])
    assert a["class_fc.weight"].shape == (98, 2048)


# ---- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip(fmt, files, net, trunk):
    path = files[fmt]
    assert sniff_format(torch.load(path, weights_only=True)) == fmt
    loaded, meta = load_checkpoint(path, "resnet50")
    assert meta["format"] == fmt
    assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.cfga_meta == meta
    assert not loaded.training
    got = loaded.state_dict()
    for k, v in trunk.items():
        assert torch.equal(got[k], v), k
    if fmt in ("ms", "proxy_anchor"):
        assert isinstance(loaded.fc, nn.Linear) and loaded.fc.weight.shape == (512, 2048)
        assert torch.equal(loaded.fc.weight, net.fc.weight)
        assert torch.equal(loaded.fc.bias, net.fc.bias)
        x = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            e_loaded = dml_embedding(loaded, x, fmt)
            e_orig = dml_embedding(net, x, fmt)
        assert torch.equal(e_loaded, e_orig)
        assert torch.allclose(e_loaded.norm(dim=1), torch.ones(2), atol=1e-5)
    else:
        assert loaded.fc.out_features == 1000  # the default fc, untouched
    if fmt == "dgpcrl":
        assert meta["n_cls"] == 100
    else:
        assert "n_cls" not in meta


def test_embedding_heads_follow_spec_4_4(net):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        F = trunk_features(net, x)
        assert F.shape[:2] == (2, 2048) and (F >= 0).all()
        W, b = net.fc.weight, net.fc.bias
        gmp, gap = F.amax(dim=(2, 3)), F.mean(dim=(2, 3))
        ms = Fn.normalize(gmp @ W.T + b, dim=1)
        z = (gmp + gap) @ W.T + b
        proxy = z / torch.sqrt((z**2).sum(1, keepdim=True) + 1e-12)
        torch.testing.assert_close(dml_embedding(net, x, "ms"), ms)
        torch.testing.assert_close(dml_embedding(net, x, "proxy_anchor"), proxy)
    with pytest.raises(ValueError, match="unknown embedding head"):
        head_embedding(net.fc, F, "dgpcrl")


def test_extra_top_level_keys_are_ignored(objs):
    obj = {**objs["ms"], "optimizer": {"state": {}, "param_groups": []}, "epoch": 2999}
    assert sniff_format(obj) == "ms"
    trunk, head = to_torchvision(obj, "ms", "resnet50")
    assert head["weight"].shape == (512, 2048)


def test_proxy_fc_is_accepted_and_dropped_present_or_not(objs):
    obj = objs["proxy_anchor"]
    assert "model.fc.weight" in obj["model_state_dict"]
    trunk, head = to_torchvision(obj, "proxy_anchor", "resnet50")
    assert not any(k.startswith(("fc.", "model.", "embedding.")) for k in trunk)
    assert torch.equal(head["weight"], obj["model_state_dict"]["model.embedding.weight"])
    no_fc = _copy(obj)
    del no_fc["model_state_dict"]["model.fc.weight"], no_fc["model_state_dict"]["model.fc.bias"]
    trunk2, _ = to_torchvision(no_fc, "proxy_anchor", "resnet50")
    assert trunk2.keys() == trunk.keys()


def test_torchvision_under_state_dict_and_without_fc(trunk):
    assert sniff_format({"state_dict": trunk, "epoch": 3}) == "torchvision"
    got, head = to_torchvision({"state_dict": trunk, "epoch": 3}, "torchvision", "resnet50")
    assert head is None and got.keys() == trunk.keys()


def test_missing_num_batches_tracked_is_accepted(tmp_path, trunk):
    """Files from before torch 0.4.1 (e.g. the V1 ImageNet weights) lack these buffers."""
    old = {k: v for k, v in trunk.items() if not k.endswith("num_batches_tracked")}
    p = tmp_path / "old.pth"
    torch.save(old, p)
    loaded, meta = load_checkpoint(p, "resnet50")
    assert meta["format"] == "torchvision"
    assert int(loaded.bn1.num_batches_tracked) == 0
    assert torch.equal(loaded.layer4[2].bn3.running_var, trunk["layer4.2.bn3.running_var"])


def test_dgpcrl_other_class_count_is_accepted_and_recorded(net):
    obj = dgpcrl_state(net, 37, seed=0)
    trunk, head = to_torchvision(obj, "dgpcrl", "resnet50")
    assert head is None and "class_fc.weight" not in trunk
    assert dgpcrl_n_cls(obj) == 37


# ---- errors ---------------------------------------------------------------------------------

def test_error_class_is_the_models_one():
    assert CheckpointError is ModelsCheckpointError


def test_missing_key_names_it_the_format_and_the_path(objs):
    obj = _copy(objs["ms"])
    del obj["model"]["layer4.2.conv3.weight"]
    with pytest.raises(CheckpointError) as err:
        to_torchvision(obj, "ms", "resnet50", path="/x/ckpt.pth")
    msg = str(err.value)
    assert "/x/ckpt.pth" in msg and "assumed format: ms" in msg
    assert "missing keys (1): [layer4.2.conv3.weight]" in msg and "unexpected keys (0): []" in msg


def test_unexpected_key_is_named(objs):
    obj = _copy(objs["proxy_anchor"])
    obj["model_state_dict"]["model.extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"assumed format: proxy_anchor.*unexpected keys \(1\): \[model\.extra\.weight\]"):
        to_torchvision(obj, "proxy_anchor", "resnet50")


def test_wrong_arch_lists_a_few_keys_and_counts(objs):
    with pytest.raises(CheckpointError) as err:
        to_torchvision(objs["ms"], "ms", "resnet101", path="ms.pth")
    msg = str(err.value)
    assert "does not fit resnet101" in msg and "missing keys (" in msg
    assert "layer3.6." in msg and "more)" in msg  # at most 6 shown, then the rest counted


def test_explicit_wrong_format_hints_at_the_sniffed_one(objs):
    with pytest.raises(CheckpointError) as err:
        to_torchvision(objs["dgpcrl"], "ms", "resnet50", path="dg.pth")
    msg = str(err.value)
    assert "assumed format: ms" in msg and "class_fc.bias" in msg and "class_fc_2.weight" in msg
    assert "look like format 'dgpcrl'" in msg


def test_missing_container_key(objs):
    with pytest.raises(CheckpointError, match=r"assumed format proxy_anchor.*no 'model_state_dict' dict.*model"):
        to_torchvision(objs["ms"], "proxy_anchor", "resnet50")


@pytest.mark.parametrize(
    "key,shape,want",
    [("class_fc.weight", (256, 2048), r"\(512, 2048\)"), ("layer4.1.conv2.weight", (512, 512, 1, 1), r"\(512, 512, 3, 3\)")],
)
def test_wrong_shape_names_the_tensor_and_both_shapes(objs, key, shape, want):
    obj = _copy(objs["ms"])
    obj["model"][key] = torch.zeros(shape)
    with pytest.raises(CheckpointError, match=re.escape(f"tensor {key} has shape {tuple(shape)}") + ".*" + want):
        to_torchvision(obj, "ms", "resnet50")


def test_dgpcrl_heads_must_agree(objs):
    obj = _copy(objs["dgpcrl"])
    obj["model"]["class_fc_2.weight"] = torch.zeros(98, 4096)
    with pytest.raises(CheckpointError, match=r"class_fc_2\.weight has shape \(98, 4096\).*same n_cls"):
        to_torchvision(obj, "dgpcrl", "resnet50")


@pytest.mark.parametrize("fmt,key", [("ms", "layer1.0.conv1.weight"), ("ms", "class_fc.bias"),
                                     ("proxy_anchor", "model.embedding.weight"), ("dgpcrl", "class_fc_2.weight")])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_is_refused(objs, fmt, key, bad):
    obj = _copy(objs[fmt])
    state = obj[_CONTAINER[fmt]]
    t = state[key].clone()
    t.view(-1)[5] = bad
    state[key] = t
    with pytest.raises(CheckpointError, match=rf"tensor {key} holds NaN or Inf"):
        to_torchvision(obj, fmt, "resnet50")


def test_unknown_layout_lists_top_level_keys_and_formats(tmp_path):
    with pytest.raises(CheckpointError) as err:
        sniff_format({"net": {}, "epoch": 3})
    msg = str(err.value)
    assert "unknown checkpoint layout" in msg and "net, epoch" in msg
    for fmt in FORMATS:
        assert fmt in msg
    p = tmp_path / "odd.pth"
    torch.save({"weights": {"a": torch.zeros(1)}}, p)
    with pytest.raises(CheckpointError, match=r"odd\.pth: unknown checkpoint layout.*weights"):
        load_checkpoint(p, "resnet50")


def test_data_parallel_prefix_gets_a_hint(trunk):
    with pytest.raises(CheckpointError, match="module."):
        sniff_format({f"module.{k}": v for k, v in trunk.items()})


def test_pickled_file_is_refused_unless_allowed(tmp_path, objs):
    p = tmp_path / "pickled.pth"
    torch.save({**objs["ms"], "args": argparse.Namespace(lr=1e-5)}, p)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(p, "resnet50")
    msg = str(err.value)
    assert "pickled.pth" in msg and "arbitrary code" in msg and "allow_pickle: true" in msg
    loaded, meta = load_checkpoint(p, "resnet50", allow_pickle=True)
    assert meta["format"] == "ms"
    assert torch.equal(loaded.fc.bias, objs["ms"]["model"]["class_fc.bias"])


def test_missing_file_and_unknown_names(tmp_path, objs):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pth", "resnet50")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        to_torchvision(objs["ms"], "msloss", "resnet50")
    with pytest.raises(ValueError, match="unknown arch"):
        to_torchvision(objs["ms"], "ms", "resnet18")


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_any_removed_keys_are_all_counted(objs, data):
    keys_in_order = [k for k in objs["ms"]["model"] if not k.endswith("num_batches_tracked")]
    keys = sorted(keys_in_order)
    drop = data.draw(st.sets(st.sampled_from(keys), min_size=1, max_size=12))
    obj = {"model": {k: v for k, v in objs["ms"]["model"].items() if k not in drop}}
    with pytest.raises(CheckpointError) as err:
        to_torchvision(obj, "ms", "resnet50")
    msg = str(err.value)
    assert f"missing keys ({len(drop)}): [" in msg
    shown = [k for k in keys_in_order if k in drop][:6]
    assert all(k in msg for k in shown)
