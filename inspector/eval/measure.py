"""Peak resident memory of this process, for memory bounds in benches, tests and Ray workers.

Why not ``resource.getrusage(...).ru_maxrss``: Linux carries the forking parent's peak across
fork + exec, so a child started by a large parent (pytest, a bench driver) would report the
parent's peak and hide any growth below it. ``VmHWM`` in ``/proc/self/status`` belongs to this
process image, and writing ``5`` to ``/proc/self/clear_refs`` resets it to the current RSS.
"""

from __future__ import annotations

import resource


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
