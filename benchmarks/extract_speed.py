#!/usr/bin/env python3
"""Extraction speed: the authors' pattern vs a plain forward vs cfga.extract_features.

Runs anywhere `python3` has torch, torchvision, numpy, scipy and Pillow (no Snakemake needed):

    python3 benchmarks/extract_speed.py --device cpu --threads 2 --n 24
    python3 benchmarks/extract_speed.py --device cuda --n 512

Timed in alternation after a warm-up (the order rotates every repeat), decoding included, medians
over --repeats:
  (a) authors: batch size 1, PIL loader, autograd through the WHOLE network, numpy round trips
      (re-created here from method.md §2–§5; it is also what the paper's numbers come from);
  (b) floor: decode + resize + forward + pooling only, batched like (c), no autograd; a plain
      loop (serial decoding, the model's own modules);
  (b') floor, tuned: (b) with the generic speed-ups that cfga.extract_features also uses and
      that any forward could use — cfga's trunk up to layer4.0 (cfga.backbones.resnet.trunk_to_layer4_0:
      the bit-exact channels-last stem max-pool, batch norms written in place) and cfga's
      in-process JPEG loader (decoding in threads: ahead of the model where torch leaves a core
      idle, else each batch on every core) — so (c)/(b') is what CFGA itself costs over an
      equally tuned forward; reported, not a target;
  (c) cfga.extract_features: all 10 features.
Prints images/s, (c)/(b), (c)/(b') and (a)/(c), and the largest deviation of (c) from (a).

With a Swin or ViT ``--arch`` (swin_t, vit_b_16, …; protocol scda for Swin, scda_224 for ViT) it
times (b) the floor — the same in-process loader and batches as (c), a plain forward to the token
map (Swin: features + norm; ViT: encoder) and pooling — against (c) cfga.extract_features with all
features, and checks (c) against batch size 1 (method.md §T8's "any batch composition").
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as Fn
import torchvision
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cfga import extract_features
from cfga.backbones.resnet import trunk_to_layer4_0
from cfga.extraction.batching import size_buckets
from cfga.extraction.loaders import decode_ahead_wanted, in_process_batches
from cfga.extraction.pipeline import default_batch_size
from cfga.extraction.preprocess import output_size, peek_size, preprocess
from cfga.numerics.mask import largest_component
from cfga.registry.features import CFGA_LAYERS, cfga_name, features_for
from cfga.registry.protocols import get_protocol


def make_images(root: Path, n: int, h: int, w: int, seed: int = 0) -> list[Path]:
    """n real-size JPEGs: noisy backgrounds with a few shapes (a CUB image is ~375×500)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        hh, ww = (h, w) if i % 4 else (w, h)  # some portrait images: several size buckets
        base = rng.integers(0, 256, (hh // 8, ww // 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((ww, hh), Image.BILINEAR)
        d = ImageDraw.Draw(img)
        for _ in range(5):
            x0, y0 = int(rng.integers(0, ww - 40)), int(rng.integers(0, hh - 40))
            d.ellipse([x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 200))],
                      fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        p = root / f"img{i:05d}.jpg"
        img.save(p, quality=90)
        paths.append(p)
    return paths


def realistic_model(arch: str, device: torch.device, images) -> torch.nn.Module:
    """Random weights with BN statistics recalibrated so activations look like a trained net's."""
    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)(weights=None)
    net.train()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    proto = get_protocol("scda")
    with torch.no_grad():
        for p in images[:4]:
            net(preprocess(p, proto.resize)[None])
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.bias.add_(0.1)
    return net.eval().to(device)


# ---------------------------------------------------------------- (a) the authors' pattern
def _l2n(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v)
    return v / n if n > 0 else np.zeros_like(v)


def _authors_vector(G: torch.Tensor) -> np.ndarray:
    if G.shape[-1] == 1:
        r = G[:, :, 0, 0].abs()
    else:
        t = G.flatten(2)
        r = t.max(-1)[0] + (-t).max(-1)[0] + t.std(-1)
    keep = (r > r.mean(0, keepdim=True)) & (r > r.mean(1, keepdim=True))
    return _l2n((r * keep).mean(0).cpu().numpy().astype(np.float32))


