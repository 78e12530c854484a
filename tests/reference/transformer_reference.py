"""Plain reference implementation of TRANSFORMERS.md (Swin and ViT CFGA), a test oracle.

Design rules (deliberately unlike the fast path in ``cfga``):

* batch size 1, one image at a time;
* the whole torchvision model runs with autograd, every parameter ``requires_grad``; one plain
  ``backward()`` of L; the CFGA gradients are the weights' ``.grad`` (method.md §T8);
* the token map and the class token come from torchvision's own modules (§2);
* mask, scalar and image-level features written out per channel in numpy / float64 (§3, §4).

Nothing here imports from the ``cfga`` package. Preprocessing (§7) and the gradient → vector
transform (§5 = method.md §5.2 for 1×1 kernels) are ``spec_reference``'s, themselves independent.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as TF

from tests.reference.spec_reference import _l2n, preprocess, reference_grad_to_vector, reference_lcc

# Preprocessing of each protocol in spec_reference's terms: scda_224 is proxy_anchor's
# Resize(256) + CenterCrop(224); ms is ms.
_PREPROCESS = {"scda": "scda", "scda_224": "proxy_anchor", "ms": "ms"}
LAYERS = ("qkv", "proj", "fc1", "fc2")


def family(model: nn.Module) -> str:
    from torchvision.models import SwinTransformer, VisionTransformer

    if isinstance(model, SwinTransformer):
        return "swin"
    if isinstance(model, VisionTransformer):
        return "vit"
    raise TypeError(type(model).__name__)


def cfga_parameters(model: nn.Module) -> Tuple[Tuple[str, str], ...]:
    """(feature name, parameter name) of the eight CFGA weights (method.md §T5, §6)."""
    if family(model) == "swin":
        s = len(model.features) - 1
        n = len(model.features[s])
        blocks = (("4_0", f"features.{s}.{n - 2}"), ("4_1", f"features.{s}.{n - 1}"))
        suffix = ("attn.qkv.weight", "attn.proj.weight", "mlp.0.weight", "mlp.3.weight")
    else:
        L = len(model.encoder.layers)
        blocks = tuple((str(k), f"encoder.layers.encoder_layer_{k}") for k in (L - 2, L - 1))
        suffix = ("self_attention.in_proj_weight", "self_attention.out_proj.weight", "mlp.0.weight",
                  "mlp.3.weight")
    return tuple((f"cfga_{b}_{layer}", f"{prefix}.{s}") for b, prefix in blocks for layer, s in zip(LAYERS, suffix))


def token_map(model: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor | None]:
    """(F [C, h, w], class token [C] or None) of a [1, 3, H, W] input, not detached (§2)."""
    if family(model) == "swin":
        return model.permute(model.norm(model.features(x)))[0], None
    t = model._process_input(x)
    T = model.encoder(torch.cat([model.class_token.expand(1, -1, -1), t], dim=1))[0]
    g = model.image_size // model.patch_size
    return T[1:].reshape(g, g, -1).permute(2, 0, 1), T[0]


def reference_mask(F: torch.Tensor, lcc: bool) -> np.ndarray:
    """§3: S = Σ_c F (float32), B = S > mean(S); LCC (empty B: the whole map) or B itself
    (empty B: the whole map, the documented fallback)."""
    S = F.detach().sum(dim=0)
    B = (S > S.mean()).numpy()
    if lcc:
        return reference_lcc(B)
    return B if B.any() else np.ones_like(B)


def reference_scalar(F: torch.Tensor, M: np.ndarray) -> torch.Tensor:
    """§4: per channel, the value at the first (row-major) maximum among the masked cells, plus the
    masked sum over |M|."""
    C = F.shape[0]
    flat = F.reshape(C, -1)
    cells = np.flatnonzero(M.reshape(-1))  # masked cells in row-major order
    vals = flat.detach().numpy()[:, cells]
    first = cells[np.argmax(vals, axis=1)]  # np.argmax: first maximum
    mx = flat[torch.arange(C), torch.from_numpy(first)]
    avg = flat[:, torch.from_numpy(cells)].sum(dim=1) / len(cells)
    return mx.sum() + avg.sum()


def _image_features(Fn: np.ndarray, M: np.ndarray) -> Dict[str, np.ndarray]:
    """§3 in float64, over the masked cells only."""
    C = Fn.shape[0]
    flat = Fn.reshape(C, -1).astype(np.float64)
    sel = flat[:, M.reshape(-1)]
    avg, mx = sel.mean(axis=1), sel.max(axis=1)
    return {
        "scda": _l2n(np.concatenate([avg, mx])),
        "scda_original": np.concatenate([_l2n(avg), _l2n(mx)]),
        "pooling": _l2n(np.concatenate([flat.mean(axis=1), flat.max(axis=1)])),
    }


def expected_keys(model: nn.Module, protocol: str) -> Tuple[str, ...]:
    cfga = tuple(k for k, _ in cfga_parameters(model)) + ("cfga_plus",)
    if protocol == "ms":
        return ("embedding", "scda", "scda_original") + cfga
    return ("pooling", "scda", "scda_original") + (("class_token",) if family(model) == "vit" else ()) + cfga


def reference_features(model: nn.Module, image, protocol: str) -> Dict[str, np.ndarray]:
    """All features of one image (path, PIL image or a preprocessed [1, 3, H, W] tensor)."""
    x = image if isinstance(image, torch.Tensor) else preprocess(image, _PREPROCESS[protocol])
    if x.dim() == 3:
        x = x.unsqueeze(0)
    assert x.shape[0] == 1, "batch size must be 1"
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        F, cls = token_map(model, x)
        M = reference_mask(F, lcc=protocol != "ms")
        L = reference_scalar(F, M)
        L.backward()
    params = dict(model.named_parameters())
    out: Dict[str, np.ndarray] = {}
    for key, pname in cfga_parameters(model):
        G = params[pname].grad.detach().numpy()
        out[key] = reference_grad_to_vector(G[:, :, None, None])
    qkv = [k for k, _ in cfga_parameters(model) if k.endswith("_qkv")]
    out["cfga_plus"] = np.concatenate([out[qkv[0]], out[qkv[1]]])
    Fn = F.detach().numpy()
    out.update(_image_features(Fn, M))
    if cls is not None:
        out["class_token"] = _l2n(cls.detach().numpy().astype(np.float64))
    if protocol == "ms":
        with torch.no_grad():
            gmp = F.detach().reshape(F.shape[0], -1).max(dim=1).values
            e = TF.normalize(model.head(gmp[None]), dim=1)[0].numpy()
        out["embedding"] = _l2n(e.astype(np.float64))
    model.zero_grad(set_to_none=True)
    return {k: np.asarray(out[k], dtype=np.float32) for k in expected_keys(model, protocol)}


def jitter_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random LayerNorm affine parameters: at init (weight 1, bias 0) every token's channels sum
    to ~0, so the mask S > mean(S) would be float noise; trained nets are never like that."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
    return model
