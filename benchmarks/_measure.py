"""Shared by the benchmark scripts: process memory measurement."""

from __future__ import annotations

import resource


def peak_rss() -> int:
    """This process's resident-set high-water mark in bytes (VmHWM; unlike ru_maxrss it is not
    inherited across exec from the parent)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
