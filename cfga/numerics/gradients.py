"""Per-image weight gradients of the six CFGA convs, without back-propagating through the trunk.

The authors back-propagate the scalar L (method.md §4.5) through the whole network, one image at a
time, and read ``layer4.{1,2}.conv{1,2,3}.weight.grad``. Those gradients depend only on the
input of ``layer4.1`` and on what follows it, so here:

1. the trunk up to ``layer4.0`` runs without autograd;
2. ``layer4.1``–``layer4.2`` run with autograd, recording each CFGA conv's input X and output Y;
3. ``autograd.grad(L, Y)`` gives dL/dY per image (eval-mode BN keeps images independent, so the
   batch's summed scalar yields each image's own dY);
4. the weight gradient of image n is ``dY_n ⊗ X_n``: ``dY_n [C_out, hw] @ X_nᵀ [hw, C_in]`` for
   1×1 convs and ``dY_n @ unfold(X_n)ᵀ`` for the 3×3 conv — it never mixes images.

On the CPU, extraction does not keep whole gradients: ``kernel_responses`` turns each image's
gradient into its per-kernel response r (method.md §5.1) one image at a time, and feeds the 3×3
statistics from tap-centred inputs (below), so no [B, C_out, C_in, k, k] tensor exists. Other
devices take the whole batch in one batched matmul per conv (``batched_kernel_responses``)."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as Fn
from torch import nn

from cfga.numerics.aggregation import aggregate_response
from cfga.numerics.pooling import l2_normalize


def _require_ungrouped(conv: nn.Conv2d) -> None:
    if conv.groups != 1:
        raise ValueError("grouped convolutions are not supported")


def _is_pointwise(conv: nn.Conv2d) -> bool:
    return conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0)


def per_sample_weight_grad(X: torch.Tensor, dY: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Weight gradient of ``conv`` for each image: X [B, C_in, h, w], dY [B, C_out, h', w']
    → G [B, C_out, C_in, kh, kw] (float32, same device)."""
    _require_ungrouped(conv)
    B, C_out = dY.shape[:2]
    kh, kw = conv.kernel_size
    dYf = dY.reshape(B, C_out, -1)
    C_in = X.shape[1]
    if _is_pointwise(conv):
        cols = X.reshape(B, C_in, -1)
        return torch.bmm(dYf, cols.transpose(1, 2)).view(B, C_out, C_in, 1, 1)
    cols = Fn.unfold(X, (kh, kw), dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    # Tap-major columns [B, k², C_in, hw]: the result is stored tap-major, so the per-kernel
    # reductions over the k² taps (cfga.aggregation) run vectorised across input channels.
    cols = cols.view(B, C_in, kh * kw, -1).transpose(1, 2).reshape(B, kh * kw * C_in, -1)
    G = torch.bmm(dYf, cols.transpose(1, 2)).view(B, C_out, kh * kw, C_in)
    return G.transpose(2, 3).unflatten(3, (kh, kw))  # a [B, C_out, C_in, kh, kw] view


def kernel_responses(X: torch.Tensor, dY: torch.Tensor, conv: nn.Conv2d, *,
                     out: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """Per-kernel response r (method.md §5.1) of each image's weight gradient of ``conv``, one image at
    a time: X [B, C_in, h, w], dY [B, C_out, h', w'] → B tensors [C_out, C_in] (float32): fresh
    ones, or ``out`` itself, written over for each image (consume each before the next).

    Equals ``cfga.aggregation.kernel_response(per_sample_weight_grad(X, dY, conv))[n]`` up to
    float rounding (1×1: bit-identical with MKL), without materialising the gradient:

    * 1×1: r = |dY_n @ X_nᵀ|.
    * k×k: r = range + unbiased std over the k² taps. Both are shift-invariant per kernel, so they
      are taken over the *centred* gradient g_t − mean_t g, which is linear in X: it is
      ``dY_n @ (cols_t − mean_t cols)ᵀ`` with unfolded input columns cols (``centred_tap_columns``).
      One matmul per image yields it, and the std is a plain sum of squares (no second centring
      pass).
      Centring the inputs first is also the more accurate order: X ≥ 0 (a ReLU output), so the
      raw taps share a large common part that the reference's G − mean cancels in float32.
      A constant kernel (range exactly 0) gets std exactly 0, as torch.std gives.

    Both products run over the output positions where dY_n is non-zero only (``live_positions``).
    """
    _require_ungrouped(conv)
    B, C_out = dY.shape[:2]
    C_in = X.shape[1]
    dYf = dY.reshape(B, C_out, -1)
    pointwise = _is_pointwise(conv)
    live = live_positions(dYf, SKIP_ZERO_POSITIONS_BELOW["1x1" if pointwise else "kxk"])
    if pointwise:
        Xf = X.reshape(B, C_in, -1)
        for n in range(B):
            d, x = _at(dYf[n], live[n]), _at(Xf[n], live[n])
            yield torch.mm(d, x.T, out=out).abs_()
        return
    k2 = conv.kernel_size[0] * conv.kernel_size[1]
    cols = centred_tap_columns(X, conv)
    Gt = torch.empty(k2 * C_in, C_out, dtype=dY.dtype, device=dY.device)  # reused for every image
    rT = torch.empty(C_in, C_out, dtype=dY.dtype, device=dY.device)
    for n in range(B):
        # The transposed product, cols_n @ dY_nᵀ → [k², C_in, C_out]: MKL runs it faster than
        # dY_n @ cols_nᵀ at this shape (h'·w' ≈ 88; BENCHMARKS.md), and the tap reductions
        # become elementwise passes over k² contiguous [C_in, C_out] planes.
        torch.mm(_at(cols[n], live[n]), _at(dYf[n], live[n]).T, out=Gt)
        _centred_tap_response(Gt.view(k2, C_in, C_out), out=rT, dim=0)
        # Back to [C_out, C_in] in memory too: the aggregation's reductions over a transposed view
        # cost more than this 1 MB copy. (A clone, not .contiguous(): with C_in or C_out = 1 the
        # transposed view is contiguous already, and the next image would overwrite it.)
        yield rT.T.clone(memory_format=torch.contiguous_format) if out is None else out.copy_(rT.T)


# Positions where an image's dY is exactly zero add only ±0 to its weight gradient: outside the
# SCDA mask for layer4.2's conv2/conv3 (about half of the map on real images), outside its 3×3
# dilation upstream. Skipping them shortens the products' inner dimension at the price of a
# gathering copy, which pays for k×k convs whenever one position can go and for 1×1 convs only
# when enough positions are zero (thresholds measured, BENCHMARKS.md).
SKIP_ZERO_POSITIONS_BELOW = {"1x1": 0.6, "kxk": 1.0}


def live_positions(dYf: torch.Tensor, below: float) -> list[torch.Tensor | None]:
    """For each image of dYf [B, C_out, P]: the indices [P'] of the positions p where some channel
    of dY is non-zero (NaN counts as non-zero), or None (use every position) unless P' < below·P."""
    live = dYf.ne(0).sum(dim=1, dtype=torch.int32) > 0  # [B, P]; cheaper than .any(dim=1) on CPU
    counts = live.sum(dim=1).tolist()
    P = dYf.shape[-1]
    return [live[n].nonzero().view(-1) if c < below * P else None for n, c in enumerate(counts)]


def _at(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """Columns idx of a [rows, P] matrix (a copy), or the matrix itself when idx is None."""
    return t if idx is None else t.index_select(1, idx)


def _centred_tap_response(Gc: torch.Tensor, out: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """Range + unbiased std over the taps (dimension ``dim``) of tap-centred gradients Gc →
    out, Gc's shape without ``dim`` (method.md §5.1)."""
    taps = Gc.unbind(dim)
    rng = Gc.amax(dim=dim).sub_(Gc.amin(dim=dim))  # max g + max(−g)
    # Σ_t g_t² as multiply-adds over the k² tap planes: faster on CPU than square + sum.
    ss = taps[0] * taps[0]
    for g in taps[1:]:
        ss.addcmul_(g, g)
    std = ss.div_(len(taps) - 1).sqrt_()
    std.mul_(rng.sign())  # rng ≥ 0: ×1, or ×0 for a constant kernel; NaN stays in rng
    return torch.add(rng, std, out=out)


# Largest per-chunk gradient of the batched path, in floats (1 GiB): 3×3 layer4 convs → ~110
# images per chunk, so a CUDA batch of 32 is one bmm per conv.
BATCHED_MAX_ELEMENTS = 2**28


def batched_kernel_responses(X: torch.Tensor, dY: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``kernel_responses`` for the whole batch at once: X, dY as there → r [B, C_out, C_in].

    One batched matmul per conv (per chunk of images) instead of a loop over images:
    what a GPU needs (a few large kernels instead of ~10 small launches per image and conv),
    at the price of holding every image's gradient ([B, C_out, k²·C_in] floats, chunked to
    ``BATCHED_MAX_ELEMENTS``). Each image's r still comes from its own dY and X only.
    """
    _require_ungrouped(conv)
    B, C_out = dY.shape[:2]
    C_in = X.shape[1]
    dYf = dY.reshape(B, C_out, -1)
    r = torch.empty(B, C_out, C_in, dtype=dY.dtype, device=dY.device)
    if _is_pointwise(conv):
        torch.bmm(dYf, X.reshape(B, C_in, -1).transpose(1, 2), out=r)
        return r.abs_()
    k2 = conv.kernel_size[0] * conv.kernel_size[1]
    cols = centred_tap_columns(X, conv)
    step = max(1, BATCHED_MAX_ELEMENTS // (C_out * k2 * C_in))
    for i in range(0, B, step):
        Gc = torch.bmm(dYf[i : i + step], cols[i : i + step].transpose(1, 2))
        _centred_tap_response(Gc.view(-1, C_out, k2, C_in), out=r[i : i + step])
    return r


def centred_tap_columns(X: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """The unfolded input of a k×k ``conv``, centred over its k² taps and stored tap-major:
    X [B, C_in, h, w] → [B, k²·C_in, h'·w'] with row t·C_in + c = tap t of channel c minus the
    mean of channel c's k² taps (the same numbers as ``Fn.unfold`` minus the tap mean).

    Tap-major rows make the per-image products [k², C_in, ·] blocks whose reductions over the taps
    run vectorised across input channels. For stride 1 (every CFGA conv) the taps are
    plain shifted windows of the zero-padded input, stacked in one copy: cheaper than
    ``unfold`` plus a transposing copy (BENCHMARKS.md). Other strides take the ``unfold`` route.
    """
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"only explicit zero padding is supported, got {conv.padding_mode!r} / {conv.padding!r}")
    B, C_in = X.shape[:2]
    kh, kw = conv.kernel_size
    if conv.stride == (1, 1):
        (dh, dw), (ph, pw) = conv.dilation, conv.padding
        Xp = Fn.pad(X, (pw, pw, ph, ph))
        oh, ow = Xp.shape[2] - dh * (kh - 1), Xp.shape[3] - dw * (kw - 1)
        taps = torch.stack([Xp[:, :, i * dh : i * dh + oh, j * dw : j * dw + ow]
                            for i in range(kh) for j in range(kw)], dim=1)  # [B, k², C_in, h', w']
        taps.sub_(taps.mean(dim=1, keepdim=True))
        return taps.view(B, kh * kw * C_in, oh * ow)
    cols = Fn.unfold(X, (kh, kw), dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    cols = cols.view(B, C_in, kh * kw, -1)
    cols = cols - cols.mean(dim=2, keepdim=True)
    return cols.transpose(1, 2).reshape(B, kh * kw * C_in, -1)


def cfga_vectors(X: torch.Tensor, dY: torch.Tensor, conv: nn.Conv2d, *, batched: bool | None = None) -> torch.Tensor:
    """The CFGA vectors of ``conv`` for a batch (method.md §5): X, dY as in ``kernel_responses`` →
    unit vectors [B, C_in] (zeros where v = 0). Each row depends on its own image only.

    ``batched`` picks ``batched_kernel_responses`` over the image-by-image, cache-sized
    ``kernel_responses``; None → batched on every device but the CPU (where the per-image path
    is faster and keeps a row's bits independent of the rest of its batch).
    """
    if batched is None:
        batched = X.device.type != "cpu"
    if batched:
        v = aggregate_response(batched_kernel_responses(X, dY, conv))
    else:
        # One r and one scratch for all images: a working set the caches keep (same values).
        B, C_out, C_in = X.shape[0], dY.shape[1], X.shape[1]
        v = torch.empty(B, C_in, dtype=dY.dtype, device=dY.device)
        r = torch.empty(C_out, C_in, dtype=dY.dtype, device=dY.device)
        scratch = torch.empty_like(r)
        for n, r_n in enumerate(kernel_responses(X, dY, conv, out=r)):
            aggregate_response(r_n, scratch=scratch, out=v[n])
    return l2_normalize(v)


def linear_vectors(X: torch.Tensor, dY: torch.Tensor, *, batched: bool | None = None) -> torch.Tensor:
    """CFGA vectors of a linear layer (a 1×1 conv; method.md §T5): X [B, T, C_in] inputs and
    dY [B, T, C_out] output gradients of each image's T tokens → unit vectors [B, C_in].

    Image n's weight gradient is ``G_n = dY_nᵀ X_n`` [C_out, C_in]; r = |G_n|, then method.md §5.2's
    aggregation. Tokens whose dY row or X row is exactly zero add ±0 to G_n (dY: outside the mask
    after the last token mixing; X: a Swin window's padding tokens) and are skipped when enough of
    them are (``SKIP_ZERO_POSITIONS_BELOW['1x1']``). ``batched``: as in ``cfga_vectors``.
    """
    if batched is None:
        batched = X.device.type != "cpu"
    B, T, C_in = X.shape
    C_out = dY.shape[-1]
    if batched:
        r = torch.bmm(dY.transpose(1, 2), X).abs_()
        return l2_normalize(aggregate_response(r))
    rows = (dY.ne(0).sum(dim=-1, dtype=torch.int32) > 0) & (X.ne(0).sum(dim=-1, dtype=torch.int32) > 0)
    counts = rows.sum(dim=1).tolist()
    below = SKIP_ZERO_POSITIONS_BELOW["1x1"] * T
    live = [rows[n].nonzero().view(-1) if c < below else None for n, c in enumerate(counts)]
    v = torch.empty(B, C_in, dtype=dY.dtype, device=dY.device)
    r = torch.empty(C_out, C_in, dtype=dY.dtype, device=dY.device)
    scratch = torch.empty_like(r)
    for n in range(B):
        d, x = dY[n], X[n]
        if live[n] is not None:
            d, x = d.index_select(0, live[n]), x.index_select(0, live[n])
        torch.mm(d.T, x, out=r).abs_()
        aggregate_response(r, scratch=scratch, out=v[n])
    return l2_normalize(v)
