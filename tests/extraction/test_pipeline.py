"""extract_features against the independent SPEC reference (tests/reference), batched vs batch 1."""
import numpy as np
import pytest
import torch
from PIL import Image

from cfga import extract_features, load_model
from cfga.registry.features import FEATURES, features_for
from tests.helpers import SIZES
from tests.reference.spec_reference import (
    build_dml_model,
    jitter_bn,
    reference_features,
)

MIN_COSINE = 0.9999


def _reference_model(path):
    model = build_dml_model("resnet50", seed=0)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def _cosines(a, b):
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = (a * b).sum(1) / np.where(both_zero, 1, na * nb)
    return np.where(both_zero, 1.0, cos)


@pytest.mark.slow
def test_every_feature_matches_reference(images, checkpoint):
    model = load_model("resnet50", "scda", checkpoint, device="cpu")
    feats = extract_features(model, images, "scda", batch_size=4)
    ref_model = _reference_model(checkpoint)
    refs = [reference_features(ref_model, p, "scda") for p in images]
    assert list(feats) == list(features_for("scda"))
    for name, arr in feats.items():
        assert arr.dtype == np.float32 and arr.shape == (len(images), FEATURES[name].dim)
        ref = np.stack([r[name] for r in refs])
        cos = _cosines(arr.astype(np.float64), ref.astype(np.float64))
        assert cos.min() >= MIN_COSINE, f"{name}: min cosine {cos.min()} at row {cos.argmin()}"
        # CFGA features are not trivially all-zero on this model
        assert (np.linalg.norm(arr, axis=1) > 0).mean() > 0.5, name


@pytest.mark.slow
def test_batched_equals_batch_size_one_and_is_deterministic(images, checkpoint):
    model = load_model("resnet50", "scda", checkpoint, device="cpu")
    a = extract_features(model, images, "scda", batch_size=8)
    b = extract_features(model, images, "scda", batch_size=1)
    c = extract_features(model, images, "scda", batch_size=8)
    for name in a:
        assert _cosines(a[name].astype(np.float64), b[name].astype(np.float64)).min() >= MIN_COSINE, name
        assert np.array_equal(a[name], c[name]), f"{name}: two CPU runs differ"


@pytest.mark.slow
def test_gpu_batched_cfga_path_matches_reference_on_cpu(images, checkpoint, monkeypatch):
    """The batched CFGA step that CUDA uses (cfga.gradients.batched_kernel_responses), forced on
    the CPU so CI covers it: every feature still matches the SPEC reference."""
    import functools

    import cfga.backbones.resnet as resnet_mod
    import cfga.numerics.gradients as gradients_mod

    calls = []
    real = gradients_mod.batched_kernel_responses
    monkeypatch.setattr(gradients_mod, "batched_kernel_responses", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(resnet_mod, "cfga_vectors", functools.partial(gradients_mod.cfga_vectors, batched=True))
    model = load_model("resnet50", "scda", checkpoint, device="cpu")
    feats = extract_features(model, images, "scda", batch_size=4)
    assert calls
    ref_model = _reference_model(checkpoint)
    for i, p in enumerate(images):
        ref = reference_features(ref_model, p, "scda")
        for name in feats:
            cos = _cosines(feats[name][i : i + 1].astype(np.float64), ref[name][None].astype(np.float64))[0]
            assert cos >= MIN_COSINE, f"{name} image {i}: cosine {cos}"


def test_pil_inputs_equal_paths(images, checkpoint):
    model = load_model("resnet50", "scda", checkpoint, device="cpu")
    pils = [Image.open(p) for p in images[:3]]
    a = extract_features(model, pils, "scda")
    b = extract_features(model, images[:3], "scda")
    for name in a:
        assert np.array_equal(a[name], b[name]), name


@pytest.mark.slow
def test_resnet101_matches_reference(tmp_path, images):
    model = jitter_bn(build_dml_model("resnet101", seed=2), seed=1, images=images[:2])
    path = tmp_path / "r101.pth"
    torch.save(model.state_dict(), path)
    feats = extract_features(load_model("resnet101", "scda", path, device="cpu"), images[:2], "scda")
    ref_model = build_dml_model("resnet101", seed=0)
    ref_model.load_state_dict(torch.load(path, weights_only=True))
    for i, p in enumerate(images[:2]):
        ref = reference_features(ref_model.eval(), p, "scda")
        for name in feats:
            assert _cosines(feats[name][i : i + 1].astype(np.float64), ref[name][None].astype(np.float64))[0] >= MIN_COSINE


def test_training_mode_model_is_refused(images, checkpoint):
    model = load_model("resnet50", "scda", checkpoint, device="cpu").train()
    with pytest.raises(ValueError, match="eval"):
        extract_features(model, images[:1], "scda")


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["ms", "proxy_anchor", "dgpcrl"])
def test_dml_protocols_match_reference(images, protocol):
    model = jitter_bn(build_dml_model("resnet50", seed=7, protocol=protocol), seed=3, images=images[:3],
                      protocol=protocol)
    imgs = [p for p, (h, w, _) in zip(images, SIZES) if min(h, w) > 32][:5]
    feats = extract_features(model, imgs, protocol, batch_size=4)
    assert list(feats) == list(features_for(protocol))
    for i, p in enumerate(imgs):
        ref = reference_features(model, p, protocol)
        assert set(ref) >= set(feats)
        for name in feats:
            cos = _cosines(feats[name][i : i + 1].astype(np.float64), ref[name][None].astype(np.float64))[0]
            assert cos >= MIN_COSINE, f"{protocol}/{name} image {i}: cosine {cos}"


def test_empty_mask_without_lcc_falls_back_to_whole_map(images, resnet50, caplog):
    """method.md S6: a ≤ 32 px image gives a 1×1 map; the authors crash without LCC, we use the whole map."""
    model = resnet50  # the dgpcrl protocol reads a plain torchvision ResNet-50 (fc 1000)
    tiny = [p for p, (h, w, _) in zip(images, SIZES) if min(h, w) <= 32]
    with caplog.at_level("WARNING", logger="cfga.extraction.pipeline"):
        feats = extract_features(model, tiny, "dgpcrl")
    assert "empty SCDA mask" in caplog.text
    # whole-map mask: SCDA equals Pooling's [avg; max] on the 1×1 map
    np.testing.assert_allclose(feats["scda"], feats["embedding"], rtol=1e-6)
    assert all(np.isfinite(v).all() for v in feats.values())


@pytest.mark.slow
def test_rows_do_not_depend_on_batch_composition(images, checkpoint):
    """On CPU a row is bit-identical whatever else is in its batch (sharded extraction relies on
    it): the three 300×400 images together, one + two, and in another order."""
    model = load_model("resnet50", "scda", checkpoint, device="cpu")
    same = [images[i] for i, (h, w, _) in enumerate(SIZES) if (h, w) == (300, 400)]
    assert len(same) == 3
    together = extract_features(model, same, "scda", batch_size=8)
    first = extract_features(model, same[:1], "scda", batch_size=8)
    rest = extract_features(model, same[1:], "scda", batch_size=8)
    shuffled = extract_features(model, [same[2], same[0], same[1]], "scda", batch_size=8)
    for name in together:
        split = np.concatenate([first[name], rest[name]])
        assert together[name].tobytes() == split.tobytes(), name
        assert together[name].tobytes() == shuffled[name][[1, 2, 0]].tobytes(), name
