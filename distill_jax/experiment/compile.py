r"""``--mode=compile``: the trainer's step for a config, built abstractly and compiled for a TPU
topology on any machine (the compiling and the report: ``train/aot.py``).

``build_abstract`` builds teacher and student with ``nnx.eval_shape`` (no weights, data or
tokenizer files; the architecture comes from each block's ``config`` or its checkpoint's
config.json / GGUF metadata) and the step with the trainer's own ``train.build.build_step``.
"""

from __future__ import annotations

import time
from typing import Any

from distill_jax import teachers, topologies
from distill_jax.experiment.checks import (
    check_batch,
    check_pairs,
    check_run,
    check_vocab,
    loss_spec,
    run_settings,
    step_shape,
)
from distill_jax.experiment.models import build_mesh, build_model, build_teacher
from distill_jax.experiment.models import rules as mesh_rules
from distill_jax.train import aot
from distill_jax.train import build as build_lib


def compile_check(
    c, topology: str | None = None, num_slices: int | None = None, hlo_path: str | None = None
) -> dict:
    """Compile ``c``'s train step for a topology and return the report (``report_markdown``).

    Args:
        c: the experiment config (``topology`` / ``num_slices`` keys are the defaults).
        topology: e.g. "v5p-128" (``topologies.parse``).
        num_slices: slices over DCN (multislice).
        hlo_path: where to write the optimized HLO text (per chip), if anywhere.

    Raises:
        aot.DoesNotFitError: the arguments alone, or the compiled program, exceed a chip's HBM.
        ValueError: a config that cannot be compiled (no topology, a mesh that does not divide).
    """
    name = topology or c.get("topology")
    if not name:
        raise ValueError("--mode=compile needs --topology=<e.g. v5p-128> (or config.topology).")
    topo = topologies.parse(name, int(num_slices or c.get("num_slices", 1) or 1))
    t0 = time.perf_counter()
    mesh, built, args, facts = build_abstract(c, topo.devices())
    return aot.compile_abstract(c, topo, mesh, built, args, facts, hlo_path=hlo_path, t0=t0)


def build_abstract(c, devices) -> tuple[Any, build_lib.StepBuild, tuple, dict]:
    """(mesh, the trainer's StepBuild with abstract state, step arguments, model facts)."""
    check_run(c)
    mesh = build_mesh(c, devices)
    rules = mesh_rules(c)
    shape = step_shape(c)
    check_batch(c, mesh, rules, shape)
    spec = loss_spec(c)
    check_pairs(c, spec)
    seed = int(c.get("seed", 0))
    if c.student.get("prune"):
        raise ValueError(
            "--mode=compile builds the student from its architecture; student.prune needs "
            "calibration data, so give the pruned architecture as student.config instead."
        )
    student = build_model(c.student, "student", seed, abstract=True)
    teacher = build_teacher(
        c.teacher,
        student,
        seed,
        None,
        None,
        bridge=c.get("bridge") or None,
        abstract=True,
        needs=spec.needs(),
    )
    vocab_mask = check_vocab(student, None if c.get("bridge") else teacher, None)
    v = student.config.vocab_size
    if not c.get("bridge") and teacher is not None and teacher.vocab_size != v:
        teacher = teachers.PaddedVocabTeacher(teacher, v)
    if c.get("reference"):
        reference = build_model(c.reference, "reference", seed + 2, abstract=True)
        teacher = teachers.WithReference(teacher, reference)
    privileged = bool(c.get("onpolicy") and c.data.get("privileged_contexts"))
    built = build_lib.build_step(
        run_settings(c, spec),
        mesh=mesh,
        rules=rules,
        spec=spec,
        student=student,
        teacher=teacher,
        vocab_mask=vocab_mask,
        tokens_per_step=shape[0] * shape[1],
        privileged=privileged,
        abstract=True,
    )
    batch = aot.abstract_batch(c, shape, built.batch_shardings)
    facts = dict(student=student.config, teachers=aot.teacher_configs(teacher), shape=shape)
    if c.get("bridge"):
        facts["teacher_shape"] = (shape[0], int(c.bridge.teacher_len))
    elif privileged:
        facts["teacher_shape"] = (shape[0] * int(c.data.privileged_contexts), shape[1])
    return mesh, built, (built.state, built.teacher_params, batch), facts
