r"""Cloud TPU topologies by name, their published chip peaks, and compile-only devices for them.

``parse("v5p-128")`` -> ``Topology`` (64 v5p chips as libtpu's ``"v5p:4x4x4"``); ``devices()``
then gives JAX devices of that topology on any machine with libtpu installed (no TPU needed),
which is what ``--mode=compile`` (``train/aot.py``) lowers and compiles the train step for.

Names: ``<generation>-<N>`` as Cloud TPU spells accelerator types, where N counts TensorCores
for v4 and v5p (two per chip, one JAX device per chip: ``v5p-128`` is 64 chips) and chips for
v5e and v6e (``v5e-64`` = ``v5litepod-64`` = 64 chips); or an explicit libtpu topology such as
``v5e:4x4`` or ``v5p:4x4x8``. Chip counts map to the standard slice shapes of the Cloud TPU docs
(v5e/v6e: 2D torus up to 16x16; v4/v5p: 3D, e.g. 4x4x4 = 64 chips, 4x4x8 = 128).

The peak numbers are per chip, from the documents cited beside each entry; they feed the roofline
estimate of the compile report, so treat them as nominal (bf16 dense matmul peak, HBM capacity and
bandwidth, bidirectional ICI bandwidth summed over a chip's links).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip numbers of one TPU generation."""

    generation: str  # "v5e"
    device_kind: str  # what jax.Device.device_kind says
    bf16_flops: float  # peak dense bf16 FLOP/s
    hbm_bytes: int
    hbm_bytes_per_s: float
    ici_bytes_per_s: float  # bidirectional, all of a chip's ICI links together
    cores_per_chip: int  # TensorCores counted by the "-N" of an accelerator type
    dims: int  # 2: 2D torus (v5e, v6e); 3: 3D (v4, v5p)
    chip_config: str  # libtpu's chip_config_name: one JAX device per chip


CHIPS = {
    # https://cloud.google.com/tpu/docs/v4 ("275 teraflops (bf16)", "HBM2 32 GiB, 1200 GBps").
    # ICI: "How to Scale Your Model" (jax-ml.github.io/scaling-book/tpus): 4.5e10 B/s per link
    # and direction, 6 links (3D torus) -> 5.4e11 B/s bidirectional per chip.
    "v4": Chip("v4", "TPU v4", 275e12, 32 * GiB, 1200e9, 540e9, 2, 3, "megacore"),
    # https://cloud.google.com/tpu/docs/v5e ("197 TFLOPs", "16 GB, 819 GBps", "bidirectional
    # inter-chip interconnect (ICI) bandwidth (per chip) 400 GBps").
    "v5e": Chip("v5e", "TPU v5 lite", 197e12, 16 * GiB, 819e9, 400e9, 1, 2, "default"),
    # https://cloud.google.com/tpu/docs/v5p ("459 TFLOPs", "HBM capacity per chip (GiB) 95",
    # "HBM bandwidth per chip (GBps) 2765", "Bidirectional ICI bandwidth per chip (GBps) 1200").
    "v5p": Chip("v5p", "TPU v5", 459e12, 95 * GiB, 2765e9, 1200e9, 2, 3, "default"),
    # https://cloud.google.com/tpu/docs/v6e ("918 TFLOPs", "HBM capacity per chip 32 GB",
    # "HBM bandwidth per chip 1638 GBps", "Bidirectional ICI bandwidth (per chip) 800 GBps").
    "v6e": Chip("v6e", "TPU v6 lite", 918e12, 32 * GiB, 1638e9, 800e9, 1, 2, "default"),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}

# Chips -> slice shape (Cloud TPU docs: v5e/v6e "Topology" tables; v5p/v4 slice shapes).
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16)}
SHAPES_2D[256] = (16, 16)
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4)}
SHAPES_3D.update({128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16)})
SHAPES_3D.update({2048: (8, 16, 16), 4096: (16, 16, 16)})


