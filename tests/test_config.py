"""The shipped configs validate against the schema; the paper config names every paper row."""
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from cfga.outputs.tables import FAMILIES, load_published, model_family

REPO = Path(__file__).resolve().parents[1]
SCHEMA = str(REPO / "schemas" / "config.schema.yaml")


@pytest.mark.parametrize("name", ["config.yaml", "configs/paper.yaml"])
def test_shipped_configs_validate(name):
    validate(yaml.safe_load((REPO / name).read_text()), SCHEMA)


def test_paper_config_covers_every_published_row():
    cfg = yaml.safe_load((REPO / "configs/paper.yaml").read_text())
    pub = load_published(REPO / "paper" / "published_recall_at_1.csv")
    rows = {(d, m) for (_t, d, m, _f) in pub}
    have = {(cfg["datasets"][d]["paper"], c["paper"]) for c in cfg["models"].values() if "paper" in c
            for d in c.get("datasets", cfg["datasets"])}  # Transformer rows: no published values
    assert rows <= have
    fams = {FAMILIES[model_family(c)] for c in cfg["models"].values()}
    assert fams == set(FAMILIES.values())


def test_bad_key_is_named():
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg["models"]["synthetic_r50"]["protocl"] = "scda"
    with pytest.raises(Exception, match="protocl"):
        validate(cfg, SCHEMA)


def test_default_config_plans_from_another_working_directory(tmp_path):
    """--directory elsewhere: the relative `tables.published` resolves to the repository's file."""
    import shutil
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    shutil.copy(repo / "config.yaml", tmp_path / "config.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(repo / "Snakefile"), "--directory", str(tmp_path),
         "--configfile", str(tmp_path / "config.yaml"), "--cores", "1", "-n", "all"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rule tables" in proc.stdout + proc.stderr
