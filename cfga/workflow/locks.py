"""Stale Snakemake locks: removed only when they provably belong to dead runs on this host.

A run killed with SIGKILL (or a power loss) leaves Snakemake's locks in ``.snakemake/locks``,
and the next run that overlaps them refuses to start until ``snakemake --unlock``. Every main
Snakemake process of this workflow records a run marker ``.snakemake/cfga-runs/<host>.<pid>.json``
(host, PID, boot id, process start time) while it lives, and deletes it when it exits. When
locks are present, they are removed only if every marker present is of this host and its process
is gone (no such PID, or the PID now belongs to a process started at another time). A marker
of another host, a live local run, or locks without any marker leave everything in place: then
Snakemake's own lock check stops a run whose files are locked, and the message here says why
and that ``snakemake --unlock`` is the fix once no other run is alive.

Unlike a lock held with ``flock``, this does not depend on the file system's locking: on NFS
with client-local locks two hosts could both take an exclusive ``flock`` and delete a live run's
locks.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

MARKER_DIR = "cfga-runs"
LOCK_DIR = "locks"


@dataclass(frozen=True)
class RunMarker:
    """The identity of a Snakemake process: host, PID, and when that process started."""

    host: str
    pid: int
    boot_id: str | None
    start_ticks: int | None  # /proc/<pid>/stat field 22: clock ticks after boot

    @property
    def filename(self) -> str:
        return f"{self.host}.{self.pid}.json"


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError:
        return None


def boot_id() -> str | None:
    text = _read("/proc/sys/kernel/random/boot_id")
    return text.strip() if text else None


def process_start(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks after boot, or None (no such process, no /proc)."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return None
    try:
        # "pid (comm) state ppid …": comm may hold spaces and parentheses, so split after the last ')'
        return int(text[text.rindex(")") + 2:].split()[19])
    except (ValueError, IndexError):
        return None


def this_process() -> RunMarker:
    pid = os.getpid()
    return RunMarker(socket.gethostname(), pid, boot_id(), process_start(pid))


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def is_dead_local(marker: RunMarker, host: str | None = None) -> bool:
    """True only when ``marker`` is provably a dead process of this host; False when it is alive or
    when that cannot be known (another host, unreadable marker)."""
    if marker.host != (host or socket.gethostname()):
        return False
    here = boot_id()
    if marker.boot_id and here and marker.boot_id != here:
        return True  # the host rebooted since: every process of that boot is gone
    if not pid_exists(marker.pid):
        return True
    if marker.start_ticks is None:
        return False  # no start time to compare: the PID may still be that process
    now = process_start(marker.pid)
    return now is not None and now != marker.start_ticks  # the PID was reused


def read_marker(path: Path) -> RunMarker | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return RunMarker(str(data["host"]), int(data["pid"]), data.get("boot_id"), data.get("start_ticks"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_marker(state: Path, marker: RunMarker) -> Path:
    """Write ``marker`` under ``state``/cfga-runs (atomically); → its path."""
    d = state / MARKER_DIR
    d.mkdir(parents=True, exist_ok=True)
    path = d / marker.filename
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(marker)), encoding="utf-8")
    os.replace(tmp, path)
    return path


@dataclass
class LockCheck:
    """What :func:`check_locks` found and did."""

    locks: list[Path]
    removed: bool = False
    owners: list[str] | None = None  # markers that keep the locks: "host pid N (why)"
    message: str = ""


def _describe(path: Path, marker: RunMarker | None, host: str) -> str:
    if marker is None:
        return f"{path.name} (unreadable)"
    if marker.host != host:
        return f"host {marker.host} pid {marker.pid} (another host: cannot tell whether it is alive)"
    return f"host {marker.host} pid {marker.pid} (alive)"


def check_locks(state: Path, own: RunMarker | None = None) -> LockCheck:
    """Remove the locks under ``state`` (``.snakemake``) if every other run marker is a dead local
    run (then those markers go too); otherwise leave everything and say why."""
    host = own.host if own else socket.gethostname()
    locks = sorted((state / LOCK_DIR).glob("*.lock"))
    others = [p for p in sorted((state / MARKER_DIR).glob("*.json")) if not (own and p.name == own.filename)]
    markers = {p: read_marker(p) for p in others}
    keep = [p for p, m in markers.items() if m is None or not is_dead_local(m, host)]
    if not locks:
        for p in others:
            if p not in keep:
                p.unlink(missing_ok=True)  # a dead run's marker, no locks left
        return LockCheck(locks=[])
    if keep or not markers:
        owners = [_describe(p, markers[p], host) for p in keep]
        who = "; ".join(owners) if owners else "a run that left no marker (unknown owner)"
        msg = (f"cfga: {len(locks)} Snakemake lock(s) in {(state / LOCK_DIR).resolve()} may belong to a live run: "
               f"{who}. They are not removed. If this run stops on them and you are sure no other run of "
               "this workflow is alive in this directory, run `snakemake --unlock` and start again.")
        return LockCheck(locks=locks, owners=owners, message=msg)
    for f in locks:
        f.unlink(missing_ok=True)
    for p in others:
        p.unlink(missing_ok=True)
    dead = ", ".join(f"{m.host} pid {m.pid}" for m in markers.values() if m)
    return LockCheck(locks=locks, removed=True,
                     message=f"cfga: removed {len(locks)} stale lock(s) of a killed run ({dead}) in "
                             f"{(state / LOCK_DIR).resolve()}")


_OWN: list[Path] = []


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def guard_run(state: str | os.PathLike = ".snakemake") -> LockCheck | None:
    """For a main Snakemake process: record this run's marker (removed at exit), then
    :func:`check_locks`. None if ``state`` cannot be written (nothing is removed then)."""
    state = Path(state).absolute()  # Snakemake changes back out of --directory before exit
    own = this_process()
    try:
        path = write_marker(state, own)
    except OSError:
        return None
    if not _OWN:
        atexit.register(lambda: [_remove(p) for p in _OWN])
    _OWN.append(path)
    return check_locks(state, own)
