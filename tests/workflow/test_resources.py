"""Shard jobs get extract_features' threads and resources (cfga.workflow.resources)."""
import copy
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from cfga.workflow.resources import THREADS, inherited_resources, overridden

REPO = Path(__file__).resolve().parents[2]


def test_source_values_win_except_the_targets_own():
    src = {THREADS: 4, "gpu": 1, "mem_mb": 1000, "slurm_partition": "gpu"}
    dst = {THREADS: 1, "gpu": 1, "mem_mb": 50, "runtime": 9}
    assert inherited_resources(src, dst, set()) == {THREADS: 4, "gpu": 1, "mem_mb": 1000, "slurm_partition": "gpu",
                                                    "runtime": 9}
    assert inherited_resources(src, dst, {"mem_mb", THREADS}) == {THREADS: 1, "gpu": 1, "mem_mb": 50,
                                                                  "slurm_partition": "gpu", "runtime": 9}
    assert dst == {THREADS: 1, "gpu": 1, "mem_mb": 50, "runtime": 9}  # not modified


def test_overridden_reads_set_threads_and_set_resources():
    rs = SimpleNamespace(overwrite_resources={"extract_features_shard": {"mem_mb": 5}, "other": {"x": 1}},
                         overwrite_threads={"extract_features_shard": 3})
    assert overridden(rs, "extract_features_shard") == {"mem_mb", THREADS}
    assert overridden(rs, "extract_features") == set()
    assert overridden(SimpleNamespace(overwrite_resources=None, overwrite_threads=None), "x") == set()


CONFIG = {
    "datasets": {"s_cub": {"format": "cub", "synthetic": {"classes": 4, "images_per_class": 4}}},
    "models": {"s_r50": {"arch": "resnet50", "protocol": "scda", "checkpoint": "r50.pth"}},
    "extraction_shards": 2,
}
TARGET = "results/features/s_cub/s_r50.npz"


def shard_blocks(wd, *args):
    (wd / "r50.pth").touch()
    cfg = wd / "config.yaml"
    cfg.write_text(yaml.safe_dump(copy.deepcopy(CONFIG)))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(wd),
           "--cores", "2", "-n", TARGET, *args, "--configfile", str(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    blocks = [b for b in (proc.stdout + proc.stderr).split("\n\n") if "rule extract_features_shard:" in b]
    assert len(blocks) == 2, blocks
    return blocks


@pytest.mark.workflow
def test_dry_run_shows_inherited_and_own_settings(tmp_path):
    blocks = shard_blocks(tmp_path, "--set-threads", "extract_features=2",
                          "--set-resources", "extract_features:mem_mb=1234", "extract_features:gpu=3")
    assert all("threads: 2" in b and "mem_mb=1234" in b and "gpu=3" in b for b in blocks), blocks
    # set for the shard rule itself: those win
    blocks = shard_blocks(tmp_path, "--set-threads", "extract_features=2", "extract_features_shard=1",
                          "--set-resources", "extract_features:mem_mb=1234", "extract_features_shard:mem_mb=99")
    assert all("threads:" not in b and "mem_mb=99" in b and "gpu=1" in b for b in blocks), blocks
