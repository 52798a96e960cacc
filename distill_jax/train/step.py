r"""The distillation step: teacher forward, student forward and backward, optimizer, in one jit.

``make_distill_step(...)`` returns ``step(state, teacher_params, batch) -> (state, metrics)``:

1. The batch [B, L] is split into ``micro_batches`` micro-batches (rows a, a + A, a + 2A, ... go
   to micro-batch a, so every data shard holds part of every micro-batch).
2. For each micro-batch (a ``lax.scan``): the teacher's loss inputs under ``stop_gradient``
   (``teachers``), the student's final hidden states, the loss *sum* and count of each
   normaliser group of ``train.objective.loss_groups`` ("tokens"; a bridge term's chunks; a
   pair term's pairs), and the gradient of each group's sum (one forward, one backward pass
   per group). With pair terms (preference pairs, ``PAIR_FIELDS``) the student, and the teacher
   when a pair term reads it, also run on the rejected side of each pair.
3. Gradients and sums are added over micro-batches and each group is divided once by its global
   count N_g = sum of its counts, g = sum_g G_g / N_g, so A micro-batches give exactly the
   gradient of one A-times batch (normalising per micro-batch is the bug TRL #4719 describes).
4. optax updates the trainable parameters (student + loss projectors; never the teacher), the
   loss controllers advance (``objective.update_state``), an EMA teacher follows the student.
5. The metric ``finite`` says whether the loss, the gradient norm and every updated parameter
   are finite (``all_finite``); the loop stops on a non-finite step before saving anything. With
   ``skip_nonfinite`` the step keeps the previous parameters, optimizer, loss controllers and
   EMA teacher when it is not finite (the step counter, data and rng still advance).

``jit_step`` compiles it with in/out shardings on the mesh and the state donated.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from distill_jax import sharding
from distill_jax.train import objective
from distill_jax.train.state import TrainState

BATCH_FIELDS = ("input_ids", "targets", "segment_ids", "positions", "loss_mask")
# Preference pairs (data.pairs): the rejected side of each row's pair, same [B, L] shapes.
PAIR_FIELDS = tuple(f"rejected_{k}" for k in BATCH_FIELDS)


def _micro_batches(batch: dict, n: int) -> dict:
    """{k: [B, ...]} -> {k: [n, B / n, ...]} with rows a, a + n, ... in micro-batch a."""

    def split(x):
        b = x.shape[0]
        if b % n:
            raise ValueError(f"Batch size {b} is not divisible by micro_batches={n}.")
        return jnp.swapaxes(x.reshape(b // n, n, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def _needs(spec: objective.LossSpec) -> tuple[bool, bool]:
    """(hidden states, attention q/k/v) that the spec's feature terms read."""
    needs = spec.needs()
    return "hidden_states" in needs, "qkv" in needs


