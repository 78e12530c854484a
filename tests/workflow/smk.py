"""Running Snakemake from the tests: the tiny config, and reading a dry run's plan."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers import REPO

TINY = {
    "datasets": {
        "tiny_cub": {"format": "cub", "synthetic": {"classes": 6, "images_per_class": 5, "seed": 3}},
        "tiny_cars": {"format": "cars", "synthetic": {"classes": 6, "images_per_class": 5, "seed": 4}},
    },
    "models": {
        "tiny_r50": {"arch": "resnet50", "protocol": "scda",
                     "pretrain": {"epochs": 1, "image_size": 48, "batch_size": 8, "seed": 0}},
        # a DML model trained by the pipeline (authors' ms format), on one dataset only
        "tiny_ms": {"arch": "resnet50", "protocol": "ms", "datasets": ["tiny_cub"],
                    "train": {"loss": "ms", "from": "tiny_r50", "epochs": 1, "image_size": 48, "batch_size": 8}},
    },
    "extraction": {"device": "cpu", "batch_size": 4},
    "tables": {"published": str(REPO / "paper" / "published_recall_at_1.csv")},
}


def snakemake(workdir, *args, config=TINY, check=True):
    """A snakemake run of the repository's workflow in ``workdir`` on ``config``."""
    cfg = Path(workdir) / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
           str(workdir), "--cores", "2", *args, "--configfile", str(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def planned(proc) -> list[dict]:
    """{rule, wildcards, reason, output} of every job a dry-run plans, except `all`."""
    jobs = []
    for line in (proc.stdout + proc.stderr).splitlines():
        m = re.match(r"^(?:local)?rule (\w+):$", line)
        if m:
            jobs.append({"rule": m.group(1), "wildcards": {}, "reason": "", "output": []})
        elif jobs and (m := re.match(r"^\s+wildcards: (.*)$", line)):
            jobs[-1]["wildcards"].update(kv.split("=", 1) for kv in m.group(1).split(", "))
        elif jobs and (m := re.match(r"^\s+reason: (.*)$", line)):
            jobs[-1]["reason"] = m.group(1)
        elif jobs and (m := re.match(r"^\s+output: (.*)$", line)):
            jobs[-1]["output"] = m.group(1).split(", ")
    return [j for j in jobs if j["rule"] != "all"]


def counts(jobs) -> dict[str, int]:
    out: dict[str, int] = {}
    for j in jobs:
        out[j["rule"]] = out.get(j["rule"], 0) + 1
    return out


def nothing_to_do(proc) -> bool:
    return "Nothing to be done" in proc.stdout + proc.stderr
