"""`cfga retrieve` on a tiny workflow result built in a tmp dir: brute-force top-k of
extract_features against the gallery (every test image, or a query/gallery dataset's gallery
rows), and bad input → exit 2, one message, nothing written."""
import csv
import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cfga import extract_features, load_model
from cfga.cli import main
from cfga.data.manifest import ManifestRow, write_manifest
from cfga.extraction.store import save_features
from tests.reference.spec_reference import build_dml_model, jitter_bn

DATASET, MODEL = "mini", "net"
SHOP = "shop"  # a query/gallery dataset


def _image(path, seed, size=(80, 64)):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _dataset(wd):
    """The dataset's images and manifest under wd, as `snakemake all` lays them out → (rows, root)."""
    root = wd / f"results/datasets/{DATASET}"
    rows = [ManifestRow("test", i // 3, f"class{i // 3}", f"images/c{i // 3}/{i}.png") for i in range(9)]
    for i, r in enumerate(rows):
        _image(root / r.path, i)
    write_manifest(rows, wd / f"results/manifests/{DATASET}.csv")
    return rows, root


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """config.yaml, a checkpoint, manifest, dataset images and the features file, as `snakemake all` lays them out."""
    wd = tmp_path_factory.mktemp("wf")
    rows, root = _dataset(wd)
    torch.set_num_threads(1)
    net = jitter_bn(build_dml_model("resnet50", seed=1), seed=2, images=[root / rows[0].path])
    torch.save(net.state_dict(), wd / "backbone.pth")
    # SHOP: the same images and features with In-Shop's roles (rows 0, 3, 6 queries, the rest the gallery)
    shop = [ManifestRow("test", r.label, r.class_name, r.path, i % 3 == 0, i % 3 != 0) for i, r in enumerate(rows)]
    write_manifest(shop, wd / f"results/manifests/{SHOP}.csv")
    shutil.copytree(root, wd / f"results/datasets/{SHOP}")
    cfg = {"datasets": {DATASET: {"format": "cub", "archive": "none.tgz"},
                        SHOP: {"format": "inshop", "images_archive": "img.zip", "partition": "p.txt"}},
           "models": {MODEL: {"arch": "resnet50", "protocol": "scda", "checkpoint": "backbone.pth"},
                      "other": {"arch": "resnet50", "protocol": "scda", "checkpoint": "x.pth", "datasets": []}},
           "extraction": {"device": "cpu"}}
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    model = load_model("resnet50", "scda", wd / "backbone.pth", device="cpu")
    feats = extract_features(model, [root / r.path for r in rows], "scda")
    for d in (DATASET, SHOP):
        save_features(wd / f"results/features/{d}/{MODEL}.npz", feats, [r.label for r in rows],
                      [r.path for r in rows], {"protocol": "scda"})
    queries = [_image(wd / "q1.png", 100, (70, 90)), _image(wd / "q2.png", 101)]
    qfeats = extract_features(model, queries, "scda")
    return wd, rows, feats, queries, qfeats


def test_retrieve_csv_is_brute_force_top_k(workdir):
    wd, rows, feats, queries, qfeats = workdir
    proc = subprocess.run([sys.executable, "-m", "cfga.cli", "retrieve", "q1.png", "q2.png", "--dataset", DATASET,
                           "--model", MODEL, "--feature", "scda", "--k", "4", "--csv", "-o", "out.png"],
                          cwd=wd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # the same threads, the same bits
    assert proc.returncode == 0, proc.stderr
    got = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert list(got[0]) == ["query", "rank", "path", "class", "similarity"] and len(got) == 8
    for qi, q in enumerate(["q1.png", "q2.png"]):
        sims = qfeats["scda"][qi].astype(np.float64) @ feats["scda"].astype(np.float64).T
        want = np.argsort(-sims, kind="stable")[:4]
        mine = [r for r in got if r["query"] == q]
        assert [r["path"] for r in mine] == [rows[j].path for j in want]
        assert [r["class"] for r in mine] == [rows[j].class_name for j in want]
        assert [int(r["rank"]) for r in mine] == [1, 2, 3, 4]
        assert np.allclose([float(r["similarity"]) for r in mine], sims[want], rtol=1e-12, atol=0)
    im = Image.open(wd / "out.png")
    assert im.width > 7 * 128 and im.height > 2 * 128  # query, 2 maps, 4 neighbours per row
    assert "wrote out.png" in proc.stderr


def test_retrieve_draws_the_cfga_maps_of_a_transformer(tmp_path, monkeypatch, capsys):
    """A Swin model: the figure holds the query, the CFGA maps of its two qkv layers, the neighbours."""
    from torchvision.models import swin_t

    from cfga.outputs import gallery
    from tests.reference.transformer_reference import jitter_norms

    rows, root = _dataset(tmp_path)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    torch.save(jitter_norms(swin_t(), 0).state_dict(), tmp_path / "swin.pth")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "datasets": {DATASET: {"format": "cub", "archive": "none.tgz"}},
        "models": {"swin": {"arch": "swin_t", "protocol": "scda", "checkpoint": "swin.pth"}},
        "extraction": {"device": "cpu"}}))
    model = load_model("swin_t", "scda", tmp_path / "swin.pth", device="cpu")
    feats = extract_features(model, [root / r.path for r in rows], "scda")
    save_features(tmp_path / f"results/features/{DATASET}/swin.npz", feats, [r.label for r in rows],
                  [r.path for r in rows], {"protocol": "scda"})
    _image(tmp_path / "q.png", 100, (70, 90))
    grids = []
    real = gallery.render_grid
    monkeypatch.setattr(gallery, "render_grid", lambda rows, *a, **kw: (grids.append(rows), real(rows, *a, **kw)))
    monkeypatch.chdir(tmp_path)
    assert main(["retrieve", "q.png", "--dataset", DATASET, "--model", "swin", "--k", "3", "-o", "out.png"]) == 0
    [[cells]] = grids
    assert [c.caption for c in cells[1:3]] == ["CFGA 4-0 qkv", "CFGA 4-1 qkv"] and len(cells) == 6
    assert Image.open(tmp_path / "out.png").width > 6 * 128
    assert "CFGA heatmaps" in capsys.readouterr().err