def make_distill_step(
    *,
    student_graphdef,
    teacher,
    spec: objective.LossSpec,
    tx: optax.GradientTransformation,
    micro_batches: int = 1,
    remat: str | bool = False,
    vocab_mask: jax.Array | None = None,
    skip_nonfinite: bool = False,
) -> Callable:
    """The pure step function (compile it with ``jit_step``).

    Args:
        student_graphdef: ``nnx.split`` graph of the student (its config fixes the family).
        teacher: a ``teachers`` object (online, cached, ensemble, composite, EMA), or None
            for teacher-free terms only (a CE baseline).
        spec: the loss spec (``objective.LossSpec.from_config``).
        tx: the optimizer over ``state.params``.
        micro_batches: A, gradient accumulation steps inside one optimizer step.
        remat: the student's rematerialisation policy, "none" | "full" | "dots" | "offload"
            (``models.scan.remat_policy``; True = "full": activation memory ~ 1 block).
        vocab_mask: [V] bool, False on padded vocabulary rows.
        skip_nonfinite: drop the update of a step that is not finite (``train.nonfinite =
            "skip"``) instead of applying it (the loop then stops the run).
    """
    want_hidden, want_qkv = _needs(spec)
    want_embeddings = "embeddings" in spec.needs()  # DSKD's cross-model attention

    def rejected_inputs(student, state, teacher_params, mb):
        """The rejected side of each pair as LossInputs (student, and teacher if needed)."""
        side = {k: mb[f"rejected_{k}"] for k in BATCH_FIELDS}
        out = student.forward(
            side["input_ids"],
            positions=side["positions"],
            segment_ids=side["segment_ids"],
            compute_logits=False,
            remat=remat,
        )
        use_teacher = teacher is not None and spec.pairs_need_teacher()
        t = teacher.loss_inputs(teacher_params, side, state) if use_teacher else {}
        keep = ("teacher_hidden", "teacher_head", "teacher_softcap")
        return objective.LossInputs(
            student_hidden=out.hidden,
            student_head=student.head_weights(),
            targets=side["targets"],
            mask=side["loss_mask"],
            positions=side["positions"],
            segment_ids=side["segment_ids"],
            vocab_mask=vocab_mask,
            student_softcap=student.config.final_logit_softcapping,
            **{k: v for k, v in t.items() if k in keep},
        )

    def micro_loss(trainable, state, teacher_params, mb):
        student = nnx.merge(student_graphdef, nnx.State(trainable["student"]))
        out = student.forward(
            mb["input_ids"],
            positions=mb["positions"],
            segment_ids=mb["segment_ids"],
            compute_logits=False,
            output_hidden_states=want_hidden,
            output_attention_qkv=want_qkv,
            remat=remat,
        )
        inputs = objective.LossInputs(
            student_hidden=out.hidden,
            student_head=student.head_weights(),
            targets=mb["targets"],
            mask=mb["loss_mask"],
            student_hidden_states=out.hidden_states,
            student_qkv=out.attention_qkv,
            student_attention=student.config.attention_layers() if want_qkv else None,
            positions=mb["positions"],
            segment_ids=mb["segment_ids"],
            vocab_mask=vocab_mask,
            student_softcap=student.config.final_logit_softcapping,
            student_embeddings=(
                (student.embed_tokens(mb["input_ids"]), student.embed_tokens(mb["targets"]))
                if want_embeddings
                else None
            ),
            rejected=(
                rejected_inputs(student, state, teacher_params, mb) if spec.pair_terms else None
            ),
            **(teacher.loss_inputs(teacher_params, mb, state) if teacher is not None else {}),
        )
        sums, counts, metrics = objective.loss_groups(
            spec, inputs, trainable["loss"], state.loss_state, state.step
        )
        first = next(iter(sums))  # "tokens" unless only bridge terms are weighted
        coef = student.config.router_aux_loss_coef
        if coef and student.config.num_experts:
            # Router load balancing (a batch mean) weighted like the first group's mean losses.
            sums[first] = sums[first] + coef * out.aux_loss * counts[first]
            metrics["loss/router_aux"] = (out.aux_loss * counts[first], counts[first])
        dropped = [s["dropped_assignments"] for s in out.router_stats if "dropped_assignments" in s]
        if dropped:  # expert-parallel buffers with a capacity factor (models/moe.py)
            k = student.config.num_experts_per_tok
            assigned = sum(s["num_tokens"] for s in out.router_stats) * k
            metrics["moe/dropped_fraction"] = (sum(dropped).astype(jnp.float32), assigned)
        return sums, (counts, metrics)

    groups = spec.groups()

    def grads_of_groups(trainable, state, teacher_params, mb):
        """(sums, counts, metrics, {group: gradient of its sum}): one forward, one VJP per group
        (with one group this is ``value_and_grad``)."""
        fn = lambda p: micro_loss(p, state, teacher_params, mb)  # noqa: E731
        sums, vjp_fn, (counts, metrics) = jax.vjp(fn, trainable, has_aux=True)
        one_hot = lambda g: {h: jnp.asarray(h == g, v.dtype) for h, v in sums.items()}  # noqa: E731
        return sums, counts, metrics, {g: vjp_fn(one_hot(g))[0] for g in groups}

    def step(state: TrainState, teacher_params, batch: dict):
        mbs = _micro_batches({k: batch[k] for k in batch}, micro_batches)

        def body(carry, mb):
            grads, totals, counts, sums = carry
            t, c, m, g = grads_of_groups(state.params, state, teacher_params, mb)
            add = lambda a, b: jax.tree.map(jnp.add, a, b)  # noqa: E731
            return (add(grads, g), add(totals, t), add(counts, c), add(sums, m)), None

        first = jax.tree.map(lambda x: x[0], mbs)
        _, (_, metric_shapes) = jax.eval_shape(
            lambda: micro_loss(state.params, state, teacher_params, first)
        )
        zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
        scalars = lambda: {g: jnp.zeros((), jnp.float32) for g in groups}  # noqa: E731
        init = (
            {g: jax.tree.map(jnp.zeros_like, state.params) for g in groups},
            scalars(),
            scalars(),
            zeros(metric_shapes),
        )
        (group_grads, totals, counts, sums), _ = jax.lax.scan(body, init, mbs)
        n = {g: jnp.maximum(counts[g], 1.0) for g in groups}
        grads = jax.tree.map(lambda x: x / n[groups[0]], group_grads[groups[0]])
        for g in groups[1:]:
            grads = jax.tree.map(lambda a, x, g=g: a + x / n[g], grads, group_grads[g])
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_step = state.step + 1
        loss_state = objective.update_state(spec, state.loss_state, sums, new_step)
        is_ema = teacher is not None and teacher.kind == "ema"
        ema = teacher.update(state.ema, params["student"], new_step) if is_ema else state.ema
        metrics = {k: s / jnp.maximum(c, 1.0) for k, (s, c) in sums.items()}
        metrics.update(
            loss=sum(totals[g] / n[g] for g in groups),
            tokens=counts[groups[0]],
            grad_norm=optax.global_norm(grads),
        )
        metrics["finite"] = all_finite(metrics["loss"], metrics["grad_norm"], params)
        if skip_nonfinite:
            params, opt_state, loss_state, ema = keep_if(
                metrics["finite"],
                (params, opt_state, loss_state, ema),
                (state.params, state.opt_state, state.loss_state, state.ema),
            )
        new_state = state.replace(
            step=new_step,
            params=params,
            opt_state=opt_state,
            loss_state=loss_state,
            rng=jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state.rng), 1)),
            ema=ema,
        )
        return new_state, metrics

    return step


