"""Where the work runs: device choice, usable cores, process-wide memory tuning (the edge)."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

import torch
from torch import nn


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a SLURM or cgroup allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None → CUDA when present, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# glibc malloc tuning for CPU extraction. The per-image weight gradients are large short-lived
# tensors; with glibc's defaults each one is a fresh mmap that the kernel must fault in and zero,
# which costs more than the arithmetic (BENCHMARKS.md). Keeping freed memory in the heap for reuse
# removes that. Process-wide and harmless elsewhere; a no-op where glibc is absent.


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


@functools.lru_cache(maxsize=None)
def keep_freed_memory() -> bool:
    """Raise glibc's mmap/trim thresholds once per process; → whether it was applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)  # glibc's maximum
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, 2**30)
        ok &= libc.mallopt(_M_TOP_PAD, 256 * 2**20)
        return bool(ok)
    except (OSError, AttributeError):
        return False
