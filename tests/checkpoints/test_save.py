"""Checkpoint writers (cfga.checkpoints.save): exactly the authors' key layouts (method.md §1.2)."""
import pytest
import torch
import torchvision

from cfga.checkpoints.save import dgpcrl_state, save_ms

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