def all_finite(loss: jax.Array, grad_norm: jax.Array, params) -> jax.Array:
    """[] bool: the loss, the gradient norm and every leaf of ``params`` are finite (a norm of
    the parameters would overflow on large finite values, so each leaf is checked)."""
    leaves = jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)])
    return jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.all(leaves)


def keep_if(ok: jax.Array, new, old):
    """``new`` where the [] bool ``ok`` holds, else ``old`` (same pytree structure)."""
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def state_shardings(state: TrainState, mesh, rules, param_axes: dict):
    """NamedShardings for every leaf of ``state``: parameter-shaped leaves (params, optimizer
    moments, EMA) follow the parameter's logical axes; everything else is replicated.

    Args:
        param_axes: ``sharding.param_logical_axes(student)``.
    """

    def one(path, leaf):
        key = _param_key(path)
        axes = param_axes.get(key) if key is not None else None
        if axes is None or len(axes) != jnp.ndim(leaf):
            return sharding.named_sharding(mesh, (None,) * jnp.ndim(leaf), rules)
        return sharding.named_sharding(mesh, axes, rules, jnp.shape(leaf), what=key)

    return jax.tree_util.tree_map_with_path(one, state)


def _param_key(path) -> str | None:
    """The student-parameter path inside a state path: the part after a "student" key."""
    names = [str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path]
    for marker in ("student", "ema"):  # params and optimizer moments; the EMA teacher
        if marker in names:
            return "/".join(names[names.index(marker) + 1 :])
    return None


def jit_step(step, *, state_sharding, teacher_sharding, batch_sharding):
    """Compile ``step`` with shardings in and out and the state donated."""
    return jax.jit(
        step,
        in_shardings=(state_sharding, teacher_sharding, batch_sharding),
        out_shardings=(state_sharding, None),
        donate_argnums=(0,),
    )