def authors_extract(net, paths, device) -> dict[str, np.ndarray]:
    """Batch 1, every parameter requires grad, backward through the whole network."""
    proto = get_protocol("scda")
    trunk = torch.nn.Sequential(*list(net.children())[:-2])
    for p in net.parameters():
        p.requires_grad_(True)
    params = dict(net.named_parameters())
    out = {n: [] for n in features_for("scda")}
    for path in paths:
        x = preprocess(path, proto.resize)[None].to(device)
        net.zero_grad()
        F = trunk(x)
        Fn_ = F.detach().cpu().numpy()[0]
        S = Fn_.sum(0)
        M = largest_component(S > S.mean())
        a = int(M.sum())
        Mt = torch.from_numpy(M.astype(np.float32)).to(device)[None, None]
        Fm = F * Mt
        h, w = F.shape[2:]
        L = torch.sum(torch.cat([(h * w / a) * Fn.adaptive_avg_pool2d(Fm, 1), Fn.adaptive_max_pool2d(Fm, 1)], 1))
        L.backward()
        for b, c in CFGA_LAYERS:
            out[cfga_name(b, c)].append(_authors_vector(params[f"layer4.{b}.conv{c}.weight"].grad))
        Fm64 = Fn_.reshape(Fn_.shape[0], -1) * M.reshape(-1)
        avg, mx = Fm64.sum(1) / a, Fm64.max(1)
        out["scda"].append(_l2n(np.concatenate([avg, mx])).astype(np.float32))
        out["scda_original"].append(np.concatenate([_l2n(avg), _l2n(mx)]).astype(np.float32))
        flat = Fn_.reshape(Fn_.shape[0], -1)
        out["pooling"].append(_l2n(np.concatenate([flat.mean(1), flat.max(1)])))
    for p in net.parameters():
        p.grad = None
    res = {k: np.stack(v) for k, v in out.items() if v}
    res["cfga_plus"] = np.concatenate([res["cfga_4_1_2"], res["cfga_4_2_2"]], 1)
    return res


# ---------------------------------------------------------------- (b) the floor
def floor_extract(net, paths, device, batch_size) -> np.ndarray:
    proto = get_protocol("scda")
    trunk = torch.nn.Sequential(*list(net.children())[:-2])
    sizes = [output_size(*peek_size(p), proto.resize) for p in paths]
    out = []
    with torch.no_grad():
        for idx in size_buckets(sizes, batch_size):
            x = torch.stack([preprocess(paths[i], proto.resize) for i in idx]).to(device)
            F = trunk(x).flatten(2)
            out.append(torch.cat([F.mean(2), F.amax(2)], 1).cpu())
    return torch.cat(out).numpy()


def _batches(paths, device, batch_size, proto):
    """The loader of cfga.extract_features: same-size batches, in-process decoding on the CPU."""
    sizes = [output_size(*peek_size(p), proto.resize) for p in paths]
    batches = size_buckets(sizes, batch_size)
    if device.type == "cpu":
        return in_process_batches(paths, batches, proto.resize)
    return ((idx, torch.stack([preprocess(paths[i], proto.resize) for i in idx])) for idx in batches)


