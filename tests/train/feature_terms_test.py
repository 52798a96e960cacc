"""The attention-transfer and output-relation terms from a config equal the library functions
applied to what the models compute themselves: attention maps from
``features.attention_probs_from_model`` (checked against transformers' attentions in
tests/models/attention_qkv_test.py) and logits from the models' own forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import distill_jax as dj
from distill_jax import teachers
from distill_jax.losses import features
from distill_jax.train import objective

B, T, V = 2, 12, 40
ARCH = dict(vocab_size=V, hidden_size=32, intermediate_size=64, head_dim=8)


def _models():
    student = dj.models.Transformer(
        dj.models.make_config(
            "gemma3",
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            layer_types=("sliding", "full"),
            sliding_window=5,
            query_pre_attn_scalar=16,
            **ARCH,
        ),
        rngs=nnx.Rngs(0),
    )
    teacher = dj.models.Transformer(
        dj.models.make_config("llama", num_layers=3, num_heads=2, num_kv_heads=1, **ARCH),
        rngs=nnx.Rngs(1),
    )
    return student, teacher


def _batch():
    rng = np.random.default_rng(0)
    seg = np.ones((B, T), np.int32)
    seg[1, 7:] = 2  # two packed documents in the second row
    pos = np.where(seg == 1, np.arange(T), np.arange(T) - 7).astype(np.int32)
    return dict(
        input_ids=jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32),
        positions=jnp.asarray(pos),
        segment_ids=jnp.asarray(seg),
        mask=jnp.asarray(rng.random((B, T)) > 0.2),
    )


def _inputs(student, teacher, batch, qkv):
    out = student.forward(
        batch["input_ids"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        compute_logits=False,
        output_attention_qkv=qkv,
    )
    t = teachers.OnlineTeacher(teacher, qkv=qkv)
    return objective.LossInputs(
        student_hidden=out.hidden,
        student_head=student.head_weights(),
        targets=jnp.zeros((B, T), jnp.int32),
        mask=batch["mask"],
        student_qkv=out.attention_qkv,
        student_attention=student.config.attention_layers() if qkv else None,
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        student_softcap=student.config.final_logit_softcapping,
        **t.loss_inputs(t.params(), batch),
    )


def _term(losses, inputs):
    spec = objective.LossSpec.from_config(losses)
    sums, counts, metrics = objective.loss_groups(spec, inputs, {}, {}, 0)
    return sums["tokens"], counts["tokens"]


@pytest.mark.parametrize("layers,l1", [((0, 2), False), ((1, 0), True), ((-1, -1), False)])
def test_attention_transfer_term_equals_the_models_own_attention_maps(layers, l1):
    student, teacher = _models()
    batch = _batch()
    inputs = _inputs(student, teacher, batch, qkv=True)
    ls, lt = layers
    s_probs = features.attention_probs_from_model(
        student, inputs.student_qkv, batch["positions"], batch["segment_ids"]
    )[ls]
    t_probs = features.attention_probs_from_model(
        teacher, inputs.teacher_qkv, batch["positions"], batch["segment_ids"]
    )[lt]
    window = student.config.sliding_window if student.config.is_sliding(ls % 2) else None
    want = features.attention_transfer_mse(
        s_probs,
        t_probs,
        batch["mask"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        sliding_window=window,
        l1_normalize=l1,
    )
    got, count = _term(
        dict(attention_transfer=dict(student_layer=ls, teacher_layer=lt, l1_normalize=l1)), inputs
    )
    np.testing.assert_allclose(float(got), float(jnp.sum(want)), rtol=1e-5)
    assert float(count) == float(batch["mask"].sum()) and float(got) > 0


def test_output_relation_term_equals_the_kl_of_the_models_logits():
    student, teacher = _models()
    batch = _batch()
    inputs = _inputs(student, teacher, batch, qkv=False)
    where = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
    z_s = student.forward(batch["input_ids"], **where).logits
    z_t = teacher.forward(batch["input_ids"], **where).logits
    want = features.output_relation_kl(
        z_s, z_t, batch["mask"], temperature=2.0, similarity_temperature=0.2
    )
    got, _ = _term(dict(output_relation=dict(temperature=2.0, similarity_temperature=0.2)), inputs)
    np.testing.assert_allclose(float(got), float(jnp.sum(want)), rtol=1e-5)
    # The student against itself: zero (the relation rows are identical).
    same = inputs.replace(teacher_hidden=inputs.student_hidden, teacher_head=inputs.student_head)
    zero, _ = _term(dict(output_relation=dict()), same)
    assert abs(float(zero)) < 1e-6
    grad = jax.grad(
        lambda h: _term(dict(output_relation=dict()), inputs.replace(student_hidden=h))[0]
    )(inputs.student_hidden)
    assert np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad).sum()) > 0


def test_a_teacher_without_dense_outputs_is_refused_before_loading():
    from distill_jax.train import terms

    with pytest.raises(ValueError, match="'output_relation'.*cannot supply one model's final"):
        terms.check_needs(
            [terms.parse_term("output_relation", {})],
            terms.parse_options({})[1],
            terms.parse_teacher({"kind": "cached", "cache_dir": "/x"}),
            {},
            {},
        )