def test_retrieve_searches_only_the_gallery_rows(workdir, capsys, monkeypatch):
    wd, rows, feats, queries, qfeats = workdir
    monkeypatch.chdir(wd)
    assert main(["retrieve", "q1.png", "q2.png", "--dataset", SHOP, "--model", MODEL, "--feature", "scda",
                 "--k", "6", "--csv", "-o", "shop.png"]) == 0
    got = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    gallery = [i for i in range(len(rows)) if i % 3 != 0]
    for qi, q in enumerate(["q1.png", "q2.png"]):
        sims = qfeats["scda"][qi].astype(np.float64) @ feats["scda"][gallery].astype(np.float64).T
        want = [gallery[j] for j in np.argsort(-sims, kind="stable")]  # all 6 gallery rows, no query row
        mine = [r for r in got if r["query"] == q]
        assert [r["path"] for r in mine] == [rows[j].path for j in want]
        assert np.allclose([float(r["similarity"]) for r in mine], np.sort(sims)[::-1], rtol=1e-12, atol=0)
    assert main(["retrieve", "q1.png", "--dataset", SHOP, "--model", MODEL, "--k", "7", "-o", "bad.png"]) == 2
    assert "--k: 7 is larger than the gallery of shop (6 gallery images); pass --k 6" in capsys.readouterr().err
    assert not (wd / "bad.png").exists()


def test_retrieve_table_and_help(workdir, capsys):
    proc = subprocess.run([sys.executable, "-m", "cfga.cli", "retrieve", "--help"], capture_output=True, text=True)
    for opt in ("--dataset", "--model", "--feature", "--k", "--configfile", "--output", "--csv", "--device"):
        assert opt in proc.stdout


BAD = [
    (["notes.txt"], "QUERY: ", "not a readable image"),
    (["missing.png"], "QUERY: missing.png does not exist", ""),
    (["q1.png", "--dataset", "nope"], "--dataset: 'nope' is not in", "choose one of: mini"),
    (["q1.png", "--model", "nope"], "--model: 'nope' is not in", "choose one of: net"),
    (["q1.png", "--model", "other"], "--model: other does not run on mini", ""),
    (["q1.png", "--feature", "embedding"], "--feature: model net (protocol scda) does not produce 'embedding'",
     "choose one of: pooling"),
    (["q1.png", "--k", "10"], "--k: 10 is larger than the gallery of mini (9 test images)", "--k 9"),
    (["q1.png", "--configfile", "nope.yaml"], "--configfile: nope.yaml not found", ""),
]


@pytest.mark.parametrize("args,message,fix", BAD, ids=[b[1].split(":")[0] for b in BAD])
def test_bad_input_exits_2_and_writes_nothing(workdir, args, message, fix, capsys, monkeypatch):
    wd = workdir[0]
    (wd / "notes.txt").write_text("not an image")
    monkeypatch.chdir(wd)
    argv = ["retrieve", *args]
    for opt, val in (("--dataset", DATASET), ("--model", MODEL)):
        if opt not in argv:
            argv += [opt, val]
    before = sorted(p for p in wd.rglob("*"))
    assert main([*argv, "-o", "bad.png"]) == 2
    err = capsys.readouterr().err
    assert message in err and fix in err and err.count("\n") == 1
    assert sorted(p for p in wd.rglob("*")) == before


def test_missing_features_names_the_snakemake_target(workdir, tmp_path, capsys, monkeypatch):
    wd = workdir[0]
    (tmp_path / "config.yaml").write_text((wd / "config.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    assert main(["retrieve", str(wd / "q1.png"), "--dataset", DATASET, "--model", MODEL]) == 2
    err = capsys.readouterr().err
    assert f"`snakemake results/features/{DATASET}/{MODEL}.npz`" in err
    assert sorted(tmp_path.iterdir()) == [tmp_path / "config.yaml"]


def test_missing_or_other_manifest_names_the_fix(workdir, tmp_path, capsys, monkeypatch):
    wd = workdir[0]
    (tmp_path / "config.yaml").write_text((wd / "config.yaml").read_text())
    fpath = f"results/features/{DATASET}/{MODEL}.npz"
    (tmp_path / fpath).parent.mkdir(parents=True)
    shutil.copyfile(wd / fpath, tmp_path / fpath)
    monkeypatch.chdir(tmp_path)
    argv = ["retrieve", str(wd / "q1.png"), "--dataset", DATASET, "--model", MODEL, "-o", "x.png"]
    assert main(argv) == 2
    assert f"`snakemake results/manifests/{DATASET}.csv`" in capsys.readouterr().err
    # a manifest whose evaluated rows are not the features file's: rebuild the features
    write_manifest([ManifestRow("test", 0, "c", "other.png")], tmp_path / f"results/manifests/{DATASET}.csv")
    assert main(argv) == 2
    assert f"`snakemake --forcerun extract_features {fpath}`" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_subprocess_bad_input_exit_status(workdir):
    wd = workdir[0]
    proc = subprocess.run([sys.executable, "-m", "cfga.cli", "retrieve", "q1.png", "--dataset", "nope", "--model",
                           MODEL], cwd=wd, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("cfga retrieve: error: --dataset: 'nope'")
