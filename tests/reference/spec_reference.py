"""Plain reference implementation of the CFGA specification (SPEC.md), used as a test oracle.

Design rules (deliberately different from a fast implementation):

* batch size 1, one image at a time;
* autograd through the WHOLE network (every parameter has ``requires_grad=True``), like the
  authors' code;
* the back-propagated scalar is built in the authors' float order (method.md §4.5);
* CFGA selection / aggregation in torch float32, normalisation in numpy float32 (method.md §5);
* SCDA features in float64 for the LCC protocol and float32 otherwise (method.md §4.2);
* metrics as literal per-query Python loops (method.md §8.1, 8.3).

Nothing here imports from the ``cfga`` package: independence is the point.

Section numbers in comments refer to docs/method.md.
"""

from __future__ import annotations

import os
from typing import Dict, Iterable, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as TF
import torchvision
from PIL import Image

__all__ = [
    "PROTOCOLS",
    "CFGA_LAYERS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "load_rgb",
    "scda_resize_size",
    "dml_resize_size",
    "center_crop_offsets",
    "cap_700",
    "preprocess",
    "trunk_forward",
    "reference_lcc",
    "reference_mask",
    "reference_grad_to_vector",
    "reference_scalar",
    "reference_features",
    "reference_recall_at_k",
    "reference_map_at_r",
    "build_dml_model",
    "jitter_bn",
    "expected_keys",
]

PROTOCOLS = ("scda", "dgpcrl", "ms", "proxy_anchor")

