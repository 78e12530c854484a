"""Sharded extraction and exact incremental reruns (issue 5).

One real run of a small config (module fixture `wf`) then mostly dry-runs (`-n`): a rerun test
asserts which jobs Snakemake plans, nothing else. Every run uses a snapshot of the workflow
sources taken when the module starts (Snakefile, rules, scripts, cfga; PYTHONPATH points the jobs
at its cfga), so edits elsewhere in the checkout cannot change results mid-module. Code edits
happen in further copies of that snapshot, run on the same working directory.

The rerun triggers relied on (rules/features.smk, rules/tables.smk): the checkpoint is an input
(mtime: a checkpoint is > 1 MB, so Snakemake does not checksum it); params `code` is a fingerprint
of the cfga code features (resp. tables) depend on; params carry the model and extraction
settings; a new model is new targets; scripts by their mtime (Snakemake's own "code" trigger).
"""
import contextlib
import copy
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cfga.registry.features import features_for
from tests.helpers import REPO
from tests.workflow.smk import TINY, counts, nothing_to_do, planned

# every test here builds on real runs
pytestmark = [pytest.mark.workflow, pytest.mark.slow]

# Two datasets of 8 test images (the least the synthetic writer makes); models given by
# `checkpoint:` files (no training here: tests/test_workflow.py trains): `r50`, a seeded
# torchvision ResNet-50 (scda protocol: every test image has its own size, so batches of one),
# then `ext`, its trunk with a 512-d head in the MS-loss format (ms protocol: one crop size,
# batches of 2).
R0 = {
    "datasets": {
        "r_cub": {"format": "cub", "synthetic": {"classes": 4, "images_per_class": 4, "seed": 3}},
        "r_cars": {"format": "cars", "synthetic": {"classes": 4, "images_per_class": 4, "seed": 4}},
    },
    "models": {"r50": {"arch": "resnet50", "protocol": "scda", "checkpoint": "r50.pth"}},
    "extraction": {"device": "cpu", "batch_size": 2},
    "tables": copy.deepcopy(TINY["tables"]),
}
R1 = copy.deepcopy(R0)
R1["models"]["ext"] = {"arch": "resnet50", "protocol": "ms", "checkpoint": "ext.pth", "datasets": ["r_cub"]}
N_TEST = 8
MS_FEATURES = len(features_for("ms"))
SCDA_FEATURES = len(features_for("scda"))


