r"""Command line: ``python -m distill_jax.main --config=configs/<name>.py --workdir=<dir>``.

    python -m distill_jax.main --config configs/smollm2_layerdrop_kd.py --workdir /tmp/kd \
        --config.train.steps=50

``--config.a.b=c`` overrides any field (the config is locked: a misspelt key is an error);
``file.py:key=value`` picks a preset of the file's ``get_config(arg)``. Multi-host: pass
``--coordinator_address=host:port --num_processes=N --process_id=i`` (or nothing on a Cloud TPU
pod, where ``jax.distributed.initialize()`` finds its peers itself with ``--distributed``).
``launch/`` starts this entry point on N local processes, a Cloud TPU pod or a SLURM allocation.

``--mode=compile --topology=v5p-128 [--num_slices=2]`` compiles the train step for a TPU
topology on this machine (libtpu, no TPU, no weights or data; ``experiment/compile.py``), prints the
per-chip memory / FLOPs / collectives / roofline table and writes it to
``<workdir>/compile_report.{md,json}`` (and the optimized per-chip HLO to ``step.hlo.txt``).

Exit status: 0 when the run finished, ``EXIT_PREEMPTED`` (75, EX_TEMPFAIL) when a SIGTERM stopped
training and a checkpoint of the current step is on disk, or came during start-up (the handler
is installed first thing, before ``jax.distributed.initialize`` and any model loads; nothing was
trained, so nothing is lost): run the same command again to resume (the launchers requeue /
restart on it). 1 with one message for a SIGTERM whose step could not be checkpointed, and for
``--mode=compile`` when the step does not fit in the chips' memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from distill_jax.train import preemption

EXIT_PREEMPTED = 75

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and exports go here.")
MODES = ("train", "cache", "eval_gsm", "eval_speculative", "seqkd", "compile")
_MODE = flags.DEFINE_enum(
    "mode",
    "train",
    list(MODES),
    "train; cache: write teacher.cache_dir (an offline teacher); eval_gsm: pass@k on held-out "
    "GSM-style problems; eval_speculative: the student as a speculative draft for the teacher; "
    "seqkd: write a verified sequence-level KD dataset (distill_jax/commands.py); compile: "
    "compile the train step for --topology and report memory, FLOPs and collectives per chip.",
)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "--mode=compile: e.g. v5p-128, v5e-64, v6e-64, v4-32, v5e:4x4."
)
_NUM_SLICES = flags.DEFINE_integer("num_slices", None, "--mode=compile: slices (multislice).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes of a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "jax.distributed.initialize() (pods).")


def main(argv):
    del argv
    # A SIGTERM from here to the first step exits 75 at once (Preempted); training handles it.
    handler = preemption.Preemption() if _MODE.value == "train" else contextlib.nullcontext()
    try:
        with handler:
            _run()
    except preemption.Preempted as e:
        print(f"{e} Run the same command again to resume.", file=sys.stderr)
        raise SystemExit(EXIT_PREEMPTED) from None


def _run() -> None:
    import jax

    logging.set_verbosity(logging.WARNING)  # orbax logs every file it renames at INFO

    if _COORDINATOR.value or _DISTRIBUTED.value:
        if _COORDINATOR.value:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    if _MODE.value == "compile":
        return compile_mode(_CONFIG.value, _WORKDIR.value)
    from distill_jax import commands, experiment
    from distill_jax.train import evaluate

    if _MODE.value == "cache":
        cache = commands.build_cache(_CONFIG.value)
        result = {"cache": cache.directory, "bytes_per_token": cache.bytes_per_token}
    elif _MODE.value in ("eval_gsm", "eval_speculative", "seqkd"):
        result = getattr(commands, _MODE.value)(_CONFIG.value, _WORKDIR.value)
    else:
        result = {"eval": experiment.train(_CONFIG.value, _WORKDIR.value)}
    if jax.process_index() == 0:
        print(json.dumps(result))
        if _MODE.value == "train":
            print(evaluate.before_after_table(_WORKDIR.value))
    stopped = result.get("eval", {})
    if "stopped_at" in stopped:
        if not stopped.get("checkpoint_saved"):
            raise SystemExit(
                f"error: SIGTERM at step {stopped['stopped_at']}, but no checkpoint of it is on "
                f"disk ({_WORKDIR.value}/checkpoints); a rerun resumes from the latest one there."
            )
        raise SystemExit(EXIT_PREEMPTED)


def compile_mode(config, workdir: str) -> None:
    """``--mode=compile``: print the report, or exit 1 with the message when it does not fit."""
    import jax

    if not os.environ.get("JAX_PLATFORMS"):  # the devices come from libtpu's topology; no
        jax.config.update("jax_platforms", "cpu")  # local accelerator is used (or grabbed)
    from distill_jax.experiment import compile as compile_lib
    from distill_jax.train import aot

    name = config_flags.get_config_filename(flags.FLAGS["config"])
    try:
        os.makedirs(workdir, exist_ok=True)
        hlo_path = os.path.join(workdir, "step.hlo.txt")
        report = compile_lib.compile_check(config, _TOPOLOGY.value, _NUM_SLICES.value, hlo_path)
    except aot.DoesNotFitError as e:
        with open(os.path.join(workdir, "compile_report.json"), "w") as f:
            json.dump({"config": name, "fits": False, "error": str(e)}, f, indent=1)
        raise SystemExit(f"error: {e}") from None
    print(aot.write_report(report, workdir, name))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