def floor_tuned_extract(net, paths, device, batch_size) -> np.ndarray:
    """(b'): the floor with cfga's trunk (exact stem max-pool, in-place norms) and in-process loader."""
    proto = get_protocol("scda")
    loader = _batches(paths, device, batch_size, proto)
    out = []
    with torch.no_grad():
        for _, x in loader:
            F = net.layer4[2](net.layer4[1](trunk_to_layer4_0(net, x.to(device)))).flatten(2)
            out.append(torch.cat([F.mean(2), F.amax(2)], 1).cpu())
    return torch.cat(out).numpy()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_runs(runs: dict, counts: dict, repeats: int, device):
    """Warm every run up once (allocator, cuDNN autotune, page cache), then time ``repeats`` rounds,
    rotating the order every round: no method always follows the same one (caches, allocator, the
    authors' large backward), so order effects cancel. → ({name: [s/image]}, {name: last result})."""
    for f in runs.values():
        f()
    times = {k: [] for k in runs}
    results = {}
    keys = list(runs)
    for rep in range(repeats):
        for k in keys[rep % len(keys):] + keys[: rep % len(keys)]:
            sync(device)
            t0 = time.perf_counter()
            results[k] = runs[k]()
            sync(device)
            times[k].append((time.perf_counter() - t0) / counts[k])
    return times, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=24, help="images timed per method and repeat")
    ap.add_argument("--n-authors", type=int, default=None, help="images for (a) (default: n, max 64)")
    ap.add_argument("--size", default="375x500", help="JPEG size HxW (CUB-like → 256×341 input)")
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--num-workers", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write the summary here")
    args = ap.parse_args()
    if not args.arch.startswith("resnet"):
        return transformer_main(args)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    h, w = map(int, args.size.split("x"))
    tmp = tempfile.TemporaryDirectory()
    paths = make_images(Path(tmp.name), args.n, h, w)
    n_a = min(args.n_authors or args.n, args.n, 64)
    net = realistic_model(args.arch, device, paths)
    bs = args.batch_size or default_batch_size(device)  # (b), (b') and (c) batch alike

    runs = {
        "authors": lambda: authors_extract(net, paths[:n_a], device),
        "floor": lambda: floor_extract(net, paths, device, bs),
        "floor_tuned": lambda: floor_tuned_extract(net, paths, device, bs),
        "cfga": lambda: extract_features(net, paths, "scda", batch_size=bs, num_workers=args.num_workers),
    }
    counts = {"authors": n_a, "floor": args.n, "floor_tuned": args.n, "cfga": args.n}
    times, results = timed_runs(runs, counts, args.repeats, device)

    per_img = {k: statistics.median(v) for k, v in times.items()}
    ref, ours = results["authors"], results["cfga"]
    dev = {}
    for name in ref:
        a, c = ref[name].astype(np.float64), ours[name][:n_a].astype(np.float64)
        na, nc = np.linalg.norm(a, axis=1), np.linalg.norm(c, axis=1)
        cos = np.where((na == 0) & (nc == 0), 1.0, (a * c).sum(1) / np.maximum(na * nc, 1e-300))
        dev[name] = {"max_abs": float(np.abs(a - c).max()), "min_cosine": float(cos.min())}
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    summary = {
        "device": str(device), "card": card, "threads": args.threads, "torch": torch.__version__,
        "decode_ahead": device.type == "cpu" and decode_ahead_wanted(),
        "arch": args.arch, "n": args.n, "n_authors": n_a, "jpeg_size": args.size, "batch_size": bs,
        "s_per_image": per_img, "images_per_s": {k: 1 / v for k, v in per_img.items()},
        "runs_s_per_image": times,
        "cfga_over_floor": per_img["cfga"] / per_img["floor"],
        "cfga_over_floor_tuned": per_img["cfga"] / per_img["floor_tuned"],
        "cfga_over_floor_per_repeat": [c / f for c, f in zip(times["cfga"], times["floor"])],
        "cfga_over_floor_median_of_repeats": statistics.median(c / f for c, f in zip(times["cfga"], times["floor"])),
        "authors_over_cfga": per_img["authors"] / per_img["cfga"],
        "authors_over_floor": per_img["authors"] / per_img["floor"],
        "max_abs_dev_vs_authors": max(d["max_abs"] for d in dev.values()),
        "min_cosine_vs_authors": min(d["min_cosine"] for d in dev.values()),
    }
    print(f"{'method':<12}{'s/img':>10}{'img/s':>10}   (batch size {bs}, decode ahead: "
          f"{summary['decode_ahead']}; every repeat, s/img)")
    for k in runs:
        print(f"{k:<12}{per_img[k]:>10.4f}{1 / per_img[k]:>10.1f}   " + " ".join(f"{t:.4f}" for t in times[k]))
    print(f"cfga/floor = {summary['cfga_over_floor']:.3f}   cfga/floor_tuned = {summary['cfga_over_floor_tuned']:.3f}"
          f"   authors/cfga = {summary['authors_over_cfga']:.2f}   authors/floor = {summary['authors_over_floor']:.2f}")
    print("cfga/floor per repeat: " + " ".join(f"{r:.3f}" for r in summary["cfga_over_floor_per_repeat"])
          + f"   (median {summary['cfga_over_floor_median_of_repeats']:.3f})")
    for name, d in dev.items():
        print(f"  {name:<14} max|Δ| {d['max_abs']:.2e}  min cos {d['min_cosine']:.7f}")
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


