"""CompositeTeacher: the scalar rule and AlignDistil's token-adaptive alpha_t, each against the
loss on logits combined by hand from the three models (float64 NumPy for alpha_t)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import distill_jax as dj
from distill_jax import teachers
from distill_jax.losses import fused

ARCH = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, head_dim=8
)


def _model(seed):
    return dj.models.Transformer(
        dj.models.make_config("llama", num_layers=1, **ARCH), rngs=nnx.Rngs(seed)
    )


def _np_alpha(zb, zc, scale, max_alpha):
    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    tv = 0.5 * np.abs(softmax(zb) - softmax(zc)).sum(-1)
    return np.minimum(scale / (tv + 1e-6), max_alpha)


@pytest.mark.parametrize("rule", ["constant", "token_adaptive"])
def test_composite_teacher_matches_hand_combined_logits(rule):
    models = [_model(s) for s in (1, 2, 3)]
    rng = np.random.default_rng(0)
    b, t = 2, 8
    batch = dict(
        input_ids=jnp.asarray(rng.integers(0, 64, (b, t)), jnp.int32),
        positions=jnp.tile(jnp.arange(t, dtype=jnp.int32), (b, 1)),
        segment_ids=jnp.ones((b, t), jnp.int32),
    )
    teacher = teachers.CompositeTeacher(
        *models, alpha=0.7, alpha_rule=rule, alpha_scale=0.05, alpha_max=2.0
    )
    inputs = teacher.loss_inputs(teacher.params(), batch)
    hs = jnp.asarray(rng.standard_normal((b, t, 16)), jnp.float32)
    ws = jnp.asarray(rng.standard_normal((16, 64)) * 0.5, jnp.float32)
    total, _, _ = fused.fused_distill_loss(
        hs,
        ws,
        teacher_hidden=inputs["teacher_hidden"],
        teacher_head=inputs["teacher_head"],
        teacher_combine=inputs["teacher_combine"],
        chunk_size=4,
    )
    za, zb, zc = (
        np.asarray(m(batch["input_ids"], positions=batch["positions"]), np.float64) for m in models
    )
    if rule == "constant":
        alpha = np.full((b, t), 0.7)
    else:
        alpha = _np_alpha(zb, zc, 0.05, 2.0)
        assert alpha.min() < 2.0  # the rule is not just the cap here
    z = za + alpha[..., None] * (zb - zc)
    want = jnp.sum(dj.losses.forward_kl(hs @ ws, jnp.asarray(z, jnp.float32)))
    np.testing.assert_allclose(float(total), float(want), rtol=2e-5)


def test_composite_teacher_rejects_unknown_rule_and_bad_knobs():
    models = [_model(s) for s in (1, 2, 3)]
    with pytest.raises(ValueError, match="alpha_rule='per_token'"):
        teachers.CompositeTeacher(*models, alpha_rule="per_token")
    with pytest.raises(ValueError, match="alpha_scale=0"):
        teachers.CompositeTeacher(*models, alpha_rule="token_adaptive", alpha_scale=0)
