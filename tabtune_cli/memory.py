"""The peak-memory probe: a fit (or a benchmark's stage) measures its own peak, on CPU or CUDA.

``reset_peak(device)`` starts a new peak; ``peak_mb(device)`` is the MiB at the peak since. Public: the
pipeline reports a fit's peak through it and the benchmarks read memory the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import re
import resource
import sys
from pathlib import Path

import torch


def reset_peak(device: torch.device) -> None:
    """Start measuring a new peak (``peak_mb`` reports the peak since), so that a fit reports its own
    peak and not an earlier one's: a sweep runs its jobs one after another in one process."""
    gc.collect()  # the previous job's garbage, and the C heap's free pages, go back first: the peak starts
    with contextlib.suppress(OSError, AttributeError):  # from what this process holds now (glibc only)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:  # Linux: the process's peak resident set (VmHWM) starts again from its current one
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")


def peak_mb(device: torch.device) -> float:
    """MiB at the peak since ``reset_peak``: CUDA's allocator peak, or the process's peak resident
    set on CPU (Linux; elsewhere ``ru_maxrss``, the process's peak over its whole life)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError, AttributeError):
        return int(re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)[1]) / 2**10
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)