# ---------------------------------------------------------------- Swin / ViT
def transformer_model(arch: str, device: torch.device) -> torch.nn.Module:
    """Random weights, LayerNorm affine parameters spread out (at init every token's channels sum
    to ~0, which no trained net does and which would make the SCDA mask noise)."""
    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)(weights=None)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
    return net.eval().to(device)


def transformer_floor(net, paths, device, batch_size, proto) -> np.ndarray:
    """(b): same loader and batches as cfga.extract_features, plain forward to the token map + pooling."""
    loader = _batches(paths, device, batch_size, proto)
    swin = isinstance(net, torchvision.models.SwinTransformer)
    out = []
    with torch.no_grad():
        for _, x in loader:
            x = x.to(device)
            if swin:
                F = net.norm(net.features(x)).flatten(1, 2)  # [B, hw, C]
            else:
                t = net._process_input(x)
                F = net.encoder(torch.cat([net.class_token.expand(x.shape[0], -1, -1), t], dim=1))[:, 1:]
            out.append(torch.cat([F.mean(1), F.amax(1)], 1).cpu())
    return torch.cat(out).numpy()


def transformer_main(args) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    h, w = map(int, args.size.split("x"))
    tmp = tempfile.TemporaryDirectory()
    paths = make_images(Path(tmp.name), args.n, h, w)
    net = transformer_model(args.arch, device)
    protocol = "scda_224" if args.arch.startswith("vit") else "scda"
    proto = get_protocol(protocol)
    bs = args.batch_size or default_batch_size(device)
    runs = {
        "floor": lambda: transformer_floor(net, paths, device, bs, proto),
        "cfga": lambda: extract_features(net, paths, protocol, batch_size=bs, num_workers=args.num_workers),
    }
    times, results = timed_runs(runs, {k: args.n for k in runs}, args.repeats, device)
    single = extract_features(net, paths[: min(4, args.n)], protocol, batch_size=1)
    dev = max(float(np.abs(single[k] - results["cfga"][k][: len(paths[:4])]).max()) for k in single)
    per_img = {k: statistics.median(v) for k, v in times.items()}
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    summary = {
        "device": str(device), "card": card, "threads": args.threads, "torch": torch.__version__,
        "arch": args.arch, "protocol": protocol, "n": args.n, "jpeg_size": args.size, "batch_size": bs,
        "s_per_image": per_img, "images_per_s": {k: 1 / v for k, v in per_img.items()},
        "runs_s_per_image": times,
        "cfga_over_floor": per_img["cfga"] / per_img["floor"],
        "cfga_over_floor_per_repeat": [c / f for c, f in zip(times["cfga"], times["floor"])],
        "cfga_over_floor_median_of_repeats": statistics.median(c / f for c, f in zip(times["cfga"], times["floor"])),
        "max_abs_dev_vs_batch_size_1": dev,
        "features": list(results["cfga"]),
    }
    print(f"{'method':<12}{'s/img':>10}{'img/s':>10}   ({args.arch}, {protocol}, batch size {bs}; every repeat, s/img)")
    for k in runs:
        print(f"{k:<12}{per_img[k]:>10.4f}{1 / per_img[k]:>10.1f}   " + " ".join(f"{t:.4f}" for t in times[k]))
    print(f"cfga/floor = {summary['cfga_over_floor']:.3f}   per repeat: "
          + " ".join(f"{r:.3f}" for r in summary["cfga_over_floor_per_repeat"])
          + f"   max |cfga − batch size 1| = {dev:.2e}")
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
