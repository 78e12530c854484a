"""The workflow on a real (single-node, loopback) SLURM through profiles/slurm.

tools/slurm-local.sh starts munged, slurmctld and slurmd under a temporary directory (one node,
one fake GPU: gres gpu:1 on /dev/null). The tiny workflow is then run through a site copy of
profiles/slurm: the profile as shipped, with only what a site edits changed (threads and memory
for this node, i.e. profiles/default's threads so that the numbers can be compared bit for bit)
plus the two local adjustments tools/slurm-local.sh names (`--slurm-status-command squeue`, as
there is no accounting database; its PATH wrappers for the SLURM clients) and a short first
status check. Checked: every job went through sbatch; the GPU rules asked for a GPU (`--gpus=1`
in the sbatch call, `gres:gpu:1` in SLURM's own record) and the CPU rules did not; the results
equal a local run's. The daemons are stopped by their PIDs in the fixture's teardown, also when
the test fails.

Needs root and Debian's slurm-wlm + munge (`bash tools/slurm-local.sh install`); skipped
otherwise, unless CFGA_REQUIRE_SLURM=1 (set by .ci/run), where it fails instead.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.helpers import REPO

TOOL = REPO / "tools" / "slurm-local.sh"
PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
LOCAL_PROFILE = REPO / "profiles" / "default" / "config.yaml"
DAEMONS = ("slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged")

# One dataset; a backbone the pipeline pretrains and a DML model trained from it: all three GPU
# rules run, and the CPU rules synthesize_cub, ingest_dataset, compute_metrics.
CONFIG = {
    "datasets": {"tiny_cub": {"format": "cub", "synthetic": {"classes": 6, "images_per_class": 5, "seed": 3}}},
    "models": {
        "tiny_r50": {"arch": "resnet50", "protocol": "scda",
                     "pretrain": {"epochs": 1, "image_size": 48, "batch_size": 8, "seed": 0}},
        "tiny_ms": {"arch": "resnet50", "protocol": "ms",
                    "train": {"loss": "ms", "from": "tiny_r50", "epochs": 1, "image_size": 48, "batch_size": 8}},
    },
    # cpu: the fake GPU has no CUDA anyway, and a machine with a real one still compares CPU runs
    "extraction": {"device": "cpu", "batch_size": 4},
    "tables": {"published": str(REPO / "paper" / "published_recall_at_1.csv")},
}
TARGETS = [
    "results/metrics/tiny_cub/tiny_r50/cfga_plus.json",
    "results/metrics/tiny_cub/tiny_r50/scda.json",
    "results/checkpoints/trained/tiny_cub/tiny_ms.pth",
]
GPU_RULES = {"pretrain_backbone", "train_dml", "extract_features"}
CPU_RULES = {"synthesize_cub", "ingest_dataset", "compute_metrics"}
RUN_TIMEOUT = 900


# the daemons live in sbin, which a root shell's PATH may lack
_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _unavailable():
    """Why SLURM cannot be started here, or None."""
    if os.geteuid() != 0:
        return "needs root (tools/slurm-local.sh runs SLURM with SlurmUser=root)"
    missing = [c for c in ("slurmctld", "slurmd", "munged", "mungekey") if shutil.which(c, path=_PATH) is None]
    missing += [c for c in ("sbatch", "squeue") if not Path("/usr/bin", c).exists()]
    if missing:
        return f"SLURM not installed (no {', '.join(missing)}); install it with `bash tools/slurm-local.sh install`"
    for port in (6817, 6818):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return f"port {port} is in use (a SLURM already runs here); stop it first"
    return None


def _alive(pid, name):
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == name
    except OSError:
        return False


def _stop(tdir, env):
    """tools/slurm-local.sh stop (kills the recorded PIDs); then any recorded daemon still alive."""
    try:
        subprocess.run(["bash", str(TOOL), "stop"], env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pass
    for name in DAEMONS:
        pidfile = tdir / "pids" / name
        if not pidfile.exists():
            continue
        pid = int(pidfile.read_text())
        if _alive(pid, name):
            os.kill(pid, signal.SIGKILL)
            for _ in range(50):
                if not _alive(pid, name):
                    break
                time.sleep(0.1)


@pytest.fixture(scope="module")
def slurm():
    """A running single-node SLURM: the environment its clients need and its directory."""
    reason = _unavailable()
    if reason:
        if os.environ.get("CFGA_REQUIRE_SLURM") == "1":
            pytest.fail(f"CFGA_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    # short path: the munge socket lives under it (AF_UNIX paths are limited to 108 bytes)
    tdir = Path(tempfile.mkdtemp(prefix="cfga-slurm-", dir="/tmp"))
    tdir.chmod(0o755)  # munged refuses a socket below a directory others cannot traverse
    env = {**os.environ, "SLURMTEST_DIR": str(tdir), "PATH": _PATH}
    try:
        proc = subprocess.run(["bash", str(TOOL), "start"], env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            pytest.fail(f"slurm-local.sh start failed ({proc.returncode}):\n{proc.stderr[-3000:]}\n{_log_tails(tdir)}")
        # what $T/env.sh sets: the client wrappers first in PATH, SLURM_CONF
        client_env = {**os.environ, "PATH": f"{tdir}/bin{os.pathsep}{_PATH}",
                      "SLURM_CONF": f"{tdir}/etc/slurm.conf"}
        yield {"dir": tdir, "env": client_env}
    finally:
        _stop(tdir, env)
        left = [n for n in DAEMONS if (tdir / "pids" / n).exists()
                and _alive(int((tdir / "pids" / n).read_text()), n)]
        shutil.rmtree(tdir, ignore_errors=True)
        assert not left, f"daemons still running after stop: {left}"


def _log_tails(tdir):
    out = []
    for name in ("slurmctld.log", "slurmd.log"):
        p = Path(tdir) / "log" / name
        if p.exists():
            out.append(f"--- {name} (tail)\n" + "\n".join(p.read_text(errors="replace").splitlines()[-25:]))
    return "\n".join(out)


def _site_profile(path):
    """profiles/slurm as a site would adapt it to this one 2-core node: threads as in
    profiles/default (so both runs compute with the same thread counts), small memory requests."""
    prof = yaml.safe_load(PROFILE.read_text())
    prof["set-threads"] = yaml.safe_load(LOCAL_PROFILE.read_text())["set-threads"]
    for res in [prof["default-resources"], *prof["set-resources"].values()]:
        if "mem_mb" in res:
            res["mem_mb"] = 2000
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(prof, sort_keys=False))
    return path


class _SqueuePoller(threading.Thread):
    """SLURM's own record of every job (comment = the plugin's rule_<rule>[_wildcards_…],
    the GPUs it asked for), polled while the run goes: finished jobs stay in squeue for MinJobAge."""

    FORMAT = "JobID:|,Comment:|,tres-per-job:|,tres-per-node:|,State:|"

    def __init__(self, env):
        super().__init__(daemon=True)
        self.env, self.jobs, self.stop = env, {}, threading.Event()

    def poll(self):
        proc = subprocess.run(["squeue", "--states=all", "-h", "-O", self.FORMAT], env=self.env,
                              capture_output=True, text=True, timeout=60)
        for line in proc.stdout.splitlines():
            fields = line.split("|")
            if len(fields) >= 5 and fields[0].strip():
                jobid, comment, per_job, per_node, state = (f.strip() for f in fields[:5])
                self.jobs[jobid] = {"comment": comment, "tres_per_job": per_job,
                                    "tres_per_node": per_node, "state": state}

    def run(self):
        while not self.stop.wait(2):
            try:
                self.poll()
            except (OSError, subprocess.SubprocessError):
                pass  # the next poll, or the final one, sees the job


CHECKPOINT_HASHES = {"checkpoint_sha256", "backbone_sha256"}


def _no_sha(obj):
    """obj without the sha256 of checkpoint files (at any depth)."""
    if isinstance(obj, dict):
        return {k: _no_sha(v) for k, v in obj.items() if k not in CHECKPOINT_HASHES}
    return obj


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _rule_of(comment):
    m = re.fullmatch(r"rule_(.+?)(_wildcards_.*)?", comment)
    return m.group(1) if m else None


class _Snakemake:
    """One snakemake run of TARGETS on CONFIG in workdir, in the background (its own session,
    so that a run past the timeout is killed with its children)."""

    def __init__(self, workdir, *args, env=None):
        workdir.mkdir()
        (workdir / "config.yaml").write_text(yaml.safe_dump(CONFIG))
        cmd = [sys.executable, "-m", "snakemake", *TARGETS, "--snakefile", str(REPO / "Snakefile"),
               *args, "--configfile", str(workdir / "config.yaml")]
        self.log = open(workdir / "snakemake.log", "w+")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def wait(self, deadline):
        """(exit status or "timeout", seconds, output)."""
        try:
            rc = self.proc.wait(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            rc = "timeout"
        seconds = time.monotonic() - self.t0
        self.log.seek(0)
        out = self.log.read()
        self.log.close()
        return rc, seconds, out


@pytest.mark.slow
@pytest.mark.workflow
@pytest.mark.slurm
def test_workflow_on_slurm_equals_local_run(slurm, tmp_path):
    site = _site_profile(tmp_path / "site_profile")
    on_slurm = tmp_path / "slurm_run"
    local = tmp_path / "local_run"

    # both runs at once: the SLURM run mostly waits (job start, status checks, the one GPU)
    deadline = time.monotonic() + RUN_TIMEOUT
    poller = _SqueuePoller(slurm["env"])
    poller.start()
    slurm_run = _Snakemake(on_slurm, "--workflow-profile", str(site), "--slurm-status-command", "squeue",
                           "--slurm-init-seconds-before-status-checks", "5", "--verbose", env=slurm["env"])
    local_run = _Snakemake(local, "--cores", "2")
    try:
        rc, slurm_s, out = slurm_run.wait(deadline)
        poller.stop.set()
        poller.join()
        poller.poll()
        lrc, local_s, lout = local_run.wait(deadline)
    finally:
        poller.stop.set()
        slurm_run.kill()
        local_run.kill()
    assert rc == 0, f"snakemake on SLURM failed ({rc}):\n{out[-6000:]}\n{_log_tails(slurm['dir'])}"
    assert lrc == 0, f"local snakemake failed ({lrc}):\n{lout[-6000:]}"

    # the plugin's sbatch calls: a GPU request exactly for the GPU rules, never through --gres
    calls = [line[line.index("sbatch call: ") + 13:] for line in out.splitlines() if "sbatch call: " in line]
    submitted = {}
    for call in calls:
        rule = _rule_of(re.search(r"--comment (\S+)", call).group(1))
        submitted.setdefault(rule, []).append(call)
        assert "--gres" not in call, call
        if rule in GPU_RULES:
            assert " --gpus=1" in call, call
        else:
            assert "--gpus" not in call, call
    assert set(submitted) == GPU_RULES | CPU_RULES, sorted(submitted)

    # SLURM's own record of the same jobs: all completed, GPUs exactly where asked
    jobs = {j: r for j, r in poller.jobs.items() if _rule_of(r["comment"])}
    assert len(jobs) == len(calls), (len(calls), poller.jobs)
    for jobid, rec in jobs.items():
        rule = _rule_of(rec["comment"])
        assert rec["state"] == "COMPLETED", (jobid, rec)
        if rule in GPU_RULES:
            assert rec["tres_per_job"] == "gres:gpu:1", (jobid, rec)
        else:
            assert rec["tres_per_job"] in ("N/A", "") and rec["tres_per_node"] in ("N/A", ""), (jobid, rec)
    assert {_rule_of(r["comment"]) for r in jobs.values()} == GPU_RULES | CPU_RULES

    print(f"\nSLURM run {slurm_s:.0f} s ({len(calls)} jobs), local run {local_s:.0f} s (concurrently)")

    # the same results: features and provenance, metrics, checkpoints (their tensors: torch.save
    # writes a fresh serialization id into every file, so the files' bytes and the
    # checkpoints' sha256 recorded in the provenance differ)
    a = np.load(on_slurm / "results/features/tiny_cub/tiny_r50.npz")
    b = np.load(local / "results/features/tiny_cub/tiny_r50.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in set(a.files) - {"meta_json"}:
        assert np.array_equal(a[key], b[key]), key
    assert _no_sha(json.loads(str(a["meta_json"]))) == _no_sha(json.loads(str(b["meta_json"])))
    for target in TARGETS[:2]:
        ma, mb = (_no_sha(json.loads((wd / target).read_text())) for wd in (on_slurm, local))
        assert ma == mb and ma["recall@1"] is not None, target
    for ck in ("results/checkpoints/pretrained/tiny_cub/tiny_r50", "results/checkpoints/trained/tiny_cub/tiny_ms"):
        sa, sb = (_no_sha(json.loads((wd / f"{ck}.json").read_text())) for wd in (on_slurm, local))
        assert sa == sb, ck
        sa, sb = (_flat(torch.load(wd / f"{ck}.pth", weights_only=True)) for wd in (on_slurm, local))
        assert sa.keys() == sb.keys(), ck
        assert all(torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k] for k in sa), ck
    # benchmark: files of the heavy rules were written inside the SLURM jobs too
    for bench in ("features/tiny_cub/tiny_r50", "pretrain/tiny_cub/tiny_r50", "train/tiny_cub/tiny_ms",
                  "ingest/tiny_cub"):
        assert (on_slurm / f"results/benchmarks/{bench}.tsv").exists(), bench


def test_profile_asks_gpus_only_for_gpu_rules():
    """The shipped profile (no SLURM needed): the GPU rules ask for one GPU each, nothing else does,
    and no rule smuggles a GPU request through slurm_extra (which the plugin refuses)."""
    prof = yaml.safe_load(PROFILE.read_text())
    assert prof["executor"] == "slurm"
    assert "gpu" not in prof["default-resources"] and "gres" not in prof["default-resources"]
    gpu = {rule for rule, res in prof["set-resources"].items() if res.get("gpu")}
    assert gpu == GPU_RULES
    assert all(prof["set-resources"][r]["gpu"] == 1 for r in GPU_RULES)
    for res in [prof["default-resources"], *prof["set-resources"].values()]:
        assert "gres" not in str(res.get("slurm_extra", "")) and "gpus" not in str(res.get("slurm_extra", ""))
        assert {"runtime", "mem_mb"} <= set(res) | set(prof["default-resources"])
    assert prof["retries"] >= 1 and prof["latency-wait"] >= 5
