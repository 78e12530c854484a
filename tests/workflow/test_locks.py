"""Stale-lock handling (cfga.workflow.locks): only provably dead runs of this host lose their locks."""
import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from cfga.workflow import locks

REPO = Path(__file__).resolve().parents[2]


def dead_pid() -> int:
    """The PID of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def state(tmp_path):
    s = tmp_path / ".snakemake"
    (s / "locks").mkdir(parents=True)
    (s / "locks" / "0.output.lock").write_text("results/x.npz\n")
    (s / "locks" / "0.input.lock").write_text("results/y.csv\n")
    return s


def lock_files(state):
    return sorted(p.name for p in (state / "locks").glob("*.lock"))


def marker(pid, host=None, **kw):
    here = locks.this_process()
    return locks.RunMarker(host or here.host, pid, kw.get("boot_id", here.boot_id),
                           kw.get("start_ticks", locks.process_start(pid)))


def test_a_dead_local_run_loses_its_locks(state):
    m = locks.write_marker(state, marker(dead_pid(), start_ticks=12345))
    check = locks.check_locks(state, locks.this_process())
    assert check.removed and "stale lock" in check.message
    assert lock_files(state) == [] and not m.exists()


def test_a_live_local_run_keeps_its_locks(state):
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as proc:
        try:
            m = locks.write_marker(state, marker(proc.pid))
            check = locks.check_locks(state, locks.this_process())
        finally:
            proc.kill()
    assert not check.removed and "alive" in check.message and "--unlock" in check.message
    assert lock_files(state) == ["0.input.lock", "0.output.lock"] and m.exists()


def test_another_hosts_run_is_never_removed(state):
    """Even with a PID that is dead here: another host's process cannot be seen from here."""
    m = locks.write_marker(state, marker(dead_pid(), host=socket.gethostname() + "-other", start_ticks=1))
    locks.write_marker(state, marker(dead_pid(), start_ticks=1))  # and a dead local one beside it
    check = locks.check_locks(state, locks.this_process())
    assert not check.removed
    assert "another host" in check.message and "snakemake --unlock" in check.message
    assert lock_files(state) == ["0.input.lock", "0.output.lock"] and m.exists()


def test_locks_without_a_marker_are_kept(state):
    check = locks.check_locks(state, locks.this_process())
    assert not check.removed and "unknown owner" in check.message and "--unlock" in check.message
    assert lock_files(state) == ["0.input.lock", "0.output.lock"]


def test_an_unreadable_marker_keeps_the_locks(state):
    (state / "cfga-runs").mkdir()
    (state / "cfga-runs" / "x.1.json").write_text("{not json")
    assert not locks.check_locks(state, locks.this_process()).removed
    assert lock_files(state)


def test_a_reused_pid_is_a_dead_run(state):
    """The PID is alive but started at another time than the marker's process: a reused PID."""
    me = locks.this_process()
    if me.start_ticks is None:
        pytest.skip("no /proc here")
    parent = marker(os.getppid())
    locks.write_marker(state, replace(parent, start_ticks=parent.start_ticks + 1))
    assert locks.check_locks(state, me).removed


def test_a_run_of_an_earlier_boot_is_dead(state):
    me = locks.this_process()
    if me.boot_id is None:
        pytest.skip("no boot id here")
    locks.write_marker(state, replace(marker(os.getppid()), boot_id="an-earlier-boot"))
    assert locks.check_locks(state, me).removed


def test_a_live_pid_without_start_time_is_alive(state):
    locks.write_marker(state, marker(os.getppid(), start_ticks=None))
    assert not locks.check_locks(state, locks.this_process()).removed


def test_own_marker_does_not_count_and_dead_markers_go_without_locks(tmp_path):
    state = tmp_path / ".snakemake"
    own = locks.this_process()
    locks.write_marker(state, own)
    dead = locks.write_marker(state, marker(dead_pid(), start_ticks=7))
    check = locks.check_locks(state, own)
    assert check.locks == [] and not check.message
    assert not dead.exists() and (state / "cfga-runs" / own.filename).exists()


def test_marker_records_host_pid_and_start(tmp_path):
    path = locks.write_marker(tmp_path, locks.this_process())
    data = json.loads(path.read_text())
    assert data["host"] == socket.gethostname() and data["pid"] == os.getpid()
    assert locks.read_marker(path) == locks.this_process()


def test_guard_run_marker_lives_as_long_as_the_process(tmp_path):
    code = ("import os, sys; from cfga.workflow.locks import guard_run; guard_run(sys.argv[1]); "
            "print(sorted(os.listdir(os.path.join(sys.argv[1], 'cfga-runs'))))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / ".snakemake")], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip().startswith(f"['{socket.gethostname()}.") and out.count(".json") == 1  # while it runs
    assert list((tmp_path / ".snakemake" / "cfga-runs").iterdir()) == []  # removed at exit


# --------------------------------------------------------------------------------------------
# with Snakemake: another host's lock stops the run (nothing deleted); --unlock still works

CONFIG = {"datasets": {"l_cub": {"format": "cub", "synthetic": {"classes": 4, "images_per_class": 4}}},
          "models": {"l_r50": {"arch": "resnet50", "protocol": "scda", "checkpoint": "r50.pth"}}}


def smk(wd, *args):
    cfg = wd / "config.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(wd),
           "--cores", "1", *args, "--configfile", str(cfg)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.workflow
def test_snakemake_stops_on_another_hosts_lock(tmp_path):
    target = "resources/synthetic/l_cub/CUB_200_2011.tgz"
    state = tmp_path / ".snakemake"
    (state / "locks").mkdir(parents=True)
    (state / "locks" / "0.output.lock").write_text(target + "\n")
    other = locks.write_marker(state, marker(dead_pid(), host=socket.gethostname() + "-other", start_ticks=1))
    proc = smk(tmp_path, target)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "another host" in out and "snakemake --unlock" in out
    assert (state / "locks" / "0.output.lock").exists() and other.exists()
    assert not (tmp_path / target).exists()
    assert smk(tmp_path, "--unlock").returncode == 0
    assert not list((state / "locks").glob("*.lock"))
