"""The DML embedding heads (cfga.backbones.heads, method.md §4.4)."""
import pytest
import torch
import torch.nn.functional as Fn

from cfga.backbones.heads import dml_embedding, head_embedding, trunk_features


@pytest.fixture
def net(resnet50_dml):
    return resnet50_dml


def test_embedding_heads_follow_spec_4_4(net):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        F = trunk_features(net, x)
        assert F.shape[:2] == (2, 2048) and (F >= 0).all()
        W, b = net.fc.weight, net.fc.bias
        gmp, gap = F.amax(dim=(2, 3)), F.mean(dim=(2, 3))
        ms = Fn.normalize(gmp @ W.T + b, dim=1)
        z = (gmp + gap) @ W.T + b
        proxy = z / torch.sqrt((z**2).sum(1, keepdim=True) + 1e-12)
        torch.testing.assert_close(dml_embedding(net, x, "ms"), ms)
        torch.testing.assert_close(dml_embedding(net, x, "proxy_anchor"), proxy)
    with pytest.raises(ValueError, match="unknown embedding head"):
        head_embedding(net.fc, F, "dgpcrl")
