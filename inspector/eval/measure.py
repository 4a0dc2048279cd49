"""The one timing and memory helpers of eval, benches, tests and Ray workers.

* :func:`sync`: wait for a device's queued kernels before reading a clock (CUDA is asynchronous).
* :class:`PeakMemory`: peak memory while a block runs (CUDA allocator, or the process RSS sampled
  by a thread), for per-run memory in eval and the benches.
* :func:`peak_rss_kb` / :func:`reset_peak_rss`: this process's lifetime peak RSS.
  Why not ``resource.getrusage(...).ru_maxrss``: Linux carries the forking parent's peak across
  fork + exec, so a child started by a large parent (pytest, a bench driver) would report the
  parent's peak and hide any growth below it. ``VmHWM`` in ``/proc/self/status`` belongs to this
  process image, and writing ``5`` to ``/proc/self/clear_refs`` resets it to the current RSS.

A leaf module: it imports nothing from ``inspector``, and torch only when a device is involved
(so the RSS probes of the hostile-input tests and benches stay light).
"""

from __future__ import annotations

import os
import platform
import resource
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def sync(device: torch.device | str | None) -> None:
    """Block until ``device`` has run its queued work (CUDA); a no-op for CPU and ``None``."""
    if device is None:
        return
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class PeakMemory:
    """Peak memory while the block runs: CUDA ``max_memory_allocated`` on a CUDA device, else the
    process resident set size sampled every ``interval`` s by a thread (torch releases the GIL in
    its kernels, so the sampler sees the working peak). ``.peak_mb`` absolute, ``.rise_mb`` above
    the level at entry."""

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.002):
        import torch

        self.device = torch.device(device)
        self.interval = interval
        self.base = self.peak = 0
        self.kind = "cuda_allocated" if self.device.type == "cuda" else "cpu_rss"

    @staticmethod
    def rss() -> int:
        """Current resident set size of this process, bytes."""
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):  # not Linux: lifetime peak from getrusage
            r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return r if platform.system() == "Darwin" else r * 1024

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = self.peak = torch.cuda.memory_allocated(self.device)
        else:
            self.base = self.peak = self.rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.rss())

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20

    @property
    def rise_mb(self) -> float:
        return max(0, self.peak - self.base) / 2**20


def peak_rss_kb() -> int:
    """Peak resident set of this process, KiB (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak_rss() -> int:
    """Reset the peak to the current RSS (where the kernel allows it); returns the new peak, KiB."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return peak_rss_kb()


def peak_rss_mib() -> float:
    return peak_rss_kb() / 1024
