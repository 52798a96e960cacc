"""The distill step: accumulation equals one big batch, sharded equals one device, only the
student moves, one compilation, and each teacher kind against the loss computed by hand."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import distill_jax as dj
from distill_jax import sharding, teachers
from distill_jax.losses import topk
from distill_jax.train import objective
from distill_jax.train import state as state_lib
from distill_jax.train import step as step_lib

ARCH = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, head_dim=8
)


def _model(layers, seed, family="llama"):
    return dj.models.Transformer(
        dj.models.make_config(family, num_layers=layers, **ARCH), rngs=nnx.Rngs(seed)
    )


def _batch(b=8, t=16, seed=0):
    rng = np.random.default_rng(seed)
    seg = np.ones((b, t), np.int32)
    seg[:, t // 2 :] = 2  # two packed documents per row
    pos = np.concatenate([np.arange(t // 2), np.arange(t - t // 2)]).astype(np.int32)
    mask = rng.random((b, t)) > 0.2
    return dict(
        input_ids=rng.integers(0, 64, (b, t)).astype(np.int32),
        targets=rng.integers(0, 64, (b, t)).astype(np.int32),
        segment_ids=seg,
        positions=np.tile(pos, (b, 1)),
        loss_mask=mask,
    )


def _setup(teacher=None, losses=None, lr=1e-2, optimizer="adamw"):
    student = _model(1, 2)
    teacher = teachers.OnlineTeacher(_model(2, 1)) if teacher is None else teacher
    spec = objective.LossSpec.from_config(
        losses or dict(forward_kl=dict(temperature=2.0), ce=dict(weight=0.5)),
        dict(head_chunk_tokens=8),
    )
    tx, _ = state_lib.make_optimizer(
        dict(name=optimizer, learning_rate=lr, warmup_steps=0), 10, 128
    )
    graphdef, params = teachers.split_model(student)
    state = state_lib.create(
        {"student": params, "loss": {}},
        tx,
        objective.init_state(spec),
        seed=0,
        ema=teacher is not None and teacher.kind == "ema",
    )
    return student, teacher, spec, tx, graphdef, state


def _close(a, b, tol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def test_four_micro_batches_equal_one_four_times_batch():
    # SGD, so that parameters differ exactly as much as the gradients do (Adam would magnify
    # rounding noise in near-zero gradients to the learning rate).
    _, teacher, spec, tx, graphdef, state = _setup(optimizer="sgd", lr=1.0)
    batch = _batch(b=16)
    outs = []
    for a in (1, 4):
        fn = jax.jit(
            step_lib.make_distill_step(
                student_graphdef=graphdef, teacher=teacher, spec=spec, tx=tx, micro_batches=a
            )
        )
        outs.append(fn(state, teacher.params(), batch))
    (s1, m1), (s4, m4) = outs
    _close(s1.params, s4.params, 1e-6)
    _close(s1.opt_state, s4.opt_state, 1e-6)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
    assert float(m1["tokens"]) == float(batch["loss_mask"].sum())


def _manual_loss(student_params, graphdef, teacher_inputs, batch, spec, state):
    student = nnx.merge(graphdef, nnx.State(student_params))
    out = student.forward(
        jnp.asarray(batch["input_ids"]),
        positions=jnp.asarray(batch["positions"]),
        segment_ids=jnp.asarray(batch["segment_ids"]),
        compute_logits=False,
    )
    inputs = objective.LossInputs(
        student_hidden=out.hidden,
        student_head=student.head_weights(),
        targets=jnp.asarray(batch["targets"]),
        mask=jnp.asarray(batch["loss_mask"]),
        **teacher_inputs,
    )
    s, c, _ = objective.loss_fn(spec, inputs, {}, state.loss_state, state.step)
    return s / c


def test_only_the_student_moves_and_the_gradient_is_the_loss_gradient():
    student, teacher, spec, tx, graphdef, state = _setup(lr=0.1)
    t_params = teacher.params()
    before = jax.tree.map(np.array, t_params)
    fn = jax.jit(
        step_lib.make_distill_step(student_graphdef=graphdef, teacher=teacher, spec=spec, tx=tx)
    )
    batch = _batch()
    new, metrics = fn(state, t_params, batch)
    _close(t_params, before, 0)  # the teacher is an input, not donated, not updated
    t_inputs = teacher.loss_inputs(t_params, {k: jnp.asarray(v) for k, v in batch.items()})
    loss, grads = jax.value_and_grad(_manual_loss)(
        state.params["student"], graphdef, t_inputs, batch, spec, state
    )
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], optax_norm(grads), rtol=1e-5)
    assert int(new.step) == 1
    assert jax.tree.map(jax.typeof, new) == jax.tree.map(jax.typeof, state)


def optax_norm(tree):
    return float(jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree))))


def test_compiles_once():
    _, teacher, spec, tx, graphdef, state = _setup()
    fn = jax.jit(
        step_lib.make_distill_step(student_graphdef=graphdef, teacher=teacher, spec=spec, tx=tx)
    )
    state, _ = fn(state, teacher.params(), _batch(seed=1))
    state, _ = fn(state, teacher.params(), _batch(seed=2))
    assert fn._cache_size() == 1


def test_remat_equals_no_remat_and_the_state_is_donated():
    _, teacher, spec, tx, graphdef, state = _setup()
    batch, outs = _batch(seed=3), []
    for remat in (False, True):
        step = step_lib.make_distill_step(
            student_graphdef=graphdef, teacher=teacher, spec=spec, tx=tx, remat=remat
        )
        fn = step_lib.jit_step(
            step, state_sharding=None, teacher_sharding=None, batch_sharding=None
        )
        mine = jax.tree.map(jnp.copy, state)
        outs.append(fn(mine, teacher.params(), batch))
        # Donated: the input state's buffers now belong to the output.
        assert all(x.is_deleted() for x in jax.tree.leaves(mine.params))
    (a, ma), (b, mb) = outs
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-6)
    _close(a.params, b.params, 1e-6)


def test_bf16_teacher_runs_in_bf16_and_stays_close_to_float32():
    teacher32 = _model(2, 1)
    config16 = dataclasses.replace(teacher32.config, dtype="bfloat16", param_dtype="bfloat16")
    teacher16 = dj.models.Transformer(config16, rngs=nnx.Rngs(1))
    nnx.update(  # the float32 teacher's weights, rounded to bf16
        teacher16,
        jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(teacher32, nnx.Param)),
    )
    losses = []
    for model in (teacher32, teacher16):
        teacher = teachers.OnlineTeacher(model)
        _, teacher, spec, tx, graphdef, state = _setup(teacher=teacher)
        params = teacher.params()
        want = jnp.bfloat16 if model is teacher16 else jnp.float32
        assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(want)}
        fn = jax.jit(
            step_lib.make_distill_step(student_graphdef=graphdef, teacher=teacher, spec=spec, tx=tx)
        )
        _, metrics = fn(state, params, _batch(seed=4))
        losses.append(float(metrics["loss"]))
    assert losses[0] != losses[1]  # the bf16 teacher really computed in bf16
    np.testing.assert_allclose(losses[1], losses[0], rtol=2e-2)


MESHES = {
    "data8": (("data", 8), ("fsdp", 1), ("tensor", 1), ("expert", 1)),
    "data2_fsdp4": (("data", 2), ("fsdp", 4), ("tensor", 1), ("expert", 1)),
    "fsdp4_tensor2": (("data", 1), ("fsdp", 4), ("tensor", 2), ("expert", 1)),
    "data2_fsdp2_tensor2": (("data", 2), ("fsdp", 2), ("tensor", 2), ("expert", 1)),
}


def _run_on_mesh(mesh_axes, steps=2, micro_batches=1):
    student, teacher, spec, tx, graphdef, state = _setup()
    devices = jax.devices() if mesh_axes else jax.devices()[:1]
    mesh = sharding.make_mesh(mesh_axes or (("data", 1),), devices)
    rules = sharding.DEFAULT_RULES
    st_sh = step_lib.state_shardings(state, mesh, rules, sharding.param_logical_axes(student))
    t_sh = teacher.shardings(mesh, rules)
    b_sh = {k: sharding.batch_sharding(mesh, rules) for k in step_lib.BATCH_FIELDS}
    fn = step_lib.jit_step(
        step_lib.make_distill_step(
            student_graphdef=graphdef,
            teacher=teacher,
            spec=spec,
            tx=tx,
            micro_batches=micro_batches,
        ),
        state_sharding=st_sh,
        teacher_sharding=t_sh,
        batch_sharding=b_sh,
    )
    state = jax.device_put(state, st_sh)
    t_params = jax.device_put(teacher.params(), t_sh)
    losses = []
    with sharding.use_mesh(mesh, rules):
        for i in range(steps):
            batch = jax.device_put(_batch(seed=10 + i), b_sh)
            state, metrics = fn(state, t_params, batch)
            losses.append(float(metrics["loss"]))
    return jax.device_get(state), losses, st_sh


@pytest.mark.parametrize("name", sorted(MESHES))
def test_sharded_step_equals_single_device(name):
    ref_state, ref_losses, _ = _run_on_mesh(None)
    state, losses, shardings = _run_on_mesh(MESHES[name], micro_batches=2)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    _close(state.params, ref_state.params, 2e-5)
    fsdp = dict(MESHES[name])["fsdp"]
    q = shardings.params["student"]["layers"][0]["attn"]["q_proj"]
    assert q.shard_shape((32, 4, 8))[0] == 32 // fsdp  # parameters really are sharded


def test_ema_ensemble_composite_and_cached_teachers():
    batch = _batch(seed=3)
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    a, b, c = _model(2, 5), _model(1, 6), _model(1, 7)
    kinds = {
        "ensemble": teachers.EnsembleTeacher([a, b], [1.0, 3.0]),
        "composite": teachers.CompositeTeacher(a, b, c, alpha=0.5),
    }
    for name, teacher in kinds.items():
        _, teacher, spec, tx, graphdef, state = _setup(teacher)
        fn = jax.jit(
            step_lib.make_distill_step(student_graphdef=graphdef, teacher=teacher, spec=spec, tx=tx)
        )
        _, metrics = fn(state, teacher.params(), batch)
        # The same loss from explicitly combined logits as a one-model teacher.
        za, zb, zc = (
            m(jbatch["input_ids"], positions=jbatch["positions"], segment_ids=jbatch["segment_ids"])
            for m in (a, b, c)
        )
        z = (
            jnp.log(0.25 * jax.nn.softmax(za) + 0.75 * jax.nn.softmax(zb))
            if name == "ensemble"
            else za + 0.5 * (zb - zc)
        )
        student = nnx.merge(graphdef, nnx.State(state.params["student"]))
        zs = student(
            jbatch["input_ids"], positions=jbatch["positions"], segment_ids=jbatch["segment_ids"]
        )
        m = jbatch["loss_mask"]
        want = (
            jnp.sum(
                (
                    4.0 * dj.losses.forward_kl(zs, z, temperature=2.0)
                    + 0.5 * dj.losses.cross_entropy(zs, jbatch["targets"])
                )
                * m
            )
            / m.sum()
        )
        np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5, err_msg=name)

    student, _, spec, tx, graphdef, _ = _setup()
    ema = teachers.EMATeacher(student, decay=0.9)
    _, ema, spec, tx, graphdef, state = _setup(ema)
    fn = jax.jit(
        step_lib.make_distill_step(student_graphdef=graphdef, teacher=ema, spec=spec, tx=tx)
    )
    new, _ = fn(state, None, batch)
    want = jax.tree.map(lambda e, s: 0.9 * e + 0.1 * s, state.ema, new.params["student"])
    _close(new.ema, want, 1e-6)

    # EMA every N = 2 steps (UniSD): unchanged after optimizer step 1, updated after step 2.
    every = teachers.EMATeacher(student, decay=0.9, every_steps=2)
    fn = jax.jit(
        step_lib.make_distill_step(student_graphdef=graphdef, teacher=every, spec=spec, tx=tx)
    )
    one, _ = fn(state, None, batch)
    _close(one.ema, state.ema, 0.0)
    ema_before = jax.tree.map(np.asarray, one.ema)
    two, _ = fn(one, None, batch)
    want = jax.tree.map(lambda e, s: 0.9 * e + 0.1 * s, ema_before, two.params["student"])
    _close(two.ema, want, 1e-6)

    # Cached: the batch carries the teacher's top-k, exactly what an online sparse teacher gives.
    online = teachers.OnlineTeacher(a)
    hidden, head, _ = teachers._forward(online.graphdef, online.params(), jbatch, False)
    sparse = topk.sparse_teacher(hidden @ head, 8, temperature=1.0)

    class _Cache:
        settings = {"temperature": 1.0, "vocab_size": 64}

        def get(self, i, batch):
            return sparse

    cached = teachers.CachedTeacher(_Cache(), vocab_size=64)
    _, cached, spec, tx, graphdef, state = _setup(cached)
    fn = jax.jit(
        step_lib.make_distill_step(student_graphdef=graphdef, teacher=cached, spec=spec, tx=tx)
    )
    _, metrics = fn(state, None, cached.host_batch(batch, 0))
    want = _manual_loss(
        state.params["student"], graphdef, dict(sparse_teacher=sparse), batch, spec, state
    )
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)


def _resized(model, vocab, seed):
    """A copy of ``model`` with ``vocab`` rows: its vocabulary arrays cut, or extended by random
    rows/columns (which a vocab mask must make irrelevant)."""
    v = model.config.vocab_size
    out = dj.models.Transformer(
        dataclasses.replace(model.config, vocab_size=vocab), rngs=nnx.Rngs(seed)
    )
    rng = np.random.default_rng(seed)

    def fit(x):
        x = np.asarray(x)
        for axis, n in enumerate(x.shape):
            if n == v and vocab < v:
                x = np.take(x, np.arange(vocab), axis=axis)
            elif n == v:
                extra = list(x.shape)
                extra[axis] = vocab - v
                x = np.concatenate([x, rng.normal(size=extra).astype(x.dtype)], axis=axis)
        return jnp.asarray(x)

    nnx.update(out, jax.tree.map(fit, nnx.state(model, nnx.Param)))
    return out


@pytest.mark.parametrize("teacher_vocab", [72, 60])
def test_a_teacher_padded_to_another_vocabulary_size_equals_one_of_the_students(teacher_vocab):
    """One tokenizer of 60 ids, a student of 64 rows, a teacher of 72 (cut) or 60 (padded) rows:
    the step equals the step with the same teacher at 64 rows (its extra rows anything), ids
    past the tokenizer's masked (bridges.padded_vocab_mask; METHODS.md 6.8 (a))."""
    from distill_jax.bridges import padded_vocab_mask

    teacher_model = dj.models.Transformer(
        dj.models.make_config("llama", num_layers=1, **dict(ARCH, vocab_size=teacher_vocab)),
        rngs=nnx.Rngs(2),
    )
    same_size = teachers.OnlineTeacher(_resized(teacher_model, 64, 5))
    padded = teachers.PaddedVocabTeacher(teachers.OnlineTeacher(teacher_model), 64)
    assert padded.vocab_size == 64 and padded.kind == "online"
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    batch["input_ids"] = batch["input_ids"] % 60
    batch["targets"] = batch["targets"] % 60
    mask = padded_vocab_mask(60, 64)
    results = []
    for teacher in (padded, same_size):
        _, teacher, spec, tx, graphdef, state = _setup(teacher)
        fn = step_lib.make_distill_step(
            student_graphdef=graphdef, teacher=teacher, spec=spec, tx=tx, vocab_mask=mask
        )
        results.append(jax.jit(fn)(state, teacher.params(), batch))
    (new_a, m_a), (new_b, m_b) = results
    np.testing.assert_allclose(m_a["loss"], m_b["loss"], rtol=1e-5)
    _close(new_a.params, new_b.params, 1e-5)
    with pytest.raises(ValueError, match="only model-backed teachers"):
        teachers.PaddedVocabTeacher(teachers.EMATeacher(_model(1, 3), decay=0.9), 72)
