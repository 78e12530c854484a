"""The authors' checkpoint formats (method.md §1.2, cfga.checkpoints.formats): sniffing and the strict
mapping to torchvision keys, with errors that name the key, the format and the file."""
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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
from cfga.checkpoints.save import dgpcrl_state


def _copy(obj):
    """Shallow copy of a checkpoint object: new dicts, the same tensors."""
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in obj.items()}


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
