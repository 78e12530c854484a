"""Swin / ViT extraction (TRANSFORMERS.md) against the independent reference in
tests/reference/transformer_reference.py: every feature, cosine ≥ 0.9999 per row, batched.

Small torchvision Swin / ViT configurations (the real classes, few channels) keep the whole
network backward of the reference affordable on a 2-core CPU; one test runs the real swin_t.
"""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2
from torchvision.models.vision_transformer import VisionTransformer

from cfga import extract_features
from tests.reference.transformer_reference import expected_keys, jitter_norms, reference_features

MIN_COSINE = 0.9999


def small_swin(v2=False, seed=0):
    torch.manual_seed(seed)
    kw = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if v2 else {}
    net = SwinTransformer([4, 4], 16, [1, 1, 2, 2], [1, 1, 2, 2], [7, 7], **kw)
    return jitter_norms(net, seed).eval()


def small_vit(seed=0, layers=3):
    torch.manual_seed(seed)
    net = VisionTransformer(image_size=224, patch_size=32, num_layers=layers, num_heads=2, hidden_dim=48,
                            mlp_dim=96)
    return jitter_norms(net, seed).eval()


# (h, w): mixed sizes (several of one size so a batch holds more than one), above/below 256, a
# flat image with a rectangle (ties in the map), a tiny one (1×1 token map).
SIZES = [(96, 128), (96, 128), (96, 128), (300, 260), (70, 90), (96, 128), (20, 24)]


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    out = []
    for i, (h, w) in enumerate(SIZES):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        if i == 1:
            img = Image.new("RGB", (w, h), (120, 130, 140))
            ImageDraw.Draw(img).rectangle([w // 4, h // 4, w // 2, h // 2], fill=(250, 10, 10))
        out.append(img)
    return out


def _cos(a, b):
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    c = (a * b).sum(axis=1) / np.maximum(na * nb, 1e-30)
    return np.where(both_zero, 1.0, c)


def _check_against_reference(net, images, protocol, batch_size=4):
    got = extract_features(net, images, protocol, batch_size=batch_size)
    refs = [reference_features(net, im, protocol) for im in images]
    assert tuple(got) == expected_keys(net, protocol)
    for name, arr in got.items():
        assert arr.dtype == np.float32 and arr.shape[0] == len(images)
        ref = np.stack([r[name] for r in refs])
        assert arr.shape == ref.shape, name
        cos = _cos(arr.astype(np.float64), ref.astype(np.float64))
        assert cos.min() >= MIN_COSINE, (name, cos)
    return got


@pytest.mark.parametrize("v2", [False, True], ids=["swin_v1", "swin_v2"])
def test_swin_scda_matches_reference(images, v2):
    torch.set_num_threads(1)
    _check_against_reference(small_swin(v2), images, "scda")


def test_swin_scda_224_matches_reference(images):
    torch.set_num_threads(1)
    _check_against_reference(small_swin(), images[2:6], "scda_224", batch_size=3)


def test_vit_scda_224_matches_reference(images):
    torch.set_num_threads(1)
    got = _check_against_reference(small_vit(), images[:5], "scda_224", batch_size=2)
    assert "class_token" in got and "cfga_1_qkv" in got and "cfga_2_fc2" in got


def test_swin_ms_matches_reference(images):
    torch.set_num_threads(1)
    net = small_swin(seed=3)
    net.head = torch.nn.Linear(net.head.in_features, 512)
    got = _check_against_reference(net, images[:4], "ms", batch_size=4)
    assert got["embedding"].shape == (4, 512)


def test_rows_do_not_depend_on_the_batch(images):
    torch.set_num_threads(1)
    net = small_swin(seed=1)
    a = extract_features(net, images, "scda", batch_size=8)
    b = extract_features(net, images, "scda", batch_size=1)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=2e-6, err_msg=k)


def test_real_swin_t_matches_reference(images):
    """torchvision's own swin_t builder, two small images in one batch."""
    from torchvision.models import swin_t

    torch.set_num_threads(2)
    torch.manual_seed(0)
    net = jitter_norms(swin_t(), 1).eval()
    got = _check_against_reference(net, [images[0], images[4]], "scda")
    assert got["cfga_4_0_qkv"].shape == (2, 768) and got["cfga_4_1_fc2"].shape == (2, 3072)


def test_vit_refuses_scda(images):
    with pytest.raises(ValueError, match="scda_224"):
        extract_features(small_vit(), images[:1], "scda")


def test_empty_image_list_has_every_feature():
    out = extract_features(small_vit(), [], "scda_224")
    assert out["cfga_2_fc2"].shape == (0, 96) and out["cfga_2_qkv"].shape == (0, 48)
    assert out["pooling"].shape == (0, 96) and out["class_token"].shape == (0, 48)


@pytest.mark.parametrize("zero_rows", [0, 30])
def test_linear_vectors_batched_and_per_image_paths_agree_with_the_reference(zero_rows):
    """The CPU per-image path (skipping zero-gradient tokens) and the batched path used on GPUs
    both equal method.md §5.2 on each image's own dYᵀX."""
    from cfga.numerics.gradients import linear_vectors
    from tests.reference.spec_reference import reference_grad_to_vector

    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 40, 24, generator=g)
    dY = torch.randn(3, 40, 36, generator=g)
    dY[:, :zero_rows] = 0
    X[:, 40 - zero_rows // 3:] = 0  # padding-like tokens: zero input rows
    a = linear_vectors(X, dY, batched=False).numpy()
    b = linear_vectors(X, dY, batched=True).numpy()
    for n in range(3):
        ref = reference_grad_to_vector((dY[n].T @ X[n]).numpy()[:, :, None, None])
        assert _cos(a[n][None], ref[None])[0] >= 0.99999 and _cos(b[n][None], ref[None])[0] >= 0.99999
