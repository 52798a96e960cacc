r"""The training loop, top to bottom: step, restore, loop (source -> step -> fetch / log / eval /
checkpoint), export.

``train(experiment, workdir)`` runs an ``experiment.Experiment`` (``experiment.build(config)``;
``experiment.train(config, workdir)`` does both) to ``config.train.steps`` optimizer steps and
returns the last eval. What it guarantees:

* Everything a resumed run needs is checkpointed with orbax (``train/checkpoint.py``: student,
  optimizer, loss controllers, rng, EMA teacher if any, and the batch source's state), never the
  frozen teacher; a run started on a workdir with checkpoints resumes from the latest and
  produces the loss curve an uninterrupted run would have (bit for bit on CPU).
* ``guard`` (what ``experiment.train`` wraps around the build and the loop): a SIGTERM during
  start-up raises ``preemption.Preempted`` (nothing trained, nothing lost); the workdir is
  locked against a second run (``workdir_lock``); a dead run's unfinished saves are removed.
* SIGTERM (preemption) during training saves a checkpoint of the current step and returns
  normally, with ``checkpoint_saved`` (the step's checkpoint is on disk and sealed).
* A step whose loss, gradient norm or updated parameters are not finite (the step's ``finite``
  metric) is never saved: with ``train.nonfinite="stop"`` the run stops and names the last
  finite checkpoint (``NonFiniteLossError``); with ``"skip"`` the step dropped its update, the
  count is logged as ``skipped_steps`` (and checkpointed), and the run stops once it exceeds
  ``train.max_skipped_steps``.
* Resuming drops the metrics rows and TensorBoard events of steps after the restored one, and
  a corrupt newest checkpoint is set aside for the newest intact one (``train/checkpoint.py``).

Each regime is a batch source (``train/batch_sources.py``): fixed data, a cached teacher, a
cross-tokenizer bridge, on-policy generation with replay. A host-free source (fixed data) keeps
the host off the critical path: the next batch is read and placed while the step runs, and
nothing comes back from the devices between log steps (a transfer guard turns any implicit
device <-> host copy there into an error). Metrics are read back, checked and logged at log,
eval and checkpoint steps. Generation-based sources build each step's batch from samples on the
host, so they read back every step.

Metrics go to ``workdir/metrics.jsonl`` (one line per logged step), TensorBoard event files in
``workdir/tensorboard`` and a console progress bar with tokens/s and ETA (``train/metrics.py``).
The workdir may be a local path or a bucket URL (``gs://bucket/run``, what
``launch/tpu_pod.py`` uses): orbax writes checkpoints there through tensorstore, metrics and the
export go through ``etils.epath`` (``pip install distill_jax[gcs]``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from etils import epath

from distill_jax.models.convert import save_pretrained
from distill_jax.train import build as build_lib
from distill_jax.train import workdir_lock
from distill_jax.train.checkpoint import Checkpoints, remove_stale_temporaries
from distill_jax.train.evaluate import Evaluator
from distill_jax.train.metrics import Logger, is_local
from distill_jax.train.preemption import Preemption
from distill_jax.train.settings import RunSettings
from distill_jax.transforms import params as transform_params
from distill_jax.transforms import schedule as prune_schedule
from distill_jax.transforms import stats as transform_stats


class NonFiniteLossError(RuntimeError):
    """A step's loss, gradient norm or parameters became NaN or inf (past the skip limit); the
    last finite checkpoint is left as it was."""


@dataclasses.dataclass
class _Program:
    """The student's current config and the step compiled for it (pruning changes both)."""

    config: Any
    graphdef: Any
    state_sharding: Any
    jitted: Any


@contextlib.contextmanager
def guard(workdir: str, *, force_unlock: bool = False) -> Iterator[Preemption]:
    """What a run holds from its first line to its last, in this order: the SIGTERM handler
    (yielded; ``train`` switches it to checkpoint-and-return once training), the workdir lock
    (process 0; ``force_unlock`` takes over a live one) and, with the lock held, the removal of
    a dead run's unfinished checkpoint saves."""
    with Preemption() as preemption:
        preemption.defer()  # a SIGTERM now would leave the lock taken and never released
        lock = None
        if jax.process_index() == 0:
            lock = workdir_lock.acquire(workdir, force=force_unlock)
        try:
            preemption.undefer()
            if lock is not None:
                remove_stale_temporaries(workdir)
            yield preemption
        finally:
            if lock is not None:
                workdir_lock.release(workdir, lock)


