"""`snakemake --report` of a tiny run, opened in a real headless Chromium: the categories are there,
and every gallery and heatmap image of the report is present and loads (decoded by the browser,
not just a file in the archive)."""
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.workflow.browser import Browser, find_chromium

pytestmark = [pytest.mark.workflow, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TINY = {
    "datasets": {"mini_cub": {"format": "cub", "synthetic": {"classes": 4, "images_per_class": 4, "seed": 5}}},
    "models": {"mini_r50": {"arch": "resnet50", "protocol": "scda",
                            "pretrain": {"epochs": 1, "image_size": 32, "batch_size": 8, "seed": 0}}},
    "extraction": {"device": "cpu", "batch_size": 4},
    "tables": {"published": str(REPO / "paper" / "published_recall_at_1.csv")},
    "retrieval": {"queries": 2, "k": 3},
}


def snakemake(wd, *args):
    cmd = [sys.executable, "-m", "snakemake", *args, "--snakefile", str(REPO / "Snakefile"), "--directory", str(wd),
           "--cores", "2", "--configfile", str(wd / "config.yaml")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    wd = tmp_path_factory.mktemp("report")
    (wd / "config.yaml").write_text(yaml.safe_dump(TINY))
    snakemake(wd, "all")
    snakemake(wd, "--report", "report.html")
    snakemake(wd, "--report", "report.zip")
    return wd


def _figures(wd):
    """(category, dataset, labels as shown in the report's table, PNG size) of every figure to check."""
    out = []
    for png in sorted((wd / "results/retrieval").rglob("*.png")):
        rel = png.relative_to(wd / "results/retrieval").parts
        if rel[-1] == "compare.png":
            labels = ["SCDA vs CFGA+", "side by side"]
        else:
            from cfga.registry.features import FEATURES

            labels = [rel[1], FEATURES[png.stem].column, "gallery"]
        out.append(("Retrieval", rel[0], labels, Image.open(png).size))
    for png in sorted((wd / "results/heatmaps").rglob("*.png")):
        out.append(("Heatmaps", png.parent.name, [png.stem, "CFGA maps"], Image.open(png).size))
    return out


def test_report_zip_holds_galleries_heatmaps_and_plots(report):
    with zipfile.ZipFile(report / "report.zip") as z:
        names = z.namelist()
    for stem in ("compare.png", "cfga_plus.png", "cfga_plus.csv", "mini_r50.png", "recall_at_1_mini_cub.png",
                 "recall_at_k_mini_cub.png", "table5.csv"):
        assert any(n.endswith("/" + stem) for n in names), stem


# The innermost element showing exactly this text (menu entries are nested links and spans).
_CLICK = "(t => { const el = Array.from(document.querySelectorAll('a,button,li,td,span,div'))" \
         ".filter(e => e.innerText && e.innerText.trim() === t).pop(); if (!el) return false; el.click();" \
         " return true; })(%s)"
# The eye button of the result row showing all these labels.
_EYE = "(cells => { const row = Array.from(document.querySelectorAll('tr')).find(r => r.querySelector('a[iconname=eye]')" \
       " && cells.every(c => Array.from(r.cells).some(d => d.innerText.trim() === c))); if (!row) return false;" \
       " row.querySelector('a[iconname=eye]').click(); return true; })(%s)"
_SHOWN = "Array.from(document.images).filter(i => i.src.startsWith('data:image/png') && i.complete)" \
         ".map(i => [i.naturalWidth, i.naturalHeight])"


def test_report_opens_in_chromium_and_its_images_load(report):
    exe = find_chromium()
    if exe is None:
        pytest.skip("no Chromium on this machine: install Debian's `chromium` (apt-get install -y chromium; "
                    ".ci/run does it)")
    figures = _figures(report)
    assert {c for c, *_ in figures} == {"Retrieval", "Heatmaps"}
    url = (report / "report.html").as_uri()
    with Browser(exe, timeout=90) as b:
        b.open(url)
        b.wait_for("document.body.innerText.includes('Heatmaps')")
        menu = b.eval("document.body.innerText")
        for category in ("Tables", "Plots", "Retrieval", "Heatmaps"):
            assert category in menu
        for category, dataset, labels, size in figures:
            b.open(url)  # fresh page: the result list, not the last image viewer
            b.wait_for("document.body.innerText.includes('Heatmaps')")
            assert b.eval(_CLICK % json.dumps(category)), category
            # several datasets: a list of subcategories to open; a single one may open directly
            b.wait_for(f"document.body.innerText.includes({json.dumps(dataset)})"
                       " || document.querySelector('a[iconname=eye]')")
            b.eval(_CLICK % json.dumps(dataset))
            b.wait_for(_EYE.replace("row.querySelector('a[iconname=eye]').click(); ", "") % json.dumps(labels))
            assert b.eval(_EYE % json.dumps(labels)), labels
            end = time.monotonic() + 60
            while [list(size)] != [s for s in b.eval(_SHOWN) if s[0] > 100] and time.monotonic() < end:
                time.sleep(0.2)
            shown = [s for s in b.eval(_SHOWN) if s[0] > 100]  # the logo is smaller
            assert shown == [list(size)], (category, dataset, labels, shown, size)
