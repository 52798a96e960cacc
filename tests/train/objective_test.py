"""objective: a config spec becomes the loss a user would write by hand (alpha, tau^2, schedules,
TAID, selection, features), exact accumulation, state round trip, clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from flax import serialization

from distill_jax.losses import divergences, features, selection
from distill_jax.losses.tokens import cross_entropy
from distill_jax.train import objective

B, T, D, V = 2, 9, 8, 23


def _inputs(seed=0, **extra):
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    mask = jnp.asarray(rng.random((B, T)) > 0.2)
    targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    return objective.LossInputs(
        student_hidden=f(B, T, D),
        student_head=f(D, V) * 0.7,
        teacher_hidden=f(B, T, D),
        teacher_head=f(D, V) * 0.7,
        targets=targets,
        mask=mask,
        **extra,
    )


def _run(losses, options=None, inputs=None, step=0, state=None, params=None):
    spec = objective.LossSpec.from_config(losses, dict(head_chunk_tokens=4, **(options or {})))
    inputs = inputs or _inputs()
    state = objective.init_state(spec) if state is None else state
    total, count, metrics = jax.jit(lambda x, p, s, k: objective.loss_fn(spec, x, p, s, k))(
        inputs, params or {}, state, step
    )
    return spec, inputs, total, count, metrics


def _logits(x):
    return x.student_hidden @ x.student_head, x.teacher_hidden @ x.teacher_head


def test_hinton_kd_with_alpha_and_tau_squared():
    c = mlc.ConfigDict()
    c.losses = dict(
        forward_kl=dict(temperature=2.0), ce=dict(), kl_t1=dict(divergence="forward_kl", weight=0.0)
    )
    c.loss_options = dict(alpha=0.7)
    _, x, total, count, metrics = _run(c.losses, c.loss_options)
    zs, zt = _logits(x)
    m = x.mask
    want = jnp.sum(
        (
            0.7 * 4.0 * divergences.forward_kl(zs, zt, temperature=2.0)
            + 0.3 * cross_entropy(zs, x.targets)
        )
        * m
    )
    np.testing.assert_allclose(total, want, rtol=1e-5)
    assert float(count) == float(m.sum())
    # Metrics are unweighted and without tau^2; the weight-0 term is a metric only.
    np.testing.assert_allclose(
        metrics["loss/kl_t1"][0], jnp.sum(divergences.forward_kl(zs, zt) * m), rtol=1e-5
    )
    np.testing.assert_allclose(
        metrics["loss/forward_kl"][0],
        jnp.sum(divergences.forward_kl(zs, zt, temperature=2.0) * m),
        rtol=1e-5,
    )
    assert set(metrics) >= {"loss/ce", "agreement"}


def test_schedules_by_hand():
    lin = dict(schedule="linear", start=0.9, end=0.5, steps=100, warmup_steps=10)
    cos = dict(schedule="cosine", start=4.0, end=1.0, steps=50)
    assert objective.schedule_value(0.3, 5) == 0.3
    np.testing.assert_allclose(objective.schedule_value(lin, 0), 0.9)
    np.testing.assert_allclose(objective.schedule_value(lin, 60), 0.7, rtol=1e-6)
    np.testing.assert_allclose(objective.schedule_value(lin, 500), 0.5, rtol=1e-6)
    np.testing.assert_allclose(objective.schedule_value(cos, 25), 2.5, rtol=1e-6)
    np.testing.assert_allclose(objective.schedule_value(cos, 50), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="Unknown schedule 'exp'"):
        objective.schedule_value(dict(schedule="exp", start=1.0), 0)


def test_scheduled_temperature_beta_and_alpha():
    losses = dict(
        jsd=dict(
            beta=dict(schedule="linear", start=0.0, end=1.0, steps=10),
            temperature=dict(schedule="linear", start=1.0, end=3.0, steps=10),
        ),
        ce=dict(),
    )
    options = dict(alpha=dict(schedule="cosine", start=0.9, end=0.5, steps=10))
    _, x, total, _, _ = _run(losses, options, step=5)
    zs, zt = _logits(x)
    alpha = 0.5 + 0.4 * 0.5 * (1 + np.cos(np.pi * 0.5))
    per = alpha * 4.0 * divergences.jsd(zs, zt, beta=0.5, temperature=2.0) + (
        1 - alpha
    ) * cross_entropy(zs, x.targets)
    np.testing.assert_allclose(total, jnp.sum(per * x.mask), rtol=1e-5)


def test_micro_batches_with_global_normalisation_equal_one_batch():
    losses = dict(reverse_kl=dict(temperature=1.5), ce=dict(weight=0.2))
    x = _inputs(1)
    x = x.replace(mask=x.mask.at[0, 4:].set(False))
    half = lambda sl: jax.tree.map(lambda a: a[sl] if a.ndim == 3 or a.shape == (B, T) else a, x)
    _, _, s1, c1, _ = _run(losses, inputs=half(slice(0, 1)))
    _, _, s2, c2, _ = _run(losses, inputs=half(slice(1, 2)))
    _, _, s, c, _ = _run(losses, inputs=x)
    np.testing.assert_allclose(
        objective.normalize(s1 + s2, c1 + c2), objective.normalize(s, c), rtol=1e-5
    )


def test_taid_uses_and_advances_its_state():
    losses = dict(taid=dict(t_start=0.4, step_size=0.05))
    spec, x, total, _, metrics = _run(losses, dict(total_steps=100))
    zs, zt = _logits(x)
    np.testing.assert_allclose(total, jnp.sum(divergences.taid(zs, zt, t=0.4) * x.mask), rtol=1e-5)
    state = objective.init_state(spec)
    for step in range(1, 4):
        state = objective.update_state(spec, state, metrics, step)
    assert 0.4 < float(state["taid"].t) <= 1.0
    _, _, total2, _, _ = _run(losses, dict(total_steps=100), state=state)
    t = state["taid"].t
    np.testing.assert_allclose(total2, jnp.sum(divergences.taid(zs, zt, t=t) * x.mask), rtol=1e-5)


def test_adakd_selection_and_idts_temperatures():
    sel = dict(kind="adakd", kappa=0.6, initial_ratio=0.5)
    losses = dict(forward_kl=dict(temperature=2.0))
    spec, x, total, count, metrics = _run(losses, dict(selection=sel))
    zs, zt = _logits(x)
    score = divergences.hellinger(zs, zt, x.mask)
    keep = selection.adakd_token_mask(score, x.mask, 0.5)
    tau = selection.idts_temperatures(score, keep, base_temperature=2.0, kappa=0.6)
    want = jnp.sum(tau**2 * divergences.forward_kl(zs, zt, temperature=tau) * keep * x.mask)
    np.testing.assert_allclose(total, want, rtol=1e-5)
    assert float(count) == float(jnp.sum(keep & x.mask)) == np.ceil(0.5 * float(x.mask.sum()))
    # The controller state survives a checkpoint-like round trip and keeps evolving identically.
    state = objective.update_state(spec, objective.init_state(spec), metrics, 1)
    restored = serialization.from_bytes(objective.init_state(spec), serialization.to_bytes(state))
    a = objective.update_state(spec, state, metrics, 2)
    b = objective.update_state(spec, restored, metrics, 2)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_quantile_clipping_of_one_term():
    losses = dict(forward_kl=dict(), ce=dict(weight=0.5))
    x = _inputs(3)
    _, _, full, _, _ = _run(losses, inputs=x)
    _, _, same, _, _ = _run(losses, dict(selection=dict(kind="clip", quantile=1.0)), inputs=x)
    np.testing.assert_allclose(same, full, rtol=1e-6)
    _, _, clipped, _, metrics = _run(
        losses, dict(selection=dict(kind="clip", quantile=0.5)), inputs=x
    )
    zs, zt = _logits(x)
    fkl = divergences.forward_kl(zs, zt)
    cap = float(selection.masked_quantile(fkl, x.mask, 0.5))
    want = jnp.sum((jnp.minimum(fkl, cap) + 0.5 * cross_entropy(zs, x.targets)) * x.mask)
    np.testing.assert_allclose(clipped, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["selection/clip"][0], cap, rtol=1e-6)


def test_rho1_against_a_reference_model():
    x = _inputs(4)
    rng = np.random.default_rng(9)
    ref_head = x.student_head + 0.3 * jnp.asarray(rng.standard_normal((D, V)), jnp.float32)
    x = x.replace(reference_hidden=x.student_hidden, reference_head=ref_head)
    losses = dict(forward_kl=dict())
    _, _, total, count, _ = _run(
        losses, dict(selection=dict(kind="rho1", keep_ratio=0.5)), inputs=x
    )
    zs, zt = _logits(x)
    keep = selection.rho1_token_mask(
        cross_entropy(zs, x.targets, x.mask),
        cross_entropy(x.student_hidden @ ref_head, x.targets, x.mask),
        x.mask,
        0.5,
    )
    np.testing.assert_allclose(
        total, jnp.sum(divergences.forward_kl(zs, zt) * keep * x.mask), rtol=1e-5
    )
    assert float(count) == float(jnp.sum(keep & x.mask))


def test_feature_terms_with_projectors_and_layer_map():
    rng = np.random.default_rng(5)
    hs = tuple(
        jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32) for _ in range(5)
    )  # L_s = 4
    ht = tuple(
        jnp.asarray(rng.standard_normal((B, T, 6)), jnp.float32) for _ in range(9)
    )  # L_t = 8
    x = _inputs(6, student_hidden_states=hs, teacher_hidden_states=ht)
    losses = dict(hidden_cosine=dict(weight=0.3, layers="uniform", projector="xavier"), ce=dict())
    spec = objective.LossSpec.from_config(losses, dict(head_chunk_tokens=4))
    params = objective.init_params(spec, jax.random.key(0), D, 6, num_layers=(4, 8))
    assert len(params["hidden_cosine"]) == 4
    _, _, total, _, metrics = _run(losses, inputs=x, params=params)
    pairs = features.layer_map(4, 8)
    feat = features.layerwise_hidden_loss(
        features.hidden_cosine, hs, ht, x.mask, pairs, projectors=params["hidden_cosine"]
    )
    zs, _ = _logits(x)
    want = jnp.sum(cross_entropy(zs, x.targets) * x.mask) + 0.3 * jnp.sum(feat * x.mask)
    np.testing.assert_allclose(total, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss/hidden_cosine"][0], jnp.sum(feat * x.mask), rtol=1e-5)
    # Gradients reach the projectors (they are trained with the student).
    grads = jax.grad(lambda p: objective.loss_fn(spec, x, p, {}, 0)[0])(params)
    assert all(float(jnp.abs(g["kernel"]).sum()) > 0 for g in grads["hidden_cosine"])


def test_bad_specs_are_clear_errors():
    with pytest.raises(ValueError, match="unknown kind 'fkl'"):
        objective.LossSpec.from_config(dict(fkl=dict()))
    with pytest.raises(ValueError, match="total_steps"):
        objective.LossSpec.from_config(dict(taid=dict()))
    with pytest.raises(ValueError, match="selection.kind='adakdd'"):
        objective.LossSpec.from_config(dict(forward_kl=dict()), dict(selection=dict(kind="adakdd")))
    with pytest.raises(ValueError, match="no terms"):
        objective.LossSpec.from_config(dict())
    spec = objective.LossSpec.from_config(
        dict(forward_kl=dict()), dict(selection=dict(kind="rho1"))
    )
    with pytest.raises(ValueError, match="needs reference_hidden"):
        objective.loss_fn(spec, _inputs(), {}, {}, 0)
