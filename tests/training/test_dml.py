"""DML fine-tuning (cfga.training.dml): each loss trains, saves in the authors' format, and reloads exactly."""
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from cfga.backbones.heads import head_embedding
from cfga.checkpoints.formats import CheckpointError, sniff_format
from cfga.checkpoints.load import load_checkpoint
from cfga.training.dml import (
    FORMAT_FOR_LOSS,
    LOSSES,
    TrainSettings,
    effective_batch_size,
    embed,
    save_trained,
    settings_record,
    train_dml,
)

COLOURS = [(220, 40, 40), (40, 180, 60), (40, 70, 220), (230, 200, 30)]
SETTINGS = TrainSettings(epochs=2, image_size=64, batch_size=16, lr=1e-4, m_per_class=4, seed=0)


def _shape_image(cls: int, k: int) -> Image.Image:
    """Class = shape + colour; position, size and background jitter per image."""
    rng = np.random.default_rng(100 * cls + k)
    img = Image.new("RGB", (64, 64), tuple(int(v) for v in rng.integers(0, 80, 3)))
    d = ImageDraw.Draw(img)
    s = int(rng.integers(22, 40))
    x, y = (int(v) for v in rng.integers(0, 64 - s, 2))
    box = [x, y, x + s, y + s]
    if cls == 0:
        d.ellipse(box, fill=COLOURS[cls])
    elif cls == 1:
        d.rectangle(box, fill=COLOURS[cls])
    elif cls == 2:
        d.polygon([(x, y + s), (x + s // 2, y), (x + s, y + s)], fill=COLOURS[cls])
    else:
        d.line([(x, y), (x + s, y + s)], fill=COLOURS[cls], width=6)
        d.line([(x, y + s), (x + s, y)], fill=COLOURS[cls], width=6)
    return img


@pytest.fixture(scope="module")
def data():
    images = [_shape_image(c, k) for c in range(4) for k in range(6)]
    labels = [10 + c for c in range(4) for _ in range(6)]  # not 0-based: remapped inside
    return images, labels


@pytest.fixture
def backbone(resnet50_state):
    return resnet50_state


@pytest.fixture(scope="module")
def probe():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))


@pytest.mark.slow
@pytest.mark.parametrize("loss", LOSSES)
def test_each_loss_trains_saves_and_reloads(loss, data, backbone, probe, tmp_path):
    images, labels = data
    net, history = train_dml(backbone, "resnet50", images, labels, loss, SETTINGS, device="cpu")
    assert [r["epoch"] for r in history] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["steps"] >= 1 for r in history)
    assert not net.training
    assert net.fc.weight.shape == (512, 2048)
    # Something was trained; BN stayed frozen (running statistics untouched).
    assert not torch.equal(net.layer4[2].conv3.weight, backbone["layer4.2.conv3.weight"])
    assert torch.equal(net.layer2[0].bn1.running_mean, backbone["layer2.0.bn1.running_mean"])

    path = tmp_path / f"{loss}.pth"
    save_trained(path, net, loss)
    assert sniff_format(torch.load(path, weights_only=True)) == FORMAT_FOR_LOSS[loss]
    loaded, meta = load_checkpoint(path, "resnet50")
    assert meta["format"] == FORMAT_FOR_LOSS[loss]
    with torch.no_grad():
        e_trained = embed(net, probe, loss)
        e_loaded = embed(loaded, probe, loss)
    assert e_loaded.shape == (2, 512)
    assert torch.equal(e_loaded, e_trained)

    rec = settings_record(SETTINGS, loss=loss, arch="resnet50", n_images=len(images), n_classes=4,
                          history=history)
    assert json.loads(json.dumps(rec))["format"] == FORMAT_FOR_LOSS[loss]
    assert rec["batch_size_used"] == 16 and rec["freeze_bn"] is True


