"""Checkpoint loading (cfga.checkpoints.load): hash-named files, architecture fit, unsafe pickles,
broken weights; every format read back exactly."""
import argparse
import hashlib
import shutil

import pytest
import torch
from torch import nn

from cfga.backbones.heads import dml_embedding
from cfga.checkpoints.formats import FORMATS, CheckpointError, sniff_format, to_torchvision
from cfga.checkpoints.load import load_checkpoint, load_model, verify_hub_hash


@pytest.fixture
def state(resnet50_state):
    return resnet50_state


def _hub_name(tmp_path, checkpoint, arch="resnet50"):
    p = tmp_path / "tmp.pth"
    shutil.copyfile(checkpoint, p)
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    named = tmp_path / f"{arch}-{digest[:8]}.pth"
    p.rename(named)
    return named, digest


def test_hub_named_file_is_verified_and_loaded(tmp_path, state, resnet50_checkpoint):
    path, digest = _hub_name(tmp_path, resnet50_checkpoint)
    assert verify_hub_hash(path) == digest
    model = load_model("resnet50", "scda", path, device="cpu")
    assert not model.training
    assert torch.equal(model.layer4[2].conv3.weight, state["layer4.2.conv3.weight"])
    assert model.cfga_meta["checkpoint_sha256"] == digest


def test_hash_mismatch_is_refused(tmp_path, resnet50_checkpoint):
    path, _ = _hub_name(tmp_path, resnet50_checkpoint)
    bad = tmp_path / "resnet50-00000000.pth"
    path.rename(bad)
    with pytest.raises(CheckpointError, match="resnet50-00000000.pth.*sha256"):
        load_model("resnet50", "scda", bad, device="cpu")


def test_imagenet_v2_file_is_refused(tmp_path, resnet50_checkpoint):
    p = tmp_path / "resnet50-11ad3fa6.pth"
    shutil.copyfile(resnet50_checkpoint, p)
    with pytest.raises(CheckpointError, match="IMAGENET1K_V2"):
        load_model("resnet50", "scda", p, device="cpu")


def test_wrong_arch_names_missing_and_unexpected_keys(tmp_path, resnet50_checkpoint):
    p = tmp_path / "mine.pth"
    shutil.copyfile(resnet50_checkpoint, p)
    with pytest.raises(CheckpointError, match=r"mine.pth.*assumed format: torchvision.*missing keys \(\d+\): \[layer3\.\d+\."):
        load_model("resnet101", "scda", p, device="cpu")


def test_wrong_shape_is_named(tmp_path, state):
    bad = dict(state)
    bad["layer4.1.conv2.weight"] = torch.zeros(512, 512, 1, 1)
    p = tmp_path / "shape.pth"
    torch.save(bad, p)
    with pytest.raises(CheckpointError, match=r"layer4.1.conv2.weight has shape \(512, 512, 1, 1\)"):
        load_model("resnet50", "scda", p, device="cpu")


def test_nan_weights_are_refused(tmp_path, state):
    bad = dict(state)
    bad["layer1.0.conv1.weight"] = torch.full_like(state["layer1.0.conv1.weight"], float("nan"))
    p = tmp_path / "nan.pth"
    torch.save(bad, p)
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        load_model("resnet50", "scda", p, device="cpu")


class Payload:  # a pickled object: needs full unpickling, which can run code
    pass


def test_non_tensor_pickle_refused_unless_allowed(tmp_path, state):
    p = tmp_path / "pickled.pth"
    torch.save({"state_dict": state, "extra": Payload()}, p)
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_model("resnet50", "scda", p, device="cpu")
    model = load_model("resnet50", "scda", p, device="cpu", allow_pickle=True)
    assert torch.equal(model.conv1.weight, state["conv1.weight"])


def test_fc_of_any_size_is_dropped(tmp_path, state):
    s = dict(state)
    s["fc.weight"], s["fc.bias"] = torch.zeros(7, 2048), torch.zeros(7)
    p = tmp_path / "classifier.pth"
    torch.save(s, p)
    load_model("resnet50", "scda", p, device="cpu")


def test_missing_file_and_unknown_arch(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model("resnet50", "scda", tmp_path / "none.pth", device="cpu")
    with pytest.raises(ValueError, match="unknown arch"):
        load_model("resnet18", "scda", tmp_path / "none.pth", device="cpu")


# ---- load_checkpoint: every format round trip, old files, pickles -----------------------------

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


def test_missing_num_batches_tracked_is_accepted(tmp_path, trunk):
    """Files from before torch 0.4.1 (e.g. the V1 ImageNet weights) lack these buffers."""
    old = {k: v for k, v in trunk.items() if not k.endswith("num_batches_tracked")}
    p = tmp_path / "old.pth"
    torch.save(old, p)
    loaded, meta = load_checkpoint(p, "resnet50")
    assert meta["format"] == "torchvision"
    assert int(loaded.bn1.num_batches_tracked) == 0
    assert torch.equal(loaded.layer4[2].bn3.running_var, trunk["layer4.2.bn3.running_var"])


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
