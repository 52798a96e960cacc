"""Shared by the benchmark scripts: process memory, published accelerator peaks."""

from __future__ import annotations

import re
import resource

# Dense (no sparsity) bf16 tensor-core FLOP/s per device, as the vendors publish them: NVIDIA's
# H100 and H200 SXM datasheets (1,979 TFLOPS "with sparsity", i.e. 989.4 dense), H100 PCIe,
# A100 and L4 datasheets (they too print sparsity figures, twice these) and Google Cloud's TPU
# v4 / v5e / v5p / v6e system-architecture pages ("peak compute per chip (bf16)"). Regexes
# searched in jax's device_kind, first match wins. The NVL boards are not listed (their
# datasheets quote other figures), nor is any device not named here.
PEAK_BF16_TFLOPS = (
    (r"H100 PCIe", 756.0),
    (r"H100 80GB HBM3|H100 SXM", 989.4),
    (r"H200$", 989.4),
    (r"A100", 312.0),
    (r"\bL4$", 121.0),
    (r"^TPU v4$", 275.0),
    (r"^TPU v5 ?(lite|e)$", 197.0),
    (r"^TPU v5p?$", 459.0),
    (r"^TPU v6 ?(lite|e)$", 918.0),
)


def peak_bf16_flops(device_kind: str) -> float | None:
    """The published dense bf16 FLOP/s of ``device_kind``, or None if it is not in the table."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_kind.strip()):
            return tflops * 1e12
    return None


def peak_rss() -> int:
    """This process's resident-set high-water mark in bytes (VmHWM; unlike ru_maxrss it is not
    inherited across exec from the parent)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
