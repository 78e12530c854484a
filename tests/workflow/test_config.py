"""The shipped configs validate against the schema; the paper config names every paper row."""
import pytest
import yaml
from snakemake.utils import validate

from cfga.outputs.tables import FAMILIES, load_published, model_family
from tests.helpers import REPO

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


@pytest.mark.workflow
def test_default_config_plans_from_another_working_directory(tmp_path):
    """--directory elsewhere: the relative `tables.published` resolves to the repository's file."""
    import shutil
    import subprocess
    import sys

    repo = REPO
    shutil.copy(repo / "config.yaml", tmp_path / "config.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(repo / "Snakefile"), "--directory", str(tmp_path),
         "--configfile", str(tmp_path / "config.yaml"), "--cores", "1", "-n", "all"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rule tables" in proc.stdout + proc.stderr


def test_retrieval_defaults_come_from_the_schema():
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg.pop("retrieval", None)
    validate(cfg, SCHEMA)
    assert cfg["retrieval"] == {"queries": 8, "k": 8, "features": ["pooling", "scda", "cfga_plus", "embedding"],
                                "compare": ["scda", "cfga_plus"]}


def test_retrieval_plan_and_unknown_feature(tmp_path):
    """The default plan has galleries, heatmaps and R@1 bars; a misspelt retrieval feature is named."""
    import subprocess
    import sys

    cfg = yaml.safe_load((REPO / "config.yaml").read_text())

    def plan(c):
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(c))
        return subprocess.run(
            [sys.executable, "-m", "snakemake", "-n", "all", "--snakefile", str(REPO / "Snakefile"), "--directory",
             str(tmp_path), "--configfile", str(tmp_path / "c.yaml"), "--cores", "1"],
            capture_output=True, text=True, timeout=300)

    proc = plan(cfg)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for target in ("results/retrieval/synth_cub/synthetic_r50/cfga_plus.csv",
                   "results/retrieval/synth_cars/ms_loss/embedding.png",
                   "results/retrieval/synth_cub/compare.png", "results/heatmaps/synth_cars/arcface.png",
                   "results/plots/recall_at_1_synth_cub.png"):
        assert target in out, target
    assert "results/retrieval/synth_cub/proxy_anchor/scda.png" not in out  # proxy_anchor has no SCDA
    cfg["retrieval"] = {"features": ["cfga_pls"]}
    proc = plan(cfg)
    assert proc.returncode != 0 and "retrieval.features names unknown features ['cfga_pls']" in proc.stdout + proc.stderr