def smk_command(workdir, *args, config, src, name="config.yaml"):
    """(command, environment) of a snakemake run of the workflow copy ``src`` in ``workdir``; run it in
    ``src`` (`python -m` puts the current directory first on sys.path: that cfga is imported)."""
    cfg = Path(workdir) / name
    cfg.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(src / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", *args, "--configfile", str(cfg)]
    return cmd, {**os.environ, "PYTHONPATH": str(src)}


def smk(workdir, *args, config, src, check=True, name="config.yaml"):
    cmd, env = smk_command(workdir, *args, config=config, src=src, name=name)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=src)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def workflow_copy(dst: Path, base: Path = REPO) -> Path:
    """The workflow's sources, copied (mtimes kept: scripts stay older than the outputs)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    dst.mkdir(parents=True)
    shutil.copy2(base / "Snakefile", dst / "Snakefile")
    for d in ("rules", "workflow_scripts", "schemas", "cfga", "report", "profiles/default"):
        shutil.copytree(base / d, dst / d, ignore=ignore)
    return dst


def edit(path: Path, old: str | None, new: str) -> None:
    """Replace ``old`` by ``new`` in ``path`` (append ``new`` when ``old`` is None)."""
    text = path.read_text()
    if old is None:
        text += new
    else:
        assert old in text, f"{old!r} not in {path}"
        text = text.replace(old, new, 1)
    path.write_text(text)


def clone(src: Path, dst: Path) -> Path:
    """A copy of a working directory, .snakemake metadata and mtimes included."""
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("locks"))
    return dst


def feature_bytes(wd: Path) -> dict[str, bytes]:
    return {p.relative_to(wd).as_posix(): p.read_bytes() for p in sorted((wd / "results/features").glob("*/*.npz"))}


def write_ms_checkpoint(backbone: Path, out: Path, seed: int = 0, bump: float = 0.0) -> None:
    """An MS-loss-format checkpoint: the trunk of a torchvision file plus a seeded 512-d head (written atomically)."""
    import torch

    state = {k: v for k, v in torch.load(backbone, weights_only=True).items() if not k.startswith("fc.")}
    g = torch.Generator().manual_seed(seed)
    state["class_fc.weight"] = torch.randn(512, 2048, generator=g) * 0.02 + bump
    state["class_fc.bias"] = torch.zeros(512)
    tmp = out.with_suffix(".tmp")
    torch.save({"model": state}, tmp)
    os.replace(tmp, out)


@pytest.fixture(scope="module")
def wf(tmp_path_factory, resnet50_checkpoint):
    """The reference working directory: `all` of R0, then `ext` added (dry-run kept), then `all` of R1."""
    src = workflow_copy(tmp_path_factory.mktemp("src") / "workflow")
    wd = tmp_path_factory.mktemp("reruns")
    shutil.copyfile(resnet50_checkpoint, wd / "r50.pth")  # a seeded torchvision ResNet-50
    smk(wd, "all", config=R0, src=src)
    write_ms_checkpoint(wd / "r50.pth", wd / "ext.pth")
    add_dryrun = smk(wd, "-n", "all", config=R1, src=src)
    smk(wd, "all", config=R1, src=src)
    return {"wd": wd, "add_dryrun": add_dryrun, "src": src, "features": feature_bytes(wd)}


# The galleries, heatmaps and R@1 bar charts (issue 14) follow the features and cells they read;
# most tests pin the reruns of the extraction, metrics, tables and recall-curve rules (core_counts),
# test_view_rules_rerun_on_what_they_read those of the views (view_counts).
VIEW_RULES = ("retrieval_", "heatmaps_", "recall_at_1_plot")


def core_counts(jobs):
    return counts([j for j in jobs if not j["rule"].startswith(VIEW_RULES)])


def view_counts(jobs):
    return counts([j for j in jobs if j["rule"].startswith(VIEW_RULES)])


def expected_model_jobs(datasets, n_features):
    """Jobs of one model from its checkpoint on: extraction, its cells, the tables, its datasets' plots."""
    return {"extract_features": len(datasets), "compute_metrics": len(datasets) * n_features,
            "tables": 1, "recall_plot": len(datasets)}


# --------------------------------------------------------------------------------------------
# incremental reruns


def test_reference_run_is_complete_and_stable(wf):
    assert set(wf["features"]) == {"results/features/r_cub/r50.npz", "results/features/r_cars/r50.npz",
                                   "results/features/r_cub/ext.npz"}
    assert nothing_to_do(smk(wf["wd"], "-n", "all", config=R1, src=wf["src"]))
    # a fresh copy of the sources is neutral (mtimes and code fingerprints unchanged)
    fresh = workflow_copy(wf["wd"].parent / "copy", wf["src"])
    assert nothing_to_do(smk(wf["wd"], "-n", "all", config=R1, src=fresh))


def test_adding_a_model_adds_only_its_jobs(wf):
    jobs = planned(wf["add_dryrun"])
    assert core_counts(jobs) == expected_model_jobs(["r_cub"], MS_FEATURES), jobs
    assert all(j["wildcards"].get("model", "ext") == "ext" for j in jobs)
    assert [j["wildcards"] for j in jobs if j["rule"] == "recall_plot"] == [{"dataset": "r_cub"}]


def test_changed_checkpoint_reruns_only_that_model(wf, tmp_path):
    wd = clone(wf["wd"], tmp_path / "wd")
    write_ms_checkpoint(wd / "r50.pth", wd / "ext.pth", bump=1e-3)
    jobs = planned(smk(wd, "-n", "all", config=R1, src=wf["src"]))
    assert core_counts(jobs) == expected_model_jobs(["r_cub"], MS_FEATURES), jobs
    assert all(j["wildcards"].get("model", "ext") == "ext" for j in jobs)
    assert "Updated input files: ext.pth" in next(j["reason"] for j in jobs if j["rule"] == "extract_features")
    # the views of that model: its galleries and side-by-side figure (GALLERY_JOBS), its dataset's
    # heatmaps (one job for every model there) and R@1 chart
    assert view_counts(jobs) == {"retrieval_gallery_ext": 1, "retrieval_compare": 1, "heatmaps_r_cub": 1,
                                 "recall_at_1_plot": 1}, jobs