# (paper name, parameter name) in named_parameters() order (method.md §5.4).
CFGA_LAYERS = (
    ("cfga_4_1_1", "layer4.1.conv1.weight"),
    ("cfga_4_1_2", "layer4.1.conv2.weight"),
    ("cfga_4_1_3", "layer4.1.conv3.weight"),
    ("cfga_4_2_1", "layer4.2.conv1.weight"),
    ("cfga_4_2_2", "layer4.2.conv2.weight"),
    ("cfga_4_2_3", "layer4.2.conv3.weight"),
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageLike = Union[str, os.PathLike, Image.Image]


# ----------------------------------------------------------------------------------------------
# Section 2: preprocessing
# ----------------------------------------------------------------------------------------------


def load_rgb(image: ImageLike) -> Image.Image:
    """``PIL.Image.open(path).convert('RGB')`` (alpha dropped, not composited)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as im:
        return im.convert("RGB")


def scda_resize_size(h: int, w: int, short: int = 256) -> Tuple[int, int]:
    """Target (H, W) of the scda (short=256) / dgpcrl (short=280) loaders.

    Only shrinks: if min(h, w) > short, each side becomes int(round(side * (short / m))),
    the ratio computed first, Python (half-to-even) round. Otherwise the size is unchanged.
    """
    m = min(h, w)
    if m > short:
        ratio = short / m
        return int(round(h * ratio)), int(round(w * ratio))
    return h, w


def dml_resize_size(h: int, w: int, size: int = 256) -> Tuple[int, int]:
    """torchvision ``Resize(256)`` on a PIL image (legacy semantics): short side -> 256,
    long side -> int(256 * long / short) (truncated); also upsamples; unchanged when the
    short side is already 256."""
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def center_crop_offsets(h: int, w: int, crop: int) -> Tuple[int, int]:
    """CenterCrop offsets (top, left) = int(round((H - crop) / 2)), half to even."""
    return int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))


def _pil_bilinear(img: Image.Image, h: int, w: int) -> Image.Image:
    # PIL's own (anti-aliased) bilinear filter, as torchvision uses for PIL images.
    if (img.height, img.width) == (h, w):
        return img
    return img.resize((w, h), Image.Resampling.BILINEAR)


def _to_normalized_tensor(img: Image.Image) -> torch.Tensor:
    """ToTensor (uint8 -> float32 / 255) then Normalize((x - mean) / std), float32."""
    arr = np.asarray(img, dtype=np.uint8)  # [H, W, 3]
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    x = x.to(torch.float32).div(255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
    x = (x - mean) / std
    return x.unsqueeze(0)


def cap_700(x: torch.Tensor) -> torch.Tensor:
    """The authors' dead "700 cap" (method.md §2, S1): if min(h, w) > 700, bilinearly resize the
    tensor (align_corners=True) to (int(h*(700/m)), int(w*(700/m))). Never fires after the
    protocol loaders, kept for fidelity."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    m = min(h, w)
    if m > 700:
        x = TF.interpolate(
            x,
            size=(int(h * (700 / m)), int(w * (700 / m))),
            mode="bilinear",
            align_corners=True,
        )
    return x


def preprocess(image: ImageLike, protocol: str) -> torch.Tensor:
    """Load + resize/crop + ToTensor + Normalize (+ dead 700 cap). Returns [1, 3, H, W] float32."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}")
    img = load_rgb(image)
    w, h = img.size
    if protocol in ("scda", "dgpcrl"):
        short = 256 if protocol == "scda" else 280
        H, W = scda_resize_size(h, w, short)
        img = _pil_bilinear(img, H, W)
    else:
        crop = 227 if protocol == "ms" else 224
        H, W = dml_resize_size(h, w, 256)
        img = _pil_bilinear(img, H, W)
        top, left = center_crop_offsets(H, W, crop)
        if top < 0 or left < 0:  # cannot happen after Resize(256); guard anyway
            raise ValueError("image smaller than the crop after Resize(256)")
        img = img.crop((left, top, left + crop, top + crop))
    x = _to_normalized_tensor(img)
    return cap_700(x)


# ----------------------------------------------------------------------------------------------
# Section 3: forward
# ----------------------------------------------------------------------------------------------


def trunk_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision ResNet up to the output of layer4 (after its final ReLU)."""
    x = model.conv1(x)
    x = model.bn1(x)
    x = model.relu(x)
    x = model.maxpool(x)
    x = model.layer1(x)
    x = model.layer2(x)
    x = model.layer3(x)
    x = model.layer4(x)
    return x


# ----------------------------------------------------------------------------------------------
# Section 4.1: mask
# ----------------------------------------------------------------------------------------------


def reference_lcc(B: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of the boolean map B (method.md §4.1).

    Labels with skimage (connectivity=1, background=0). Ties go to the lowest label number
    (the loop replaces the best only on a strictly larger count). If B is empty the best label
    stays 0 and ``label == 0`` -- the whole map -- is returned.
    """
    from skimage.measure import label as sk_label

    B = np.asarray(B, dtype=bool)
    labels = sk_label(B.astype(np.int64), connectivity=1, background=0)
    best_label, best_count = 0, 0
    for lab in range(1, int(labels.max()) + 1):
        count = int((labels == lab).sum())
        if count > best_count:  # strict: ties keep the earlier (lower) label
            best_label, best_count = lab, count
    return labels == best_label


def reference_mask(F: torch.Tensor, lcc: bool) -> Tuple[np.ndarray, int]:
    """SCDA mask of a [1, C, h, w] (or [C, h, w]) layer4 map. Returns (bool mask [h, w], a).

    S = float32 torch sum over channels, mu = float32 torch mean, B = S > mu (strict).
    No-LCC with an empty B raises ValueError (the authors divide by zero there).
    """
    Fd = F.detach()
    if Fd.dim() == 4:
        Fd = Fd[0]
    S = Fd.sum(dim=0)
    mu = S.mean()
    B = (S > mu).numpy()
    if lcc:
        M = reference_lcc(B)
    else:
        M = B
        if not M.any():
            raise ValueError(
                "empty SCDA mask (S constant) without LCC: the authors' code divides by zero here"
            )
    return M, int(M.sum())


# ----------------------------------------------------------------------------------------------
# Section 5: CFGA transform of a weight gradient
# ----------------------------------------------------------------------------------------------


def _l2n(v: np.ndarray) -> np.ndarray:
    """numpy L2 normalisation in v's dtype; a zero-norm vector becomes zeros."""
    n = np.linalg.norm(v)
    if n == 0:
        return np.zeros_like(v)
    return v / n


def reference_grad_to_vector(G: np.ndarray) -> np.ndarray:
    """CFGA (method.md §5.1-5.2): weight gradient [C_out, C_in, k, k] -> unit vector [C_in] (float32).

    * 3x3: r = max(G) + max(-G) + unbiased std over the 9 taps (no abs);
    * 1x1: r = |G|;
    * keep = (r > mean_o r) & (r > mean_i r), both strict;
    * v = mean over OUTPUT channels of r * keep;  feature = v / ||v|| (zeros if ||v|| == 0).
    """
    G = np.asarray(G, dtype=np.float32)
    if G.ndim != 4:
        raise ValueError("expected a [C_out, C_in, k, k] gradient")
    c_out, c_in, kh, kw = G.shape
    g = torch.from_numpy(np.ascontiguousarray(G))
    if (kh, kw) == (1, 1):
        r = g[:, :, 0, 0].abs()
    else:
        flat = g.reshape(c_out, c_in, kh * kw)
        r = flat.max(dim=2).values + (-flat).max(dim=2).values + flat.std(dim=2)
    colmean = r.mean(dim=0)  # [C_in]  (mean over output channels)
    rowmean = r.mean(dim=1)  # [C_out] (mean over input channels)
    keep = (r > colmean[None, :]) & (r > rowmean[:, None])
    v = (r * keep.to(r.dtype)).mean(dim=0)  # mean over OUTPUT channels, zeros count
    v = v.numpy().astype(np.float32)
    return _l2n(v).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Sections 4.2 - 4.5 and 5: per-image features
# ----------------------------------------------------------------------------------------------


def expected_keys(protocol: str) -> Tuple[str, ...]:
    cfga = tuple(k for k, _ in CFGA_LAYERS) + ("cfga_plus",)
    if protocol == "scda":
        return ("pooling", "scda", "scda_original") + cfga
    if protocol == "dgpcrl":
        return ("pooling", "embedding", "scda", "scda_original") + cfga
    if protocol == "ms":
        return ("embedding", "scda", "scda_original") + cfga
    if protocol == "proxy_anchor":
        return ("embedding",) + cfga
    raise ValueError(f"unknown protocol {protocol!r}")


def _scda_features(Fn: np.ndarray, M: np.ndarray, a: int, lcc: bool) -> Tuple[np.ndarray, np.ndarray]:
    """method.md §4.2. Fn: float32 [C, h, w]; M: bool [h, w]. Returns (max_avg_norm, norm_max_avg)."""
    C = Fn.shape[0]
    if lcc:
        Fm = Fn * M.astype(np.int64)  # int mask promotes the product to float64
    else:
        Fm = Fn * M.astype(np.float32)  # stays float32
    Fm = Fm.reshape(C, -1)
    avg = Fm.sum(axis=1) / a
    mx = Fm.max(axis=1)
    max_avg_norm = _l2n(np.concatenate([avg, mx]))
    norm_max_avg = np.concatenate([_l2n(avg), _l2n(mx)])
    return max_avg_norm, norm_max_avg


def _pooling(Fn: np.ndarray) -> np.ndarray:
    """method.md §4.3: L2([GAP; GMP]) in numpy float32, no mask."""
    C = Fn.shape[0]
    flat = Fn.reshape(C, -1)
    gap = flat.mean(axis=1)
    gmp = flat.max(axis=1)
    return _l2n(np.concatenate([gap, gmp]).astype(np.float32))


def _dml_embedding(model: nn.Module, F: torch.Tensor, protocol: str) -> np.ndarray:
    """method.md §4.4 (net head, then a numpy re-normalisation)."""
    with torch.no_grad():
        gmp = nn.AdaptiveMaxPool2d(1)(F).flatten(1)
        if protocol == "ms":
            e = TF.normalize(model.fc(gmp), p=2, dim=1, eps=1e-12)
        else:  # proxy_anchor: l2_norm(embedding(max + avg))
            gap = nn.AdaptiveAvgPool2d(1)(F).flatten(1)
            z = model.fc(gmp + gap)
            norm = torch.sqrt(torch.sum(torch.pow(z, 2), dim=1).add(1e-12))
            e = z / norm.view(-1, 1).expand_as(z)
    e = e[0].numpy().astype(np.float32)
    return _l2n(e).astype(np.float32)


def reference_scalar(F: torch.Tensor, M: np.ndarray) -> torch.Tensor:
    """The back-propagated scalar of method.md §4.5, in the authors' float order.

    Fm = F * float32 mask; gmp = AdaptiveMaxPool2d(1)(Fm); gap = coef * AdaptiveAvgPool2d(1)(Fm)
    with coef = (h*w)/a a Python float; L = sum of both. Max-pool routes the gradient to the
    first argmax per channel; no gradient flows through M (a numpy copy).
    """
    h, w = int(F.shape[-2]), int(F.shape[-1])
    M = np.asarray(M, dtype=bool)
    a = int(M.sum())
    if a == 0:
        raise ValueError("empty mask")
    mask_t = torch.from_numpy(M.astype(np.float32))
    Fm = F * mask_t  # broadcast over batch and channels
    gmp_M = nn.AdaptiveMaxPool2d(1)(Fm)
    coef = (h * w) / a  # Python float
    gap_M = coef * nn.AdaptiveAvgPool2d(1)(Fm)
    return torch.sum(torch.cat([gap_M, gmp_M], dim=1))


def reference_features(
    model: nn.Module, image: Union[ImageLike, torch.Tensor], protocol: str
) -> Dict[str, np.ndarray]:
    """All features of one image for one protocol (see ``expected_keys``), float32 1-D arrays.

    ``model``: torchvision ResNet-50/101/152. For ms / proxy_anchor ``model.fc`` must be the
    Linear(2048, 512) embedding head; for scda / dgpcrl it is ignored. The model is put in
    eval mode. ``image``: path, PIL image, or an already preprocessed [1, 3, H, W] tensor.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}")
    lcc = protocol == "scda"
    x = image if isinstance(image, torch.Tensor) else preprocess(image, protocol)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.shape[0] != 1:
        raise ValueError("batch size must be 1")

    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)

    with torch.enable_grad():
        F = trunk_forward(model, x)  # [1, C, h, w], not detached
        M, a = reference_mask(F, lcc)  # bool [h, w]; numpy copy -> no gradient through M

        L = reference_scalar(F, M)
        L.backward()

    params = dict(model.named_parameters())
    out: Dict[str, np.ndarray] = {}
    for key, pname in CFGA_LAYERS:
        grad = params[pname].grad
        if grad is None:
            raise RuntimeError(f"no gradient for {pname}")
        out[key] = reference_grad_to_vector(grad.detach().cpu().numpy())
    out["cfga_plus"] = np.concatenate([out["cfga_4_1_2"], out["cfga_4_2_2"]]).astype(np.float32)

    Fn = F.detach()[0].numpy().astype(np.float32)  # [C, h, w]
    if protocol != "proxy_anchor":
        s_man, s_nma = _scda_features(Fn, M, a, lcc)
        out["scda"] = s_man.astype(np.float32)
        out["scda_original"] = s_nma.astype(np.float32)
    if protocol in ("scda", "dgpcrl"):
        out["pooling"] = _pooling(Fn)
    if protocol == "dgpcrl":
        out["embedding"] = out["pooling"].copy()
    if protocol in ("ms", "proxy_anchor"):
        out["embedding"] = _dml_embedding(model, F.detach(), protocol)

    model.zero_grad(set_to_none=True)
    assert set(out) == set(expected_keys(protocol)), sorted(out)
    return {k: np.ascontiguousarray(out[k], dtype=np.float32) for k in expected_keys(protocol)}


# ----------------------------------------------------------------------------------------------
# Section 8: metrics
# ----------------------------------------------------------------------------------------------


def reference_recall_at_k(
    X: np.ndarray, y: Sequence, ks: Iterable[int] = (1, 2, 4, 8, 16, 32)
) -> Dict[int, float]:
    """Literal method.md §8.1 (the authors' RetMetric): raw dot product, query = gallery.

    For query i: P = similarities to every same-label item INCLUDING i; t = sorted(P)[-2];
    n = number of different-label similarities strictly greater than t; hit@K iff n < K.
    A class with a single item raises IndexError, like the authors' code.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    ks = [int(k) for k in ks]
    N = X.shape[0]
    sim = X @ X.T
    hits = {k: 0 for k in ks}
    for i in range(N):
        same = y == y[i]
        pos = np.sort(sim[i][same])
        t = pos[-2]  # IndexError for a singleton class
        neg = sim[i][~same]
        n = int(np.sum(neg > t))
        for k in ks:
            if n < k:
                hits[k] += 1
    return {k: hits[k] / N for k in ks}


def reference_map_at_r(X: np.ndarray, y: Sequence) -> float:
    """Plain MAP@R (method.md §8.3): dot-product similarity, query = reference, the query itself is
    removed; ties broken by index (stable sort). R_i = number of other items with the label.
    Queries with R_i = 0 are left out of the mean (as pytorch-metric-learning does); 0.0 if
    every query is such a one."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    N = X.shape[0]
    sim = X @ X.T
    aps = []
    for i in range(N):
        others = np.array([j for j in range(N) if j != i], dtype=np.int64)
        rel_all = y[others] == y[i]
        R = int(rel_all.sum())
        if R == 0:
            continue
        order = np.argsort(-sim[i, others], kind="stable")
        rel = rel_all[order][:R]
        total = 0.0
        hits = 0
        for k in range(1, R + 1):
            if rel[k - 1]:
                hits += 1
                total += hits / k
        aps.append(total / R)
    return float(np.mean(aps)) if aps else 0.0


# ----------------------------------------------------------------------------------------------
# Test helpers: seeded models (method.md §11, models A and B)
# ----------------------------------------------------------------------------------------------


def build_dml_model(arch: str = "resnet50", seed: int = 0, protocol: str = "scda") -> nn.Module:
    """Seeded random torchvision ResNet (legacy layout), eval mode. For ms / proxy_anchor the
    fc is replaced by a seeded Linear(2048, 512). The global RNG state is left untouched."""
    if arch not in ("resnet50", "resnet101", "resnet152"):
        raise ValueError(f"unsupported arch {arch!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(torchvision.models, arch)(weights=None)
        if protocol in ("ms", "proxy_anchor"):
            model.fc = nn.Linear(2048, 512)
    return model.eval()


def jitter_bn(
    model: nn.Module,
    seed: int,
    images: Iterable[Union[ImageLike, torch.Tensor]],
    protocol: str = "scda",
    weight_scale: float = 0.2,
    bias_shift: float = 0.1,
    bias_scale: float = 0.2,
) -> nn.Module:
    """Make a random ResNet numerically realistic ("model B", method.md §11).

    1. Recalibrate every BatchNorm's running statistics on ``images`` (batch size 1, cumulative
       average), so activations stay O(1) through the depth.
    2. Jitter BN affine parameters with a seeded generator: weight *= 1 + weight_scale * N(0,1)
       (abs), bias += bias_shift + bias_scale * N(0,1). The positive shift makes a good
       fraction (well over half) of the layer4 activations positive.

    ``images``: paths / PIL images (preprocessed with ``protocol``) or [1,3,H,W] tensors.
    Modifies and returns ``model`` in eval mode.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum) for m in bns]
    tensors = [im if isinstance(im, torch.Tensor) else preprocess(im, protocol) for im in images]
    if not tensors:
        raise ValueError("jitter_bn needs at least one image")
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
        m.train()
    with torch.no_grad():
        for x in tensors:
            trunk_forward(model, x if x.dim() == 4 else x.unsqueeze(0))
    for m, mom in saved:
        m.momentum = mom
    model.eval()

    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for m in bns:
            if m.affine:
                nw = torch.randn(m.weight.shape, generator=gen)
                nb = torch.randn(m.bias.shape, generator=gen)
                m.weight.mul_((1.0 + weight_scale * nw).abs())
                m.bias.add_(bias_shift + bias_scale * nb)
    return model
