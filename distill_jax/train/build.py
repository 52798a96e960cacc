r"""The train step of a config and everything it is compiled against: what ``train/loop.py``
runs and ``--mode=compile`` (``experiment/compile.py``) compiles for a TPU topology. One
builder, so the two cannot drift apart.

``build_step(...)`` makes the optimizer, the initial state (real arrays on the mesh, or
``jax.ShapeDtypeStruct``\s with their shardings), the teacher's placement, the batch shardings
and the jitted step ``step(state, teacher_params, batch) -> (state, metrics)`` (state donated).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from distill_jax import sharding, teachers
from distill_jax.models.transformer import Transformer
from distill_jax.train import objective
from distill_jax.train import state as state_lib
from distill_jax.train import step as step_lib
from distill_jax.train.settings import RunSettings


def batch_shardings(
    mesh, rules, cached: bool, bridge: bool = False, privileged: bool = False, pairs: bool = False
) -> dict:
    """Batch fields [B, L] (and a cached teacher's [B, L, K] / [B, L], a bridge's teacher
    tokens and chunk ids, a self-teacher's privileged prompts [B, K, L], the rejected side of
    preference pairs [B, L]) sharded over batch."""
    fields = step_lib.BATCH_FIELDS + (step_lib.PAIR_FIELDS if pairs else ())
    if bridge:
        fields += (
            teachers.CrossTokenizerTeacher.FIELDS + teachers.CrossTokenizerTeacher.CHUNK_FIELDS
        )
    out = {k: sharding.named_sharding(mesh, ("batch", "length"), rules) for k in fields}
    if bridge:
        out["dropped_bytes"] = sharding.named_sharding(mesh, ("batch",), rules)
    if cached:
        for k in teachers.CachedTeacher.FIELDS:
            extra = (None,) if k in ("ids", "logprobs") else ()
            out[f"teacher/{k}"] = sharding.named_sharding(mesh, ("batch", "length", *extra), rules)
    if privileged:  # the teacher's view under K privileged prompts
        for k in teachers.SelfTeacher.FIELDS:
            out[k] = sharding.named_sharding(mesh, ("batch", None, "length"), rules)
    return out


class _InMesh:
    """A jitted step that is traced (called or lowered) inside ``sharding.use_mesh``: the
    activations' ``shard()`` constraints apply and kernels are picked by the mesh's platform
    (``sharding.current_platform``), both in the trainer and in ``--mode=compile``."""

    def __init__(self, jitted, mesh, rules):
        self.jitted, self.mesh, self.rules = jitted, mesh, rules

    def __call__(self, *args):
        with sharding.use_mesh(self.mesh, self.rules):
            return self.jitted(*args)

    def lower(self, *args):
        with sharding.use_mesh(self.mesh, self.rules):
            return self.jitted.lower(*args)


@dataclasses.dataclass
class StepBuild:
    """The train step of a config and everything it is compiled against (``build_step``)."""

    tx: Any  # optax transformation over state.params
    schedule: Any  # learning rate by step
    state: Any  # TrainState: arrays on the mesh, or ShapeDtypeStructs with shardings
    state_sharding: Any
    teacher_params: Any  # on the mesh / ShapeDtypeStructs with shardings / None
    teacher_sharding: Any
    batch_shardings: dict  # field -> NamedSharding
    graphdef: Any  # the student's
    jitted: Any  # step(state, teacher_params, batch) -> (state, metrics); state donated
    compile_for: Callable  # (student config, state or shapes) -> (graphdef, shardings, jitted)


def build_step(
    run: RunSettings,
    *,
    mesh,
    rules,
    spec: objective.LossSpec,
    student,
    teacher,
    vocab_mask,
    tokens_per_step: int,
    privileged: bool = False,
    abstract: bool = False,
) -> StepBuild:
    """Optimizer, initial state, shardings and the jitted step of a run.

    Args:
        run: ``experiment.run_settings(config)``.
        mesh, rules: from ``experiment.build_mesh`` and ``config.rules``.
        spec: ``loss_spec(c)``.
        student, teacher: from ``build_model`` / ``build_teacher`` (abstract ones in compile
            mode).
        vocab_mask: [V] bool or None (``experiment.check_vocab``).
        tokens_per_step: B x L, for token-denominated warmup.
        privileged: batches carry a self-teacher's privileged prompts.
        abstract: the state and teacher parameters as ``jax.ShapeDtypeStruct``s with their
            shardings (``jax.eval_shape`` of the same initialisation), for ``jitted.lower``;
            otherwise real arrays placed on the mesh.
    """
    seed = run.seed
    tx, schedule = state_lib.make_optimizer(run.optimizer, run.steps, tokens_per_step)
    _, student_params = teachers.split_model(student)
    t_config = getattr(teacher, "config", None)

    def init_state(student_params):
        loss_params = objective.init_params(
            spec,
            jax.random.key(seed + 7),
            student.config.hidden_size,
            getattr(t_config, "hidden_size", student.config.hidden_size),
            num_layers=(
                student.config.num_layers,
                getattr(t_config, "num_layers", student.config.num_layers),
            ),
        )
        params = {"student": student_params, "loss": loss_params}
        return state_lib.create(
            params,
            tx,
            objective.init_state(spec),
            seed=seed,
            ema=teacher is not None and teacher.kind == "ema",
        )

    state = jax.eval_shape(init_state, student_params) if abstract else init_state(student_params)
    place = _abstract_on if abstract else jax.device_put
    teacher_params = teacher.params() if teacher is not None else None
    teacher_sharding = None
    if teacher_params is not None:  # the teacher may have its own rules (e.g. plain FSDP)
        teacher_rules = run.teacher_rules if run.teacher_rules is not None else rules
        teacher_sharding = teacher.shardings(mesh, teacher_rules)
        teacher_params = place(teacher_params, teacher_sharding)
    cached = teacher is not None and teacher.kind == "cached"
    bridge, pairs = run.batch.get("bridge", False), run.batch.get("pairs", False)
    fields = batch_shardings(mesh, rules, cached, bridge, privileged, pairs)

    def compile_for(student_config, state_like):
        """(graphdef, state shardings, jitted step) for a student of ``student_config`` and a
        state (or its shapes) ``state_like``."""
        abstract_model = nnx.eval_shape(lambda: Transformer(student_config, rngs=nnx.Rngs(0)))
        graphdef, _ = teachers.split_model(abstract_model)
        axes = sharding.param_logical_axes(abstract_model)
        state_sharding = step_lib.state_shardings(state_like, mesh, rules, axes)
        step_fn = step_lib.make_distill_step(
            student_graphdef=graphdef,
            teacher=teacher,
            spec=spec,
            tx=tx,
            micro_batches=run.micro_batches,
            remat=run.remat,
            vocab_mask=vocab_mask,
            skip_nonfinite=run.nonfinite == "skip",
        )
        jitted = step_lib.jit_step(
            step_fn,
            state_sharding=state_sharding,
            teacher_sharding=teacher_sharding,
            batch_sharding=fields,
        )
        return graphdef, state_sharding, _InMesh(jitted, mesh, rules)

    graphdef, state_sharding, jitted = compile_for(student.config, state)
    return StepBuild(
        tx=tx,
        schedule=schedule,
        state=place(state, state_sharding),
        state_sharding=state_sharding,
        teacher_params=teacher_params,
        teacher_sharding=teacher_sharding,
        batch_shardings=fields,
        graphdef=graphdef,
        jitted=jitted,
        compile_for=compile_for,
    )


def _abstract_on(tree, shardings):
    """ShapeDtypeStructs of ``tree``'s leaves carrying ``shardings``."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype, sharding=s), tree, shardings
    )