def test_table_layout_change_reruns_only_tables(wf, tmp_path):
    src = workflow_copy(tmp_path / "workflow", wf["src"])
    edit(src / "cfga/outputs/tables.py", None, "\n_RERUN_TEST_LAYOUT = 1\n")
    jobs = planned(smk(wf["wd"], "-n", "all", config=R1, src=src))
    assert core_counts(jobs) == {"tables": 1}, jobs
    assert "Params have changed" in jobs[0]["reason"]

    # a column renamed in the feature registry: tables only (extraction reads names and dims, not columns)
    src2 = workflow_copy(tmp_path / "workflow2", wf["src"])
    edit(src2 / "cfga/registry/features.py", 'Feature("cfga_plus", 1024, "CFGA+"', 'Feature("cfga_plus", 1024, "CFGA plus"')
    jobs = planned(smk(wf["wd"], "-n", "all", config=R1, src=src2))
    assert core_counts(jobs) == {"tables": 1}, jobs

    # a model's paper row (a table setting of the config): tables only
    cfg = copy.deepcopy(R1)
    cfg["models"]["r50"]["paper"] = "resnet50_imagenet"
    jobs = planned(smk(wf["wd"], "-n", "all", config=cfg, src=wf["src"], name="paper.yaml"))
    assert core_counts(jobs) == {"tables": 1}, jobs
    # ... and a dataset's (synthesis and ingestion read only their own keys)
    cfg["datasets"]["r_cub"]["paper"] = "cub"
    jobs = planned(smk(wf["wd"], "-n", "all", config=cfg, src=wf["src"], name="paper.yaml"))
    assert core_counts(jobs) == {"tables": 1}, jobs


def test_keys_a_job_does_not_read_rerun_nothing(wf):
    cfg = copy.deepcopy(R1)
    cfg["datasets"]["r_cub"]["extraction_shards"] = 1  # the default, spelled out
    cfg["metrics"] = {"device": "cpu"}  # the default
    cfg["models"]["r50"]["allow_pickle"] = False  # the default
    proc = smk(wf["wd"], "-n", "all", config=cfg, src=wf["src"], name="keys.yaml")
    assert nothing_to_do(proc) or not core_counts(planned(proc)), proc.stdout[-3000:]


def test_feature_code_change_reextracts(wf, tmp_path):
    src = workflow_copy(tmp_path / "workflow", wf["src"])
    # comments and docstrings are not code: nothing reruns
    edit(src / "cfga/extraction/pipeline.py", None, "\n# a comment only\n")
    edit(src / "cfga/numerics/gradients.py", '"""', '"""(an edited docstring) ')
    assert nothing_to_do(smk(wf["wd"], "-n", "all", config=R1, src=src))

    # a code change re-extracts every (dataset, model), hence every cell, the tables and plots
    edit(src / "cfga/extraction/pipeline.py", None, "\n_RERUN_TEST_CONSTANT = 1\n")
    jobs = planned(smk(wf["wd"], "-n", "all", config=R1, src=src))
    assert core_counts(jobs) == {"extract_features": 3, "compute_metrics": 2 * SCDA_FEATURES + MS_FEATURES,
                            "tables": 1, "recall_plot": 2}, jobs
    assert all("Params have changed" in j["reason"] for j in jobs if j["rule"] == "extract_features"), jobs


# The view jobs of R1: a gallery job per (dataset, model), the side-by-side figure per dataset (of
# the first model in the config file with SCDA and CFGA+: ext on r_cub, since yaml.safe_dump sorts
# the keys; r50 on r_cars), a heatmap job per dataset, an R@1 chart per dataset.
GALLERY_JOBS = {"retrieval_gallery_r50": 2, "retrieval_gallery_ext": 1, "retrieval_compare": 2}


