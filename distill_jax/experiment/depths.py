"""The models' depths from a config alone, read without any weights: what feature terms' layer
indices are checked against before anything loads (``checks.loss_spec``, ``terms.check_layers``).
"""

from __future__ import annotations

import os
from typing import Any

from distill_jax.experiment.models import model_config_from_block
from distill_jax.transforms.depth import keep_layers_spec


def block_depth(block: Any, what: str) -> int | None:
    """Blocks of the model a config block builds, after its ``keep_layers``.

    From ``config`` (a dict with a family and sizes: ``init="random"``, or a checkpoint that is
    not on this machine, as ``--mode=compile`` builds it) or from the checkpoint's config.json /
    GGUF metadata (an ``asset:`` or an existing path; ``models.model_config_from_block``).
    None when neither is there: building the model then raises its own error.
    """
    b = dict(block)
    init, arch = b.get("init", "random"), dict(b.get("config") or {})
    here = init != "random" and (init.startswith("asset:") or os.path.exists(init))
    if not here and "family" not in arch:
        return None
    n = model_config_from_block(b, what).num_layers
    keep = b.get("keep_layers")
    return n if keep is None else len(keep_layers_spec(keep, n))


def student_depth(c) -> int | None:
    """The student's blocks after ``keep_layers`` and every depth-pruning stage (one-shot
    ``student.prune`` and scheduled ``prune_schedule``; kind "blocks" keeps ``keep_layers``
    blocks): the smallest depth it trains at, which layer indices must fit."""
    n = block_depth(c.student, "student")
    stages = [*(c.student.get("prune") or ()), *(c.get("prune_schedule") or ())]
    for stage in stages:
        if n is not None and stage.get("kind") == "blocks":
            n = int(stage["keep_layers"])
    return n


def model_depths(c) -> tuple[int | None, int | None]:
    """(L_s, L_t): the student's and the feature-supplying teacher's blocks (None: unknown).
    An online teacher is its own model; an EMA teacher is the student."""
    kind = c.teacher.get("kind", "online")
    student = student_depth(c)
    teacher = {"online": lambda: block_depth(c.teacher, "teacher"), "ema": lambda: student}
    return student, teacher[kind]() if kind in teacher else None
