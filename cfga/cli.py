"""The ``cfga`` command. ``cfga retrieve``: query a workflow's gallery with images of your own.

Run it in the workflow's directory (where ``results/`` is). Bad input (a query that is not an
image, a dataset or model not in the config, a feature the model does not produce, k larger than
the gallery, a missing features file) → one message naming the argument and the fix, exit status
2, nothing written. Progress and errors go to stderr; results to stdout.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Sequence

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input: the message names the argument and the fix."""


def _say(msg: str) -> None:
    print(f"cfga: {msg}", file=sys.stderr, flush=True)


def schema_default(*keys: str):
    """The config schema's default at ``properties.<k1>.properties.<k2>...`` (the packaged schema,
    cfga.registry.config: the one home of config defaults), or None."""
    from cfga.registry.config import config_schema

    node = config_schema()
    for k in keys:
        node = node.get("properties", {}).get(k, {})
    return node.get("default")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cfga", description="cfga: CFGA image retrieval (Yu et al., PR 2024).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    r = sub.add_parser(
        "retrieve",
        help="query a dataset's gallery with your own images",
        description="Extract the features of QUERY images with a configured model (its checkpoint and "
                    "protocol, cfga.extract_features) and list their top-k neighbours among the dataset's "
                    "gallery images (results/features/DATASET/MODEL.npz: every test image, or the gallery "
                    "set where the manifest names one, e.g. In-Shop), by the raw dot product, ties in "
                    "manifest order. Prints a table (or CSV with --csv) to stdout and writes a gallery "
                    "figure with each query's CFGA heatmaps. Run it in the workflow's directory.",
    )
    r.add_argument("queries", nargs="+", metavar="QUERY", help="image file(s) to query with (any format PIL reads)")
    r.add_argument("--dataset", required=True,
                   help="a dataset of the config (its gallery: the test split, or its gallery set)")
    r.add_argument("--model", required=True, help="a model of the config that runs on --dataset")
    r.add_argument("--feature", default="cfga_plus",
                   help="feature to search with, one the model's protocol produces (default: cfga_plus)")
    r.add_argument("--k", type=int, default=None,
                   help="neighbours per query (default: the config's retrieval.k, else the schema's default)")
    r.add_argument("--configfile", default="config.yaml", help="workflow config (default: config.yaml)")
    r.add_argument("-o", "--output", default="retrieval.png",
                   help="gallery figure to write, PNG, also with --csv (default: retrieval.png)")
    r.add_argument("--csv", action="store_true",
                   help="print CSV rows query,rank,path,class,similarity instead of the table")
    r.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:N or auto (default: the config's extraction.device, else auto)")
    return p


def _load_config(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--configfile: {p} not found; run in the workflow's directory or pass --configfile PATH")
    try:
        cfg = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"--configfile: {p} is not valid YAML ({err}); fix the file") from None
    if not isinstance(cfg, dict) or not cfg.get("datasets") or not cfg.get("models"):
        raise UsageError(f"--configfile: {p} has no datasets/models; pass the workflow's config")
    return cfg


def _check_queries(queries: Sequence[str]) -> None:
    from cfga.extraction.preprocess import ImageError, load_rgb

    for q in queries:
        if not Path(q).is_file():
            raise UsageError(f"QUERY: {q} does not exist; give the path of an image file")
        try:
            load_rgb(q)
        except ImageError as err:
            raise UsageError(f"QUERY: {err}") from None


def _gallery_rows(dataset: str, fpath: str, paths: Sequence[str]):
    """(indices of the features file's gallery rows, {label: class name}) from the dataset's
    manifest, the roles the metrics and the galleries read (every row on a leave-one-out dataset;
    In-Shop: its gallery set, not its queries)."""
    import numpy as np

    from cfga.data.manifest import DatasetError, feature_roles, read_manifest
    from cfga.workflow import layout

    mpath = layout.manifest_path(dataset)
    if not Path(mpath).is_file():
        raise UsageError(f"manifest {mpath} not found: build it with `snakemake {mpath}` in this directory")
    try:
        rows = read_manifest(mpath)
        _, is_gallery = feature_roles(mpath, paths, fpath, rows=rows)
    except DatasetError as err:
        raise UsageError(str(err)) from None  # names the manifest and the fix
    except ValueError as err:
        raise UsageError(f"{err} (`snakemake --forcerun extract_features {fpath}`)") from None
    return np.flatnonzero(is_gallery), {r.label: r.class_name for r in rows}


def _plan(args) -> dict:
    """Every check that needs no model: → what the run reads and writes."""
    import numpy as np

    from cfga.extraction.store import load_features
    from cfga.registry.features import FEATURES, features_for
    from cfga.workflow import layout

    cfg = _load_config(args.configfile)
    datasets, models = cfg["datasets"], cfg["models"]
    if args.dataset not in datasets:
        raise UsageError(f"--dataset: {args.dataset!r} is not in {args.configfile}; choose one of: "
                         f"{', '.join(datasets)}")
    if args.model not in models:
        raise UsageError(f"--model: {args.model!r} is not in {args.configfile}; choose one of: {', '.join(models)}")
    if args.dataset not in layout.model_datasets(datasets, models, args.model):
        raise UsageError(f"--model: {args.model} does not run on {args.dataset} (its datasets: "
                         f"{', '.join(layout.model_datasets(datasets, models, args.model))}); choose another model")
    protocol = models[args.model]["protocol"]
    have = features_for(protocol, models[args.model]["arch"])
    if args.feature not in have:
        known = "" if args.feature in FEATURES else " (not a cfga feature)"
        raise UsageError(f"--feature: model {args.model} (protocol {protocol}) does not produce {args.feature!r}"
                         f"{known}; choose one of: {', '.join(have)}")
    k = args.k
    if k is None:
        k = cfg.get("retrieval", {}).get("k", schema_default("retrieval", "k"))
    if k is None:
        raise UsageError("--k: no default found (no retrieval.k in the config, no schema); pass --k N")
    if k < 1:
        raise UsageError(f"--k: {k} must be at least 1")
    if not str(args.output).lower().endswith(".png"):
        raise UsageError(f"-o/--output: {args.output} must be a .png file")
    _check_queries(args.queries)

    fpath = layout.features_path(args.dataset, args.model)
    if not Path(fpath).is_file():
        raise UsageError(f"features file {fpath} not found: build it with `snakemake {fpath}` "
                         "(or `snakemake all`) in this directory")
    try:
        feats, labels, paths, _meta = load_features(fpath)
    except (OSError, ValueError) as err:
        raise UsageError(f"features file {fpath}: {err}; rebuild it with `snakemake --forcerun "
                         f"extract_features {fpath}`") from None
    if args.feature not in feats:
        raise UsageError(f"--feature: {fpath} has no {args.feature!r}; rebuild it with `snakemake --forcerun "
                         f"extract_features {fpath}`")
    gallery, names = _gallery_rows(args.dataset, fpath, paths)
    n = len(gallery)
    if k > n:
        what = "test" if n == len(labels) else "gallery"
        raise UsageError(f"--k: {k} is larger than the gallery of {args.dataset} ({n} {what} images); pass --k {n} "
                         "or less")
    ckpt = layout.checkpoint_path(models, args.dataset, args.model)
    if not Path(ckpt).is_file():
        raise UsageError(f"checkpoint {ckpt} of model {args.model} not found: build it with `snakemake {ckpt}` "
                         f"or fix models.{args.model}.checkpoint in the config")
    return {
        "cfg": cfg, "protocol": protocol, "k": int(k), "gallery": np.asarray(feats[args.feature])[gallery],
        "labels": np.asarray(labels)[gallery], "paths": [str(paths[i]) for i in gallery], "checkpoint": ckpt,
        "names": names,
        "root": Path(layout.dataset_root(args.dataset)),
        "device": args.device or cfg.get("extraction", {}).get("device", schema_default("extraction", "device"))
        or "auto",
    }


def retrieve(args) -> int:
    plan = _plan(args)
    from cfga import extract_features, load_model
    from cfga.extraction.maps import cfga_heatmaps
    from cfga.outputs.gallery import Cell, UNKNOWN, neighbour_cell, query_cell, render_grid
    from cfga.outputs.heatmaps import overlay
    from cfga.outputs.retrieval import QUERY_COLUMNS, external_neighbours
    from cfga.registry.features import FEATURES

    mcfg = plan["cfg"]["models"][args.model]
    _say(f"loading {args.model} ({mcfg['arch']}, protocol {plan['protocol']}) from {plan['checkpoint']}")
    model = load_model(mcfg["arch"], plan["protocol"], plan["checkpoint"], device=plan["device"],
                       allow_pickle=mcfg.get("allow_pickle", False), format=mcfg.get("format"))
    _say(f"extracting {len(args.queries)} quer{'y' if len(args.queries) == 1 else 'ies'}")
    q = extract_features(model, list(args.queries), plan["protocol"], progress=len(args.queries) > 1,
                         desc="queries")[args.feature]
    ns = external_neighbours(q, plan["gallery"], plan["k"])
    names, labels, paths = plan["names"], plan["labels"], plan["paths"]

    def cls(i: int) -> str:
        return names.get(int(labels[i]), str(int(labels[i])))

    if args.csv:
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(QUERY_COLUMNS)
        for query, row in zip(args.queries, ns):
            w.writerows([query, n.rank, paths[n.index], cls(n.index), repr(n.similarity)] for n in row)
    else:
        for query, row in zip(args.queries, ns):
            print(f"{query}: top-{plan['k']} of {args.dataset} by {FEATURES[args.feature].column} ({args.model})")
            width = max(5, *(len(cls(n.index)) for n in row))
            print(f"{'rank':>4}  {'similarity':>10}  {'class':<{width}}  path")
            for n in row:
                print(f"{n.rank:>4}  {n.similarity:>10.6f}  {cls(n.index):<{width}}  {paths[n.index]}")
    sys.stdout.flush()

    _say("CFGA heatmaps")
    maps = cfga_heatmaps(model, list(args.queries), plan["protocol"])
    layers = list(maps[0].cfga_maps)  # the model's CFGA+ layers (ResNet conv2s, Transformer qkvs)
    rows = []
    for query, m, row in zip(args.queries, maps, ns):
        cells = [query_cell(m.image, Path(query).name[:22]),
                 *[Cell(overlay(m.image, m.cfga_maps[n], m.mask), UNKNOWN, FEATURES[n].column) for n in layers]]
        cells += [neighbour_cell(plan["root"] / paths[n.index], n.rank, n.similarity, None, cls(n.index)[:22])
                  for n in row]
        rows.append(cells)
    heads = [(0, "query"), (1, "CFGA maps (SCDA mask: yellow)"), (1 + len(layers), "neighbours")]
    render_grid(rows, args.output, f"{args.dataset} / {args.model} / {FEATURES[args.feature].column}: "
                f"top-{plan['k']} by dot product", group_titles=heads, gaps_after=[0, len(layers)])
    _say(f"wrote {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "retrieve":
            return retrieve(args)
    except UsageError as err:
        print(f"cfga {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