def _nonfinite_message(step: int, m: dict, last: int | None, over: str) -> str:
    """What went non-finite at ``step`` (metrics ``m``), the last finite checkpoint, the fix;
    ``over``: the skip count past its limit ("" with the stop policy)."""
    bad = [f"{k} ({float(m[k])})" for k in ("loss", "grad_norm") if not np.isfinite(m[k])]
    where = (
        f"the last finite checkpoint is step {last}: the same command resumes from it"
        if last is not None
        else "no checkpoint was saved yet: the same command starts again from step 0"
    )
    other = "raise train.max_skipped_steps" if over else "set train.nonfinite='skip'"
    return (
        f"Non-finite {' and '.join(bad) or 'parameters after the update'} at step {step}{over}; "
        f"stopped without saving it, {where} once the cause is fixed (lower "
        f"optimizer.learning_rate, check the data, or {other})."
    )


class _Pending:
    """Metrics of dispatched steps, still on the devices until ``fetch`` reads them back."""

    def __init__(self, logger: Logger, schedule, run: RunSettings, skipped: int):
        self.rows: list = []  # (step, metrics on the devices)
        self.logger, self.schedule = logger, schedule
        self.log_every, self.steps = run.log_every, run.steps
        self.skip, self.max_skipped = run.nonfinite == "skip", run.max_skipped_steps
        self.skipped = skipped  # non-finite steps whose update was dropped, over the whole run

    def add(self, step: int, metrics: dict) -> None:
        self.rows.append((step, metrics))

    def fetch(self, checkpoints: Checkpoints) -> None:
        """Read back the pending steps' metrics; count the skipped ones and stop at the first
        non-finite one (past the skip limit); log."""
        rows, self.rows = jax.device_get(self.rows), []
        for s, m in rows:
            if not m.pop("finite", True):
                self.skipped += 1
                if not self.skip or self.skipped > self.max_skipped:
                    over = (
                        f" ({self.skipped} non-finite steps skipped, more than "
                        f"train.max_skipped_steps={self.max_skipped})"
                        if self.skip
                        else ""
                    )
                    last = checkpoints.latest_step()
                    raise NonFiniteLossError(_nonfinite_message(s, m, last, over))
            if self.skip:
                m["skipped_steps"] = self.skipped
        if rows:
            tokens = sum(float(m["tokens"]) for _, m in rows)
            self.logger.advance(len(rows), tokens, float(rows[-1][1]["loss"]))
        for s, m in rows:
            if s % self.log_every == 0 or s == self.steps:
                self.logger.log(s, dict(m, learning_rate=float(self.schedule(s - 1))))


