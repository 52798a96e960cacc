"""``RunSettings``: what the step builder and the loop need of a config, as one typed value.

``experiment.run_settings(config)`` reads it from ``config.seed``, ``optimizer``, ``train``,
``eval``, ``teacher.rules``, ``data.source``, ``bridge`` and ``losses`` once; nothing in
``train/`` reads the config itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """One run's settings (defaults are the trainer's).

    seed: parameter init and the state's key; steps: optimizer steps of the run; optimizer:
    ``train.state.make_optimizer``'s dict; micro_batches, remat: the step; log_every,
    checkpoint_every, keep_checkpoints, export: the loop (``config.train``); eval_every,
    eval_at_start: held-out evaluation (``config.eval``); teacher_rules: the teacher's own
    logical-axis rules (None: the mesh's); batch: which optional batch fields the step reads
    (``bridge``, ``pairs``); loss_labels: ``config.losses``'
    labels (checked on resume); nonfinite: what a step whose loss, gradient norm or updated
    parameters are not finite does, "stop" (the run stops, nothing of that step is saved) or
    "skip" (the update is dropped inside the step and counted); max_skipped_steps: with "skip",
    the run stops when more steps than this were skipped.
    """

    seed: int
    steps: int
    optimizer: Mapping[str, Any]
    micro_batches: int = 1
    remat: Any = False
    log_every: int = 1
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    export: bool = False
    eval_every: int | None = None
    eval_at_start: bool = True
    teacher_rules: tuple | None = None
    batch: Mapping[str, bool] = dataclasses.field(default_factory=dict)
    loss_labels: tuple[str, ...] = ()
    nonfinite: str = "stop"
    max_skipped_steps: int = 10

    def __post_init__(self):
        if self.keep_checkpoints < 1:
            raise ValueError(
                f"train.keep_checkpoints={self.keep_checkpoints}: keep at least 1 checkpoint "
                "(0 would delete every checkpoint, leaving nothing to resume from)."
            )
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"train.nonfinite={self.nonfinite!r}: choose one of {NONFINITE_POLICIES}."
            )
        if self.max_skipped_steps < 0:
            raise ValueError(f"train.max_skipped_steps={self.max_skipped_steps}: use a count >= 0.")


NONFINITE_POLICIES = ("stop", "skip")