def test_view_rules_rerun_on_what_they_read(wf, tmp_path):
    """A second `all` plans no view job (test_reference_run_is_complete_and_stable); `retrieval:`
    reruns the views that read it and nothing upstream; new features of one model rerun that
    model's galleries and its dataset's R@1 chart (through the cells), nothing of the other models."""
    from cfga.extraction.store import load_features, save_features

    wd, src = wf["wd"], wf["src"]
    # retrieval.k: the galleries only (the heatmaps show no neighbours)
    cfg = copy.deepcopy(R1)
    cfg["retrieval"] = {"k": 3}
    jobs = planned(smk(wd, "-n", "all", config=cfg, src=src, name="retrieval.yaml"))
    assert counts(jobs) == GALLERY_JOBS, jobs
    assert all("Params have changed" in j["reason"] for j in jobs), jobs
    # retrieval.queries: the heatmaps too (they show the galleries' queries)
    cfg["retrieval"] = {"queries": 3}
    jobs = planned(smk(wd, "-n", "all", config=cfg, src=src, name="retrieval.yaml"))
    assert counts(jobs) == {**GALLERY_JOBS, "heatmaps_r_cub": 1, "heatmaps_r_cars": 1}, jobs

    # ext's r_cub features touched, the same bytes: nothing (a file this small is checksummed)
    wd = clone(wd, tmp_path / "wd")
    target = wd / "results/features/r_cub/ext.npz"
    os.utime(target)
    assert nothing_to_do(smk(wd, "-n", "all", config=R1, src=src))
    # ... written anew with other values: its cells, the tables, r_cub's plots, ext's galleries (and
    # r_cub's side-by-side figure, ext's); the heatmaps read the checkpoints, not the features
    feats, labels, paths, meta = load_features(target)
    save_features(target, {k: v * 2 for k, v in feats.items()}, labels, paths, meta)
    jobs = planned(smk(wd, "-n", "all", config=R1, src=src))
    assert view_counts(jobs) == {"retrieval_gallery_ext": 1, "retrieval_compare": 1, "recall_at_1_plot": 1}, jobs
    assert core_counts(jobs) == {"compute_metrics": MS_FEATURES, "tables": 1, "recall_plot": 1}, jobs
    assert all(j["wildcards"].get("dataset", "r_cub") == "r_cub" for j in jobs), jobs
    assert all("Updated input files: results/features/r_cub/ext.npz" in j["reason"]
               for j in jobs if j["rule"].startswith("retrieval_")), jobs


# --------------------------------------------------------------------------------------------
# sharding


def sharded(config, shards=3, **per_dataset):
    cfg = copy.deepcopy(config)
    cfg["extraction_shards"] = shards
    for ds, n in per_dataset.items():
        cfg["datasets"][ds]["extraction_shards"] = n
    return cfg


def test_sharding_plan(wf, tmp_path):
    """Global 3 shards, 9 for r_cars (more than its 8 test images); nothing upstream reruns."""
    wd = clone(wf["wd"], tmp_path / "wd")
    shutil.rmtree(wd / "results/features")
    jobs = planned(smk(wd, "-n", *wf["features"], config=sharded(R1, r_cars=9), src=wf["src"]))
    assert core_counts(jobs) == {"extract_features_shard": 3 + 3 + 9, "gather_features": 3}, jobs
    shards = sorted(tuple(j["wildcards"][k] for k in ("dataset", "model", "nshards", "shard"))
                    for j in jobs if j["rule"] == "extract_features_shard")
    assert shards == sorted([("r_cub", m, "3", str(i)) for m in ("r50", "ext") for i in range(3)]
                            + [("r_cars", "r50", "9", str(i)) for i in range(9)])
    # a shard runs like the unsharded job: the profile's threads for extract_features, a GPU
    proc = smk(wd, "-n", "results/features/r_cub/ext.npz", config=sharded(R1), src=wf["src"])
    blocks = [b for b in (proc.stdout + proc.stderr).split("\n\n") if "rule extract_features_shard:" in b]
    assert len(blocks) == 3 and all("threads: 2" in b and "gpu=1" in b for b in blocks), blocks
    # ... and whatever a profile's set-threads / set-resources give extract_features (SLURM partition, …)
    proc = smk(wd, "-n", "results/features/r_cub/ext.npz", "--set-threads", "extract_features=1",
               "--set-resources", "extract_features:mem_mb=1234", config=sharded(R1), src=wf["src"])
    blocks = [b for b in (proc.stdout + proc.stderr).split("\n\n") if "rule extract_features_shard:" in b]
    # (threads: 1 is not printed)
    assert len(blocks) == 3 and all("threads:" not in b and "mem_mb=1234" in b for b in blocks), blocks