def train(exp, workdir: str, preemption: Preemption | None = None) -> dict:
    """Run the experiment ``exp`` in ``workdir`` (resuming from its checkpoints); returns the
    last eval (with ``stopped_at`` and ``checkpoint_saved`` after a SIGTERM).

    ``preemption``: the handler of the caller's ``guard`` (``experiment.train``); without one
    the run takes its own ``guard``."""
    if preemption is None:
        with guard(workdir) as preemption:
            return train(exp, workdir, preemption)
    run = exp.run  # the config's settings, read once by experiment.run_settings
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)

    # --- state, shardings and the step (the one builder; --mode=compile lowers the same)
    built = build_lib.build_step(
        run,
        mesh=exp.mesh,
        rules=exp.rules,
        spec=exp.spec,
        student=exp.student,
        teacher=exp.teacher,
        vocab_mask=exp.vocab_mask,
        tokens_per_step=exp.shape[0] * exp.shape[1],
        privileged=exp.privileged,
    )
    state, teacher_params = built.state, built.teacher_params
    program = _Program(exp.student.config, built.graphdef, built.state_sharding, built.jitted)
    source = exp.make_source(built)
    evaluate = Evaluator(
        exp.teacher, teacher_params, exp.vocab_mask, source, exp.held_out_batches, exp.acceptance()
    )

    # --- restore
    meta = {"student": repr(exp.student.config), "losses": sorted(run.loss_labels)}
    checkpoints = Checkpoints(workdir, meta, keep=run.keep_checkpoints)
    plans: list = []
    skipped = 0  # non-finite steps skipped before the checkpoint
    start = checkpoints.latest_step()
    if start is not None:
        saved = checkpoints.saved_meta(start)
        plans, skipped = saved["prune_plans"], int(saved.get("skipped_steps", 0))
        shapes = state
        if plans:  # the checkpoint is of the student after these pruning stages
            shapes, program.config = prune_schedule.replay(state, exp.student.config, plans)
            program.graphdef, program.state_sharding, program.jitted = built.compile_for(
                program.config, shapes
            )
        state = checkpoints.restore(start, shapes, program.state_sharding, source)
    start = start or 0

    # --- loop
    is_main = jax.process_index() == 0
    steps = run.steps
    logger = Logger(workdir, steps, start, enabled=is_main)  # drops rows after `start`
    result: dict = {}
    log_every, checkpoint_every, eval_every = run.log_every, run.checkpoint_every, run.eval_every
    pending = _Pending(logger, built.schedule, run, skipped)
    preemption.start_training()  # a SIGTERM from now on: finish the step, save it, return
    try:
        step = start
        if start == 0 and run.eval_at_start:
            result = evaluate(state, program.graphdef, program.config)
            logger.log(0, result, "eval")
            logger.flush()
        while step < steps:
            no_copies = contextlib.nullcontext()
            if source.host_free:
                no_copies = jax.transfer_guard("disallow")
            with no_copies:
                batch, extra = source.next(state, step)
                state, metrics = program.jitted(state, teacher_params, batch)
                if source.host_free and step + 1 < steps:  # a cache holds exactly `steps`
                    source.prefetch()
            step += 1
            pending.add(step, {**metrics, **extra})
            stages_now = [st for st in exp.stages if int(st["step"]) == step]
            eval_now = bool(eval_every) and step % eval_every == 0
            # One save per step: a SIGTERM that lands on a periodic step must not save it twice.
            save_now = step % checkpoint_every == 0 or step == steps or preemption.requested
            if not (step % log_every == 0 or stages_now or eval_now or save_now):
                continue
            pending.fetch(checkpoints)  # before anything below: a non-finite step is never saved
            for stage in stages_now:
                state = _apply_stage(exp, built, program, stage, state, plans)
                logger.log(step, {"prune_params": float(num_student_params(state))}, "event")
            if eval_now:
                result = evaluate(state, program.graphdef, program.config)
                logger.log(step, result, "eval")
                source.after_eval(result)
            if save_now:
                checkpoints.save(step, state, source, plans, pending.skipped)
            logger.flush()
            if preemption.requested:
                checkpoints.wait()
                logger.log(step, {"sigterm": 1.0}, "event")
                saved = checkpoints.is_saved(step)
                return {"stopped_at": step, "checkpoint_saved": saved, **result}
        if not result or eval_every is None or step % eval_every:
            result = evaluate(state, program.graphdef, program.config)
            logger.log(step, result, "eval")
    finally:
        checkpoints.wait()
        logger.close()

    # --- export
    if run.export and is_main:
        model = transform_params.to_model(jax.device_get(state.params["student"]), program.config)
        _export(model, workdir)
    return result


def _apply_stage(exp, built, program: _Program, stage, state, plans: list):
    """Calibrate the current student, plan the stage (appended to ``plans``), slice the state
    and compile the step again (``program`` updated); returns the new state on the mesh."""
    host = jax.device_get(state.params["student"])
    model = transform_params.to_model(host, program.config)
    stats = transform_stats.calibrate(model, exp.calibration_batches())
    plan = prune_schedule.make_plan(stage, stats, program.config, exp.tensor_size)
    plans.append(plan)
    state, program.config = prune_schedule.transform_state(
        jax.device_get(state), program.config, plan
    )
    program.graphdef, program.state_sharding, program.jitted = built.compile_for(
        program.config, state
    )
    return jax.device_put(state, program.state_sharding)


def num_student_params(state) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(state.params["student"]))


def _export(model, workdir: str) -> None:
    """``save_pretrained`` into ``workdir/export``; through a local folder for a bucket URL."""
    if is_local(workdir):
        save_pretrained(model, os.path.join(workdir, "export"))
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        dest = epath.Path(workdir) / "export"
        dest.mkdir(parents=True, exist_ok=True)
        for name in sorted(os.listdir(tmp)):
            epath.Path(tmp, name).copy(dest / name, overwrite=True)
