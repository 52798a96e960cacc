"""Checkpoints of a run with orbax: the train state, the batch source's state and arrays, and
the meta data a resume checks (the student's shape, the losses, the prune plans applied).

Never the frozen teacher. Checkpoints are atomic (orbax commits a finished directory by rename)
and the last ``keep`` are kept. Items: ``state`` (TrainState), ``data`` (the source's JSON
state), ``meta`` (JSON) and ``replay`` (the source's device arrays, when it has any).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from distill_jax.train.metrics import is_local


def _checkpoint_dir(workdir: str) -> str:
    """orbax wants an absolute path or a URL."""
    path = os.path.join(workdir, "checkpoints")
    return os.path.abspath(path) if is_local(workdir) else path


class Checkpoints:
    """The checkpoints of ``workdir``: ``save`` each checkpoint step, ``restore`` on a restart.

    Args:
        workdir: local path or bucket URL.
        meta: JSON facts of the run; ``meta["student"]`` (the student's config) must match the
            checkpoints' on restore.
        keep: how many checkpoints to keep.
    """

    def __init__(self, workdir: str, meta: dict, keep: int = 3):
        self.workdir, self.meta = workdir, meta
        self.manager = ocp.CheckpointManager(
            _checkpoint_dir(workdir),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, source, plans: list) -> None:
        """Save asynchronously (``wait`` finishes it); ``force``: one save per step."""
        items = dict(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(source.get_state()),
            meta=ocp.args.JsonSave({**self.meta, "prune_plans": plans}),
        )
        if source.arrays() is not None:
            items["replay"] = ocp.args.StandardSave(source.arrays())
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def prune_plans(self, step: int) -> list:
        """The pruning plans applied before checkpoint ``step``, after checking that it is of
        this run's student."""
        args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        saved = self.manager.restore(step, args=args).meta
        if saved["student"] != self.meta["student"]:
            raise ValueError(
                f"The checkpoints in {self.workdir!r} are of another student model "
                f"({saved['student']}); use a new workdir for this config."
            )
        return list(saved.get("prune_plans") or [])

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
        self.manager.wait_until_finished()