def test_sharded_extraction_is_byte_identical(wf, tmp_path):
    """ext (ms protocol: one crop size, 4 batches of 2) in 5 shards, more than its batches."""
    wd = clone(wf["wd"], tmp_path / "wd")
    target = "results/features/r_cub/ext.npz"
    (wd / target).unlink()
    cfg = sharded(R1, shards=5)
    jobs = planned(smk(wd, "-n", target, config=cfg, src=wf["src"]))
    assert core_counts(jobs) == {"extract_features_shard": 5, "gather_features": 1}, jobs
    smk(wd, target, config=cfg, src=wf["src"])
    assert (wd / target).read_bytes() == wf["features"][target]
    assert not list((wd / "results/features").rglob("shards/*.npz"))  # temporary
    logs = [(wd / f"logs/features/r_cub/shards/ext.{i}-of-5.log").read_text() for i in range(5)]
    taken = [int(re.search(rf"shard \d of 5: (\d+) of {N_TEST} test images", t).group(1)) for t in logs]
    assert taken == [2, 2, 0, 2, 2], taken  # whole batches; a shard with none is empty
    assert all("2 threads" in t for t in logs)
    assert nothing_to_do(smk(wd, "-n", target, config=cfg, src=wf["src"]))


# --------------------------------------------------------------------------------------------
# a killed run


def test_killed_run_resumes_without_cleanup(wf, tmp_path):
    wd = clone(wf["wd"], tmp_path / "wd")
    target = wd / "results/features/r_cub/ext.npz"
    log = wd / "logs/features/r_cub/ext.log"
    cmd, env = smk_command(wd, "all", config=R1, src=wf["src"])
    # The 8-image extraction takes well under a second once its model is loaded, so the run is
    # killed the moment the job logs that it starts extracting; should it still win the race
    # (a stalled test process), the attempt is repeated rather than the test failed.
    for _attempt in range(3):
        # the state of a run that has not extracted ext yet: no ext features, cells, tables, r_cub
        # plot (Snakemake does not rebuild a missing file whose dependents are all present and up to date)
        target.unlink(missing_ok=True)
        log.unlink(missing_ok=True)
        shutil.rmtree(wd / "results/metrics/r_cub/ext", ignore_errors=True)
        shutil.rmtree(wd / "results/tables", ignore_errors=True)
        (wd / "results/plots/recall_at_k_r_cub.png").unlink(missing_ok=True)
        with open(tmp_path / "killed.log", "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=wf["src"],
                                    start_new_session=True)
            try:
                deadline = time.monotonic() + 300
                while not (log.exists() and "test images on" in log.read_text()):
                    assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                    assert time.monotonic() < deadline, "extraction never started"
                    time.sleep(0.02)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # snakemake and its jobs: one process group
                proc.wait()
        if not target.exists():
            break
    else:
        pytest.fail("the run finished before it was killed, 3 times")
    assert list((wd / ".snakemake/locks").glob("*.lock")), "a SIGKILLed run leaves Snakemake's locks"

    rerun = smk(wd, "all", config=R1, src=wf["src"])  # the next plain invocation: no --unlock, no cleanup
    err = rerun.stdout + rerun.stderr
    assert "stale lock" in err
    assert "Using workflow specific profile" in err  # profiles/default: rerun-incomplete, threads
    assert feature_bytes(wd) == wf["features"]
    assert nothing_to_do(smk(wd, "-n", "all", config=R1, src=wf["src"]))
