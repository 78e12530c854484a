"""Checkpoint loading: hash-named files, architecture fit, unsafe pickles, broken weights."""
import hashlib

import pytest
import torch
import torchvision

from cfga.checkpoints.formats import CheckpointError
from cfga.checkpoints.load import load_model, verify_hub_hash


@pytest.fixture(scope="module")
def state():
    torch.manual_seed(0)
    return torchvision.models.resnet50().state_dict()


def _hub_name(tmp_path, state, arch="resnet50"):
    p = tmp_path / "tmp.pth"
    torch.save(state, p)
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    named = tmp_path / f"{arch}-{digest[:8]}.pth"
    p.rename(named)
    return named, digest


def test_hub_named_file_is_verified_and_loaded(tmp_path, state):
    path, digest = _hub_name(tmp_path, state)
    assert verify_hub_hash(path) == digest
    model = load_model("resnet50", "scda", path, device="cpu")
    assert not model.training
    assert torch.equal(model.layer4[2].conv3.weight, state["layer4.2.conv3.weight"])
    assert model.cfga_meta["checkpoint_sha256"] == digest


def test_hash_mismatch_is_refused(tmp_path, state):
    path, _ = _hub_name(tmp_path, state)
    bad = tmp_path / "resnet50-00000000.pth"
    path.rename(bad)
    with pytest.raises(CheckpointError, match="resnet50-00000000.pth.*sha256"):
        load_model("resnet50", "scda", bad, device="cpu")


def test_imagenet_v2_file_is_refused(tmp_path, state):
    p = tmp_path / "resnet50-11ad3fa6.pth"
    torch.save(state, p)
    with pytest.raises(CheckpointError, match="IMAGENET1K_V2"):
        load_model("resnet50", "scda", p, device="cpu")


def test_wrong_arch_names_missing_and_unexpected_keys(tmp_path, state):
    p = tmp_path / "mine.pth"
    torch.save(state, p)
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