@dataclasses.dataclass(frozen=True)
class Topology:
    """One or more identical TPU slices.

    Attributes:
        name: as given, e.g. "v5p-128".
        chip: the generation's ``Chip``.
        shape: the slice's chip grid, e.g. (4, 4, 4).
        num_slices: slices joined by the data-center network (multislice).
    """

    name: str
    chip: Chip
    shape: tuple[int, ...]
    num_slices: int = 1

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.shape)

    @property
    def num_chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    @property
    def topology_name(self) -> str:
        """libtpu's name, e.g. "v5p:4x4x4"."""
        return f"{self.chip.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        """Chips of one host: 2x2 on multi-host slices, up to 2x4 on one v5e/v6e host."""
        shape = (*self.shape, 1)[:3]
        host = (2, 4, 1) if self.chip.dims == 2 and self.chips_per_slice == 8 else (2, 2, 1)
        return tuple(min(a, b) for a, b in zip(host, shape))

    def describe(self) -> str:
        slices = f" x {self.num_slices} slices" if self.num_slices > 1 else ""
        plural = "s" if self.num_chips > 1 else ""
        chips = f"{self.num_chips} {self.chip.generation} chip{plural}"
        if self.name == self.topology_name and not slices:
            return f"{self.name} ({chips})"
        return f"{self.name} ({self.topology_name}{slices}: {chips})"

    def devices(self) -> list:
        """Compile-only JAX devices of this topology (needs libtpu, not a TPU)."""
        quiet_libtpu(self)
        from jax.experimental import topologies

        desc = topologies.get_topology_desc(
            platform="tpu",
            topology_name=self.topology_name,
            chip_config_name=self.chip.chip_config,
            chips_per_host_bounds=self.chips_per_host_bounds,
            num_slices=self.num_slices,
        )
        return list(desc.devices)


def parse(name: str, num_slices: int = 1) -> Topology:
    """A ``Topology`` from "v5p-128", "v5e-64", "v5litepod-16", "v6e-64", "v4-32" or "v5e:4x4".

    Raises:
        ValueError: unknown generation, a chip count with no standard slice shape, or a bad
            explicit shape (the message lists what is accepted).
    """
    if num_slices < 1:
        raise ValueError(f"num_slices={num_slices} must be >= 1.")
    m = re.fullmatch(r"([a-z0-9]+)([-:])([0-9x]+)", name.strip().lower())
    generation = _ALIASES.get(m.group(1), m.group(1)) if m else None
    if generation not in CHIPS:
        raise ValueError(
            f"Unknown TPU topology {name!r}: use <generation>-<N> with generation in "
            f"{sorted(CHIPS)} (v4/v5p: N TensorCores, 2 per chip; v5e/v6e: N chips), e.g. "
            "v5p-128, v5e-64, v6e-64, v4-32, or an explicit shape such as v5e:4x4 or v5p:4x4x8."
        )
    chip = CHIPS[generation]
    if m.group(2) == ":":
        shape = tuple(int(x) for x in m.group(3).split("x") if x)
        if len(shape) != chip.dims or min(shape) < 1:
            raise ValueError(f"{name!r}: {generation} topologies have {chip.dims} dimensions.")
        return Topology(name, chip, shape, num_slices)
    units = int(m.group(3))
    chips, rest = divmod(units, chip.cores_per_chip)
    table = SHAPES_3D if chip.dims == 3 else SHAPES_2D
    if rest or chips not in table:
        counts = sorted(n * chip.cores_per_chip for n in table)
        raise ValueError(
            f"{name!r}: no standard {generation} slice of {units} "
            f"{'TensorCores' if chip.cores_per_chip > 1 else 'chips'}; use one of {counts} or "
            f"an explicit shape such as {generation}:{'x'.join(['4'] * chip.dims)}."
        )
    return Topology(name, chip, table[chips], num_slices)


def quiet_libtpu(topology: Topology | None = None) -> None:
    """Environment for loading libtpu on a machine without TPUs: no metadata-server queries,
    no lockfile (another process may hold it; compile-only devices never touch a chip), and the
    host facts libtpu otherwise looks up and complains about. Existing values win."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_WORKER_ID", "0")
    if topology is not None:
        kind = "v5litepod" if topology.chip.generation == "v5e" else topology.chip.generation
        units = topology.chips_per_slice * topology.chip.cores_per_chip
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{kind}-{units}")
