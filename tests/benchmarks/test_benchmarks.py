"""The benchmark scripts stay runnable (tiny sizes; the figures themselves are in BENCHMARKS.md)."""
import json
import subprocess
import sys

import pytest

from cfga.runtime import usable_cores
from tests.helpers import REPO

ROOT = REPO


def _run(script, *args, cwd):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                          capture_output=True, text=True, timeout=600, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_extract_speed_runs_and_cfga_matches_the_authors_pattern(tmp_path):
    out = tmp_path / "summary.json"
    stdout = _run("extract_speed.py", "--n", "3", "--repeats", "1", "--size", "96x128", "--threads", "1",
                  "--json", str(out), cwd=tmp_path)
    assert "cfga/floor" in stdout
    summary = json.loads(out.read_text())
    assert set(summary["s_per_image"]) == {"authors", "floor", "floor_tuned", "cfga"}
    assert summary["min_cosine_vs_authors"] >= 0.9999
    # A borderline cell of the strict CFGA selection may flip between the authors' batch-1 float
    # order and ours (method.md S13: single entries move by up to ~1e-4; 1.08e-4 seen on this
    # machine's current CPU with the code of e7fc323 too); more than that is a real difference.
    assert summary["max_abs_dev_vs_authors"] < 2e-4
    assert summary["decode_ahead"] == (usable_cores() > 1)  # 1 torch thread: decode ahead iff a core is free


@pytest.mark.parametrize("script,args", [
    pytest.param("metrics_speed.py", ["--n", "600", "--dim", "16", "--repeats", "1", "--threads", "1"],
                 marks=pytest.mark.slow),
    pytest.param("metrics_speed.py", ["--suite", "--n", "600", "--configs", "cub:16,sop:16", "--threads", "1"],
                 marks=pytest.mark.slow),
    ("featurestore_speed.py", ["--rows", "40", "--repeats", "1"]),
])
def test_other_benchmarks_run(script, args, tmp_path):
    assert _run(script, *args, cwd=tmp_path).strip()


def test_retrieve_speed_runs(tmp_path):
    out = tmp_path / "summary.json"
    _run("retrieve_speed.py", "--gallery", "30", "--repeats", "1", "--threads", "1", "--json", str(out), cwd=tmp_path)
    summary = json.loads(out.read_text())
    assert summary["gallery"] == 30 and len(summary["seconds"]) == 1 and summary["median_s"] > 0


def test_extract_speed_runs_for_a_swin(tmp_path):
    out = tmp_path / "summary.json"
    stdout = _run("extract_speed.py", "--arch", "swin_t", "--n", "2", "--repeats", "1", "--size", "96x128",
                  "--threads", "1", "--json", str(out), cwd=tmp_path)
    assert "cfga/floor" in stdout
    summary = json.loads(out.read_text())
    assert set(summary["s_per_image"]) == {"floor", "cfga"}
    assert "cfga_4_1_fc2" in summary["features"] and summary["protocol"] == "scda"
    assert summary["max_abs_dev_vs_batch_size_1"] < 1e-5


def test_transformer_stages_runs_and_reports_every_stage(tmp_path):
    stdout = _run("transformer_stages.py", "swin_t", "64", "96", "scda", "--batch", "2", "--threads", "1",
                  "--repeats", "1", cwd=tmp_path)
    stages = {line.split()[0] for line in stdout.splitlines()[1:]}
    assert stages == {"floor", "trunk", "tail", "backward", "vectors", "cfga", "cfga/floor"}
