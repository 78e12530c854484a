"""Decoding and batching images for extraction (cfga.extraction.loaders): decode-ahead, parallel
decoding and the DataLoader give the same bytes; a bad image in a worker is still named."""
import pytest
import torch

from cfga import extract_features, load_model
from cfga.extraction.preprocess import ImageError


@pytest.mark.slow
def test_in_process_loaders_equal_the_dataloader_path(images, checkpoint, monkeypatch):
    """Decoding ahead (background thread), in parallel (each batch on every core) and the
    DataLoader (a worker process) give the same bytes."""
    import cfga.extraction.loaders as extract_mod

    model = load_model("resnet50", "scda", checkpoint, device="cpu")
    subset = images[:5]
    calls = []
    for name in ("_decode_ahead", "_decode_parallel"):
        real = getattr(extract_mod, name)
        monkeypatch.setattr(extract_mod, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    monkeypatch.setattr(extract_mod, "DECODE_AHEAD", True)
    ahead = extract_features(model, subset, "scda", batch_size=2)
    monkeypatch.setattr(extract_mod, "DECODE_AHEAD", False)
    parallel = extract_features(model, subset, "scda", batch_size=2)
    loader = extract_features(model, subset, "scda", batch_size=2, num_workers=1)
    assert calls == ["_decode_ahead", "_decode_parallel"]  # the DataLoader run used neither
    for name in ahead:
        assert ahead[name].tobytes() == parallel[name].tobytes() == loader[name].tobytes(), name


def test_decode_ahead_auto_only_with_a_free_core(monkeypatch):
    """'auto' decodes ahead only when torch's threads leave a core idle (on a saturated CPU the
    decode thread slows the convolutions more than it saves)."""
    import cfga.extraction.loaders as extract_mod

    threads = torch.get_num_threads()
    monkeypatch.setattr(extract_mod, "usable_cores", lambda: threads)
    assert not extract_mod.decode_ahead_wanted("auto")
    monkeypatch.setattr(extract_mod, "usable_cores", lambda: threads + 1)
    assert extract_mod.decode_ahead_wanted("auto")
    assert extract_mod.decode_ahead_wanted(True) and not extract_mod.decode_ahead_wanted(False)
    with pytest.raises(ValueError, match="DECODE_AHEAD"):
        extract_mod.decode_ahead_wanted("yes")


def test_bad_image_in_a_dataloader_worker_still_names_it(resnet50, bad):
    """With workers (the CUDA default) the error crosses a process boundary: still an ImageError,
    still naming the file. The culprit comes first so no forward pass runs."""
    with pytest.raises(ImageError) as ei:
        extract_features(resnet50, [bad["trunc_scan"], bad["good"]], "scda", num_workers=1)
    assert "trunc_scan.jpg" in str(ei.value)
