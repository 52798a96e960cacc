r"""Train a config on several GPU nodes under SLURM: one JAX process per node, all its GPUs.

    python launch/slurm_gpu.py --nodes=2 --gpus_per_node=8 --partition=gpu \
        --config=configs/smollm2_layerdrop_kd.py --workdir=/shared/runs/kd \
        --config.data.global_batch_size=64 [--dry_run]

writes an sbatch script into the workdir (``--dry_run``: prints it and the ``sbatch`` command)
and submits it. In the job, the coordinator is the first node of the allocation
(``scontrol show hostnames``) at ``--port``; ``srun`` starts one task per node, and each runs
``python -m distill_jax.main ... --coordinator_address=<first node>:<port>
--num_processes=$SLURM_NTASKS --process_id=$SLURM_PROCID``, so the N nodes form one global mesh
of nodes x gpus_per_node devices.

Preemption: the job is requeueable and asks SLURM for SIGTERM ``--signal_seconds`` before its
time limit; on SIGTERM (that one, or a preemption's) the trainer checkpoints the current step and
exits 75, and the script then requeues the job, which resumes from the latest checkpoint in the
workdir. The workdir must be on a filesystem every node sees.

The environment: ``--setup`` is run first on every node (default: activate this checkout's
``.venv``; install JAX for CUDA there with ``pip install "jax[cuda12]==<the pinned jax>"``).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import common
from absl import app, flags

NODES = flags.DEFINE_integer("nodes", 2, "Nodes (one JAX process each).")
GPUS = flags.DEFINE_integer("gpus_per_node", 8, "GPUs per node (JAX devices per process).")
CPUS = flags.DEFINE_integer("cpus_per_task", 16, "CPU cores per node for data loading.")
PARTITION = flags.DEFINE_string("partition", None, "SLURM partition.")
ACCOUNT = flags.DEFINE_string("account", None, "SLURM account.")
TIME = flags.DEFINE_string("time", "24:00:00", "Time limit per (re)queued run.")
JOB_NAME = flags.DEFINE_string("job_name", "distill_jax", "Job name.")
PORT = flags.DEFINE_integer("port", 12355, "Coordinator port on the first node.")
SIGNAL = flags.DEFINE_integer("signal_seconds", 300, "SIGTERM this long before the limit.")
SETUP = flags.DEFINE_string(
    "setup",
    f"source {common.REPO}/.venv/bin/activate",
    "Shell code run first on every node (written into the script as is).",
)
SCRIPT = flags.DEFINE_string("script", None, "Where to write the sbatch script (default workdir).")


# What each value written into an #SBATCH line may hold: (pattern, what to use instead).
_NAME = (r"[A-Za-z0-9_.+-]+", "letters, digits and _ . + -")
_LIST = (r"[A-Za-z0-9_.+,-]+", "letters, digits and _ . + , - (a comma-separated list)")
_TIME = (
    r"\d+(-\d+)?(:\d+){0,2}|(?i:unlimited|infinite)",
    "a SLURM time such as 90, 24:00:00 or 2-12:00:00",
)
_PATH = (r"/[A-Za-z0-9_./+,@=:-]*", "an absolute path of letters, digits and _ . / + , @ = : -")


def check_directives(workdir: str) -> None:
    """The flags that go into ``#SBATCH`` lines, written there unquoted (SLURM reads them, not
    the shell): each must match its form (``common.line_value``), so a newline or a shell
    metacharacter is refused with the flag's name before anything is written."""
    common.line_value("--job_name", JOB_NAME.value, *_NAME)
    common.line_value("--time", TIME.value, *_TIME)
    for flag, value in (("--partition", PARTITION.value), ("--account", ACCOUNT.value)):
        if value is not None:
            common.line_value(flag, value, *_LIST)
    common.line_value("--workdir", workdir, *_PATH)


def sbatch_script(config_args: list[str], workdir: str) -> str:
    """The job script (bash): ``#SBATCH`` lines of checked values (``check_directives``), every
    other value shell-quoted (``--setup`` is shell code and written as is)."""
    check_directives(workdir)
    directives = [
        f"--job-name={JOB_NAME.value}",
        f"--nodes={NODES.value}",
        "--ntasks-per-node=1",
        f"--gpus-per-node={GPUS.value}",
        f"--cpus-per-task={CPUS.value}",
        f"--time={TIME.value}",
        *([f"--partition={PARTITION.value}"] if PARTITION.value else []),
        *([f"--account={ACCOUNT.value}"] if ACCOUNT.value else []),
        f"--output={workdir}/slurm-%j.out",
        "--requeue",
        f"--signal=TERM@{SIGNAL.value}",
    ]
    config_args = [
        f"--config={os.path.abspath(a.split('=', 1)[1])}" if a.startswith("--config=") else a
        for a in config_args
    ]
    main = common.join(common.main_command(config_args, workdir, python="python"))
    # Expanded in each task's own shell: SLURM_PROCID differs per task.
    task = (
        f'exec {main} --coordinator_address="$COORDINATOR" '
        '--num_processes="$SLURM_NTASKS" --process_id="$SLURM_PROCID"'
    )
    lines = [
        "#!/bin/bash",
        *(f"#SBATCH {d}" for d in directives),
        "set -uo pipefail",
        f"cd {shlex.quote(str(common.REPO))}",
        SETUP.value,
        f'export COORDINATOR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
        f':{PORT.value}"',
        f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(task)}",
        "code=$?",
        f'if [ "$code" -eq {common.EXIT_PREEMPTED} ]; then scontrol requeue "$SLURM_JOB_ID"; fi',
        'exit "$code"',
    ]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    workdir = os.path.abspath(common.WORKDIR.value)
    try:
        if workdir == "/tmp" or workdir.startswith("/tmp/"):
            raise ValueError(
                f"--workdir={workdir} is node-local on most clusters; pass a directory on the "
                "shared filesystem every node mounts."
            )
        if NODES.value < 1 or GPUS.value < 1:
            raise ValueError("--nodes and --gpus_per_node must be >= 1.")
        common.check_fits(
            common.CONFIG.value, devices=NODES.value * GPUS.value, processes=NODES.value
        )
        script = sbatch_script(common.config_args(), workdir)
    except ValueError as e:
        sys.exit(f"error: {e}")
    path = SCRIPT.value or os.path.join(workdir, f"{JOB_NAME.value}.sbatch")
    submit = ["sbatch", path]
    if common.DRY_RUN.value:
        print(f"# {path}")
        print(script, end="")
        print(f"# submit:\n{common.join(submit)}")
        return 0
    for folder in (workdir, os.path.dirname(path)):  # SLURM writes --output there
        os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        f.write(script)
    return subprocess.run(submit).returncode


if __name__ == "__main__":
    app.run(main)
