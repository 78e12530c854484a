"""DML on a Swin (TRANSFORMERS.md §7): the ms head trained with a PML loss, saved in the
documented layout, reloaded by load_model, and its features equal the reference."""
import numpy as np
import pytest
import torch
from PIL import Image

from cfga import extract_features, load_model
from cfga.training.dml import TrainSettings, save_trained, train_dml
from tests.reference.transformer_reference import jitter_norms, reference_features

pytest.importorskip("pytorch_metric_learning")


def _images(n_classes=4, per_class=4, seed=0):
    rng = np.random.default_rng(seed)
    imgs, labels = [], []
    for c in range(n_classes):
        colour = rng.integers(0, 256, 3)
        for _ in range(per_class):
            arr = np.clip(rng.normal(colour, 40, (72, 80, 3)), 0, 255).astype(np.uint8)
            imgs.append(Image.fromarray(arr))
            labels.append(c)
    return imgs, labels


@pytest.fixture(scope="module")
def backbone_state():
    from torchvision.models import swin_t

    torch.manual_seed(0)
    net = jitter_norms(swin_t(), 4)
    return {k: v for k, v in net.state_dict().items()}


def test_swin_ms_training_roundtrip(backbone_state, tmp_path):
    torch.set_num_threads(2)
    imgs, labels = _images()
    settings = TrainSettings(epochs=1, image_size=64, batch_size=8, m_per_class=2, trainable="layer4")
    net, history = train_dml(backbone_state, "swin_t", imgs, labels, "ms", settings, device="cpu")
    assert history and np.isfinite(history[0]["loss"])
    # only the last stage, the final norm and the head learned
    for k, v in net.state_dict().items():
        if k.startswith("features.1."):
            assert torch.equal(v, backbone_state[k]), k
    path = tmp_path / "swin_ms.pth"
    save_trained(path, net, "ms")
    saved = torch.load(path, weights_only=True)["model"]
    assert saved["class_fc.weight"].shape == (512, 768) and not any(k.startswith("head.") for k in saved)
    model = load_model("swin_t", "ms", path)
    feats = extract_features(model, imgs[:3], "ms")
    assert feats["embedding"].shape == (3, 512)
    for i in range(2):
        ref = reference_features(model, imgs[i], "ms")
        for k, v in ref.items():
            a = feats[k][i].astype(np.float64)
            cos = (a @ v) / max(np.linalg.norm(a) * np.linalg.norm(v), 1e-30)
            assert cos >= 0.9999 or (np.linalg.norm(a) == 0 and np.linalg.norm(v) == 0), (k, cos)


def test_swin_refuses_proxy_anchor_head(backbone_state):
    imgs, labels = _images()
    with pytest.raises(ValueError, match="ms head"):
        train_dml(backbone_state, "swin_t", imgs, labels, "proxy_anchor", TrainSettings(epochs=1, image_size=64,
                                                                                         batch_size=8, m_per_class=2))