@pytest.mark.slow
def test_training_is_deterministic_on_cpu(data, backbone):
    images, labels = data
    s = TrainSettings(epochs=1, image_size=48, batch_size=16, m_per_class=4, seed=3)
    a, ha = train_dml(backbone, "resnet50", images, labels, "proxy_anchor", s, device="cpu")
    b, hb = train_dml(backbone, "resnet50", images, labels, "proxy_anchor", s, device="cpu")
    assert ha == hb
    assert torch.equal(a.fc.weight, b.fc.weight)
    assert torch.equal(a.layer1[0].conv1.weight, b.layer1[0].conv1.weight)


def test_trainable_layer4_leaves_the_lower_trunk_as_the_backbone_has_it(data, backbone):
    images, labels = data
    s = TrainSettings(epochs=1, image_size=48, batch_size=16, m_per_class=4, seed=1, trainable="layer4",
                      min_crop_area=0.6)
    net, _ = train_dml(backbone, "resnet50", images, labels, "ms", s, device="cpu")
    state = net.state_dict()
    lower = [k for k in backbone if not k.startswith(("layer4.", "fc."))]
    assert lower and all(torch.equal(state[k], backbone[k]) for k in lower)
    assert not torch.equal(state["layer4.0.conv1.weight"], backbone["layer4.0.conv1.weight"])
    rec = settings_record(s, loss="ms", arch="resnet50", n_classes=4)
    assert rec["trainable"] == "layer4" and "scale=(0.6, 1.0)" in rec["augmentation"]
    with pytest.raises(ValueError, match="trainable 'layer3'"):
        train_dml(backbone, "resnet50", images, labels, "ms", TrainSettings(trainable="layer3"), device="cpu")


def test_batch_size_is_clamped_to_the_sampler():
    assert effective_batch_size(TrainSettings(batch_size=32, m_per_class=4), 8) == 32
    assert effective_batch_size(TrainSettings(batch_size=32, m_per_class=4), 4) == 16
    assert effective_batch_size(TrainSettings(batch_size=30, m_per_class=4), 8) == 28
    with pytest.raises(ValueError, match="negatives"):
        effective_batch_size(TrainSettings(batch_size=4, m_per_class=4), 8)


def test_bad_inputs_are_refused(data, backbone):
    images, labels = data
    with pytest.raises(ValueError, match="unknown DML loss"):
        train_dml(backbone, "resnet50", images, labels, "triplet", SETTINGS, device="cpu")
    with pytest.raises(ValueError, match="two classes"):
        train_dml(backbone, "resnet50", images[:6], labels[:6], "ms", SETTINGS, device="cpu")
    broken = {k: v for k, v in backbone.items() if k != "layer3.0.conv2.weight"}
    with pytest.raises(CheckpointError, match=r"backbone state.*missing keys \(1\): \[layer3\.0\.conv2\.weight\]"):
        train_dml(broken, "resnet50", images, labels, "ms", SETTINGS, device="cpu")
    with pytest.raises(ValueError, match="unknown DML loss"):
        save_trained("x.pth", None, "triplet")


@pytest.mark.parametrize("loss,kind", [("ms", "ms"), ("cosface", "ms"), ("arcface", "ms"), ("proxy_anchor", "proxy_anchor")])
def test_trained_head_is_the_evaluated_head(loss, kind):
    """The head train_dml optimises equals the extraction's DML embedding (method.md §4.4), up to rounding."""
    import cfga.extraction.pipeline as extract

    from cfga.registry.protocols import get_protocol
    from cfga.training.dml import HEAD_FOR_LOSS

    assert get_protocol(FORMAT_FOR_LOSS[loss]).embedding == kind
    torch.manual_seed(1)
    fc = torch.nn.Linear(2048, 512)
    F = torch.rand(3, 2048, 3, 4)
    with torch.no_grad():
        ours = head_embedding(fc, F, HEAD_FOR_LOSS[loss])
        theirs = extract.stored_embedding(_Holder(fc), F, kind)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


class _Holder(torch.nn.Module):
    def __init__(self, fc):
        super().__init__()
        self.fc = fc
