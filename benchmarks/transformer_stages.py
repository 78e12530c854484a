#!/usr/bin/env python3
"""Where a Transformer's CFGA step spends its time: the stages of one same-size batch.

    python benchmarks/transformer_stages.py swin_t 256 341 scda [--batch 8 --threads 2]
    python benchmarks/transformer_stages.py vit_b_16 224 224 scda_224

Random weights (LayerNorm affine parameters spread out, as extract_speed.py does, so the masks are
not trivial), a random batch of the given size. Best of --repeats wall-clock times of:
  floor    the plain forward of the whole model (no autograd);
  trunk    the family's ``trunk`` (no autograd) up to the second-to-last block;
  tail     the last two blocks with autograd, the mask and the scalar L;
  backward ``autograd.grad(L, Y)`` of the eight CFGA linears (tail subtracted);
  vectors  the eight ``linear_vectors`` calls (per-image dYᵀX and method.md §5.2);
  cfga     ``transformer_batch_features`` as extraction runs it.
The shares say which stage a speed-up must come from; extract_speed.py measures the target.
"""
from __future__ import annotations

import argparse
import time

import torch
import torchvision


def best_of(fn, repeats: int):
    """(shortest wall time in s, the last result) of ``repeats`` calls."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("arch")
    ap.add_argument("height", type=int)
    ap.add_argument("width", type=int)
    ap.add_argument("protocol")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from cfga.backbones import family_module, family_of
    from cfga.extraction.transformer import transformer_batch_features
    from cfga.numerics.gradients import linear_vectors
    from cfga.numerics.mask import scda_mask
    from cfga.numerics.scalar import masked_scalar
    from cfga.registry.protocols import get_protocol

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    proto = get_protocol(args.protocol)
    net = getattr(torchvision.models, args.arch)().eval()
    for m in net.modules():
        if isinstance(m, torch.nn.LayerNorm):
            torch.nn.init.normal_(m.weight, 1, 0.5)
            torch.nn.init.normal_(m.bias, 0, 0.5)
    net.requires_grad_(False)
    bb = family_module(family_of(net))
    x = torch.randn(args.batch, 3, args.height, args.width)
    B, R = args.batch, args.repeats

    with torch.no_grad():
        floor, _ = best_of(lambda: net(x), R)
        trunk, h = best_of(lambda: bb.trunk(net, x), R)

    def tail():
        with torch.enable_grad():
            F, _, io = bb.tail(net, h.detach().requires_grad_(True))
            return masked_scalar(F, scda_mask(F.detach(), proto.lcc)), io

    def backward():
        L, io = tail()
        return torch.autograd.grad(L, [y for _, y in io]), io

    t_tail, _ = best_of(tail, R)
    t_both, (dys, io) = best_of(backward, R)
    t_vec, _ = best_of(lambda: [linear_vectors(X.reshape(B, -1, X.shape[-1]), d.reshape(B, -1, d.shape[-1]))
                                for (X, _), d in zip(io, dys)], R)
    cfga, _ = best_of(lambda: transformer_batch_features(net, x, proto), R)
    print(f"{args.arch} {args.protocol} batch {B} at {args.height}x{args.width}, {args.threads} threads; s per batch")
    for name, t in [("floor", floor), ("trunk", trunk), ("tail", t_tail), ("backward", t_both - t_tail),
                    ("vectors", t_vec), ("cfga", cfga)]:
        print(f"  {name:9s} {t:7.3f}")
    print(f"  cfga/floor {cfga / floor:.3f}")


if __name__ == "__main__":
    main()
