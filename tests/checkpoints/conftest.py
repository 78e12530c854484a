"""Checkpoints of every format written once per session from ``resnet50_dml`` (tests/conftest.py):
as files and as the in-memory objects torch.load returns."""
import pytest
import torch

from cfga.checkpoints.save import (
    _trunk_of,
    dgpcrl_state,
    ms_state,
    proxy_anchor_state,
    save_dgpcrl,
    save_ms,
    save_proxy_anchor,
)

WRITERS = {
    "ms": save_ms,
    "proxy_anchor": save_proxy_anchor,
    "dgpcrl": lambda path, net: save_dgpcrl(path, net, n_cls=100, seed=3),
    "torchvision": lambda path, net: torch.save(
        {**_trunk_of(net), "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}, path
    ),
}


@pytest.fixture(scope="session")
def net(resnet50_dml):
    return resnet50_dml


@pytest.fixture(scope="session")
def trunk(net):
    return _trunk_of(net)


@pytest.fixture(scope="session")
def files(net, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    out = {}
    for fmt, write in WRITERS.items():
        out[fmt] = d / f"{fmt}.pth"
        write(out[fmt], net)
    return out


@pytest.fixture(scope="session")
def objs(net):
    """In-memory checkpoint objects (what torch.load returns), for the cheap error tests."""
    return {
        "ms": ms_state(net),
        "proxy_anchor": proxy_anchor_state(net),
        "dgpcrl": dgpcrl_state(net, 100, seed=3),
    }
