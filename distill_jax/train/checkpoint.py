"""Checkpoints of a run with orbax: the train state, the batch source's state and arrays, and
the meta data a resume checks (the student's shape, the losses, the prune plans applied, the
non-finite steps skipped so far).

Never the frozen teacher. Checkpoints are atomic (orbax commits a finished directory by rename)
and the last ``keep`` (>= 1) are kept. Items: ``state`` (TrainState), ``data`` (the source's JSON
state), ``meta`` (JSON) and ``replay`` (the source's device arrays, when it has any).

Each committed step is sealed with a checksum manifest (``train/integrity.py``) by a background
thread once orbax's asynchronous save has finished (the next ``save`` and ``wait`` wait for it).
Before the manager opens the directory, process 0 checks the newest step against its manifest
and renames corrupt steps aside (``corrupt-<step>-<time>``), falling back to the newest intact
one with a warning; the other processes wait for that.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from distill_jax.train import integrity
from distill_jax.train.metrics import is_local

log = logging.getLogger(__name__)


def _checkpoint_dir(workdir: str) -> str:
    """orbax wants an absolute path or a URL."""
    path = os.path.join(workdir, "checkpoints")
    return os.path.abspath(path) if is_local(workdir) else path


def remove_stale_temporaries(workdir: str) -> list[str]:
    """Remove a dead run's unfinished saves (``integrity.remove_stale_temporaries``) with a
    warning; only while holding the workdir lock. Returns the removed paths."""
    removed = integrity.remove_stale_temporaries(_checkpoint_dir(workdir))
    if removed:
        log.warning("Removed the unfinished checkpoints of an earlier run: %s", removed)
    return removed


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


class Checkpoints:
    """The checkpoints of ``workdir``: ``save`` each checkpoint step, ``restore`` on a restart.

    Args:
        workdir: local path or bucket URL.
        meta: JSON facts of the run; ``meta["student"]`` (the student's config) must match the
            checkpoints' on restore.
        keep: how many checkpoints to keep (at least 1).
    """

    def __init__(self, workdir: str, meta: dict, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep_checkpoints={keep}: keep at least 1 checkpoint.")
        self.workdir, self.meta = workdir, meta
        self.directory = _checkpoint_dir(workdir)
        self.primary = jax.process_index() == 0
        if self.primary:  # before orbax reads the steps (garbage metadata would stop it)
            for message in integrity.fall_back_to_intact(self.directory):
                log.warning(message)
        _sync_processes("distill_jax.checkpoints_verified")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True),
        )
        self._sealer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="seal")
        self._sealing: concurrent.futures.Future | None = None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, source, plans: list, skipped_steps: int = 0) -> None:
        """Save asynchronously (``wait`` finishes it) and seal it once written; ``force``: one
        save per step."""
        self._finish_sealing()
        items = dict(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(source.get_state()),
            meta=ocp.args.JsonSave(
                {**self.meta, "prune_plans": plans, "skipped_steps": skipped_steps}
            ),
        )
        if source.arrays() is not None:
            items["replay"] = ocp.args.StandardSave(source.arrays())
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._sealing = self._sealer.submit(self._seal, step)

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _seal(self, step: int) -> None:
        """(The sealing thread) wait for orbax's commit, then write the step's manifest."""
        self.manager.wait_until_finished()
        if self.primary:
            integrity.write_manifest(self._step_dir(step))

    def _finish_sealing(self) -> None:
        if self._sealing is not None:
            sealing, self._sealing = self._sealing, None
            sealing.result()  # re-raises what went wrong while sealing

    def is_saved(self, step: int) -> bool:
        """Checkpoint ``step`` is on disk, committed and (seen from process 0) sealed; call
        after ``wait``."""
        saved = step in self.manager.all_steps(read=True)
        return saved and (not self.primary or integrity.is_sealed(self._step_dir(step)))

    def saved_meta(self, step: int) -> dict:
        """The meta data of checkpoint ``step`` (``prune_plans``: the pruning plans applied
        before it; ``skipped_steps``), after checking that it is of this run's student."""
        args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        saved = self.manager.restore(step, args=args).meta
        if saved["student"] != self.meta["student"]:
            raise ValueError(
                f"The checkpoints in {self.workdir!r} are of another student model "
                f"({saved['student']}); use a new workdir for this config."
            )
        return dict(saved, prune_plans=list(saved.get("prune_plans") or []))

    def restore(self, step: int, shapes: Any, state_sharding: Any, source) -> Any:
        """The train state of checkpoint ``step`` (of ``shapes``, placed by ``state_sharding``);
        the source gets its state and arrays back."""
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, state_sharding
        )
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
            ),
        )
        source.set_state(restored.data)
        if source.arrays() is not None:
            args = ocp.args.Composite(replay=ocp.args.StandardRestore(source.arrays()))
            source.set_arrays(self.manager.restore(step, args=args).replay)
        return restored.state

    def wait(self) -> None:
        """Finish the pending save and its manifest (the sealing thread waits for orbax first,
        so the manager is never waited on from two threads at once)."""
        self._finish_sealing()
        self.manager.wait_until_finished()
