"""Fixtures shared by every test module.

* ``torch_threads`` (autouse): each test runs with a known torch thread count, 1 unless marked
  ``@pytest.mark.threads(n)``, and the previous count is restored after it. One thread keeps CPU
  results independent of the machine and the suite polite on a shared machine.
* One small model: a random ResNet-50 initialised under seed 0 (``resnet50``, built once per
  session; tests that change it take ``resnet50_copy``), its state dict (``resnet50_state``), that
  state saved once as a checkpoint file (``resnet50_checkpoint``), and its trunk with a 512-d DML
  head (``resnet50_dml``).
* ``tiny_images``: PNG files of at most 32 px a side (a 1×1 layer4 map).
"""
from __future__ import annotations

import copy

import pytest
from PIL import Image

from tests.helpers import TINY_SIZES, rgb


@pytest.fixture(scope="session", autouse=True)
def _torch_threads_session():
    """One thread for what session and module fixtures compute too (they are set up before a
    test's own fixtures); the process's setting is restored at the end."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def torch_threads(request, _torch_threads_session):
    import torch

    marker = request.node.get_closest_marker("threads")
    n = marker.args[0] if marker else 1
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    yield n
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def resnet50_state(_resnet50_shared):
    """The state dict of ``resnet50`` (a copy: the same numbers as a torchvision ResNet-50
    initialised under seed 0). Shared by the session: never change its tensors in place."""
    return {k: v.detach().clone() for k, v in _resnet50_shared.state_dict().items()}


@pytest.fixture(scope="session")
def resnet50_checkpoint(tmp_path_factory, resnet50_state):
    """``resnet50_state`` saved once (a torchvision state-dict file), read-only: copy it to edit."""
    import torch

    path = tmp_path_factory.mktemp("resnet50") / "resnet50_seed0.pth"
    torch.save(resnet50_state, path)
    path.chmod(0o444)
    return path


@pytest.fixture(scope="session")
def resnet50_dml(resnet50_state):
    """A ResNet-50 with the DML embedding head of the authors' formats: ``resnet50_state``'s trunk,
    a seeded Linear(2048, 512) fc and non-trivial BN buffers (so that a mix-up of buffers shows),
    eval mode. Shared by the session: never change it."""
    import torch
    import torchvision
    from torch import nn

    with torch.device("meta"):
        m = torchvision.models.resnet50()
    m.load_state_dict({k: v.clone() for k, v in resnet50_state.items()}, assign=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m.fc = nn.Linear(2048, 512)
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.running_mean.uniform_(-0.1, 0.1)
                    mod.running_var.uniform_(0.5, 1.5)
                    mod.num_batches_tracked.fill_(7)
    return m.eval()


@pytest.fixture(scope="session")
def _resnet50_shared():
    from tests.reference.spec_reference import build_dml_model

    return build_dml_model("resnet50", seed=0)


def _fingerprint(model):
    # Every in-place change of a tensor (also under no_grad, also load_state_dict) bumps its version.
    return model.training, [(t.data_ptr(), t._version) for t in model.state_dict(keep_vars=True).values()]


@pytest.fixture
def resnet50(_resnet50_shared):
    """A random ResNet-50 (seed 0; torchvision layout, fc 1000, eval mode) shared by the session:
    fine for the scda and dgpcrl protocols. A test must not change it (take ``resnet50_copy``);
    that it did not is checked afterwards."""
    before = _fingerprint(_resnet50_shared)
    yield _resnet50_shared
    assert _fingerprint(_resnet50_shared) == before, "a test changed the shared resnet50; use resnet50_copy"


@pytest.fixture
def resnet50_copy(_resnet50_shared):
    """A private copy of ``resnet50``, free to change."""
    return copy.deepcopy(_resnet50_shared)


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory):
    """Paths of PNGs of TINY_SIZES (h, w), in that order."""
    root = tmp_path_factory.mktemp("tiny")
    paths = []
    for i, (h, w) in enumerate(TINY_SIZES):
        p = root / f"tiny_{h}x{w}.png"
        Image.fromarray(rgb(h, w, 10 + i)).save(p)
        paths.append(p)
    return paths
