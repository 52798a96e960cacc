"""TSD-KD from a config (METHODS.md 2.4): the entropy penalty and the early-position ListMLE,
each over its own mask and count, beside the confidence-weighted JSD; against a NumPy float64
reference written from the paper's formulas, finite differences, and through the trainer."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from trainer_runs import tiny

from distill_jax import experiment, teachers
from distill_jax.train import objective

B, T, D, V = 2, 11, 8, 23


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    return objective.LossInputs(
        student_hidden=f(B, T, D),
        student_head=f(D, V),
        teacher_hidden=f(B, T, D),
        teacher_head=f(D, V),
        targets=jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32),
        mask=jnp.asarray(rng.random((B, T)) > 0.2),
    )


def _groups(losses, x, options=None):
    spec = objective.LossSpec.from_config(losses, dict(head_chunk_tokens=4, **(options or {})))
    fn = jax.jit(lambda x: objective.loss_groups(spec, x, {}, {}, 0))
    return spec, *fn(x)


# ------------------------------------------------------------------- NumPy float64 reference


def _np(x):
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    zs = f(x.student_hidden) @ f(x.student_head)
    zt = f(x.teacher_hidden) @ f(x.teacher_head)
    return zs, zt, np.asarray(x.mask, bool)


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _entropy(z, tau=1.0):
    logq = _log_softmax(z / tau)
    return -(np.exp(logq) * logq).sum(-1)


def _penalty_mask(h, valid, q):
    """Valid tokens at or above NumPy's linear q-quantile of the valid entropies."""
    return valid & (h >= np.quantile(h[valid], q))


def _early_mask(h, valid, threshold):
    """Per row: valid positions before the cumulative normalised entropy reaches threshold."""
    h = np.where(valid, h, 0.0)
    total = h.sum(-1, keepdims=True)
    share = np.cumsum(h / np.where(total > 0, total, 1.0), -1)
    return valid & (share < threshold) & (total > 0)


def _listmle(zs, zt, k, tau=1.0):
    """-sum_k [s_(k) - logsumexp_{j >= k} s_(j)], the student's top k in the teacher's order."""
    out = np.zeros(zs.shape[:-1])
    for idx in np.ndindex(*zs.shape[:-1]):
        s, t = zs[idx] / tau, zt[idx]
        top = np.argsort(-s, kind="stable")[:k]
        ranked = s[top[np.argsort(-t[top], kind="stable")]]
        out[idx] = sum(np.logaddexp.reduce(ranked[i:]) - ranked[i] for i in range(len(ranked)))
    return out


def _jsd(zs, zt, beta):
    logq, logp = _log_softmax(zs), _log_softmax(zt)
    q, p = np.exp(logq), np.exp(logp)
    logm = np.log(beta * p + (1 - beta) * q)
    return beta * (p * (logp - logm)).sum(-1) + (1 - beta) * (q * (logq - logm)).sum(-1)


# ---------------------------------------------------------------------------------- the loss


def test_tsd_kd_recipe_equals_the_numpy_reference_group_by_group():
    """selection tsd + jsd(beta=0.9) + tsd_entropy_penalty + listmle(entropy_threshold): three
    normaliser groups, each its sum over its own tokens and its own count."""
    losses = dict(
        jsd=dict(beta=0.9),
        tsd_entropy_penalty=dict(weight=0.7, temperature=1.5, quantile=0.1),
        listmle=dict(weight=0.1, k=5, entropy_threshold=0.5),
    )
    x = _inputs(1)
    spec, sums, counts, metrics = _groups(losses, x, dict(selection=dict(kind="tsd")))
    assert spec.groups() == ("tokens", "tsd_entropy_penalty", "listmle")
    zs, zt, valid = _np(x)
    # Direct term: confidence weights sigmoid(H(q) - H(p)) on the JSD (a weighted mean).
    w = np.where(valid, 1 / (1 + np.exp(-(_entropy(zs) - _entropy(zt)))), 0.0)
    np.testing.assert_allclose(sums["tokens"], (w * _jsd(zs, zt, 0.9)).sum(), rtol=1e-5)
    np.testing.assert_allclose(counts["tokens"], w.sum(), rtol=1e-5)
    # Entropy penalty: H(q_tau) at tau = 1.5 over the tokens at or above its 0.1 quantile.
    h = _entropy(zs, 1.5)
    keep = _penalty_mask(h, valid, 0.1)
    assert 0 < keep.sum() < valid.sum()
    np.testing.assert_allclose(sums["tsd_entropy_penalty"], 0.7 * h[keep].sum(), rtol=1e-5)
    assert float(counts["tsd_entropy_penalty"]) == keep.sum()
    np.testing.assert_allclose(metrics["loss/tsd_entropy_penalty"][0], h[keep].sum(), rtol=1e-5)
    assert [float(v) for v in metrics["mask/tsd_entropy_penalty"]] == [keep.sum(), valid.sum()]
    # ListMLE at the early positions only (tau = 1 entropies), unweighted by the selection.
    early = _early_mask(_entropy(zs), valid, 0.5)
    assert 0 < early.sum() < valid.sum()
    want = _listmle(zs, zt, 5)[early].sum()
    np.testing.assert_allclose(sums["listmle"], 0.1 * want, rtol=1e-5)
    assert float(counts["listmle"]) == early.sum()


def test_quantile_zero_penalises_every_valid_token_and_listmle_without_threshold_is_main():
    """The masks' edges: quantile 0 keeps every valid token (the mean entropy), and listmle
    without entropy_threshold stays in the main pass with every other token-level term."""
    x = _inputs(2)
    zs, zt, valid = _np(x)
    _, sums, counts, _ = _groups(dict(tsd_entropy_penalty=dict(quantile=0.0)), x)
    np.testing.assert_allclose(
        sums["tsd_entropy_penalty"] / counts["tsd_entropy_penalty"],
        _entropy(zs)[valid].mean(),
        rtol=1e-5,
    )
    spec, sums, counts, _ = _groups(dict(listmle=dict(k=4), ce=dict(weight=0.0)), x)
    assert spec.groups() == ("tokens",) and spec.masked_labels() == ()
    np.testing.assert_allclose(sums["tokens"], _listmle(zs, zt, 4)[valid].sum(), rtol=1e-5)
    assert float(counts["tokens"]) == valid.sum()


def test_a_weight_zero_masked_term_is_a_metric_only():
    x = _inputs(3)
    spec, sums, _, metrics = _groups(
        dict(forward_kl=dict(), tsd_entropy_penalty=dict(weight=0.0)), x
    )
    assert spec.groups() == ("tokens",) and set(sums) == {"tokens"}
    zs, _, valid = _np(x)
    h = _entropy(zs)
    np.testing.assert_allclose(
        metrics["loss/tsd_entropy_penalty"][0], h[_penalty_mask(h, valid, 0.1)].sum(), rtol=1e-5
    )


def _mean_of_group(label, losses, x, head):
    spec = objective.LossSpec.from_config(losses, dict(head_chunk_tokens=4))
    sums, counts, _ = objective.loss_groups(spec, x.replace(student_head=head), {}, {}, 0)
    return sums[label] / counts[label]


@pytest.mark.parametrize(
    "label,knobs",
    [
        ("tsd_entropy_penalty", dict(temperature=2.0, quantile=0.3)),
        ("listmle", dict(k=6, entropy_threshold=0.6)),
    ],
)
def test_gradient_flows_through_the_values_with_the_mask_held_constant(label, knobs):
    """d/dW_s of the group mean along a random direction equals a float64 central difference
    of the reference with the mask held fixed: the mask carries no gradient."""
    x = _inputs(4)
    losses = {label: knobs}
    grad = jax.jit(jax.grad(lambda w: _mean_of_group(label, losses, x, w)))(x.student_head)
    direction = np.random.default_rng(7).standard_normal((D, V))
    zs, zt, valid = _np(x)
    h_s = np.asarray(x.student_hidden, np.float64)
    if label == "tsd_entropy_penalty":
        keep = _penalty_mask(_entropy(zs, 2.0), valid, 0.3)
        value = lambda w: _entropy(h_s @ w, 2.0)[keep].mean()  # noqa: E731
    else:
        keep = _early_mask(_entropy(zs), valid, 0.6)
        value = lambda w: _listmle(h_s @ w, zt, 6)[keep].mean()  # noqa: E731
    w0, eps = np.asarray(x.student_head, np.float64), 1e-6
    fd = (value(w0 + eps * direction) - value(w0 - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(np.sum(np.asarray(grad) * direction), fd, rtol=2e-3)


def test_bad_knobs_name_the_term_and_the_range():
    with pytest.raises(ValueError, match=r"'tsd_entropy_penalty'.quantile=1.5: .*\[0.0, 1.0\]"):
        objective.LossSpec.from_config(dict(tsd_entropy_penalty=dict(quantile=1.5)))
    with pytest.raises(ValueError, match=r"'listmle'.entropy_threshold=-0.1: .*\[0.0, 1.0\]"):
        objective.LossSpec.from_config(dict(listmle=dict(entropy_threshold=-0.1)))


# ------------------------------------------------------------------------------ the trainer


def test_tsd_kd_config_trains_through_the_trainer(tmp_path):
    """Three optimizer steps of the TSD-KD recipe on the tiny config: finite losses, each
    masked term logged with its own token share, and the student's parameters move."""
    c = tiny(steps=3)
    c.losses = dict(
        jsd=dict(beta=0.9),
        tsd_entropy_penalty=dict(weight=1.0, quantile=0.1),
        listmle=dict(weight=0.1, k=10, entropy_threshold=0.5),
    )
    c.loss_options.selection = dict(kind="tsd")
    c.train.checkpoint_every_steps = 3
    c.optimizer.warmup_steps = 0
    experiment.train(c, str(tmp_path))
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if "train/loss" in r]
    assert len(rows) == 3
    for key in ("loss", "loss/jsd", "loss/tsd_entropy_penalty", "loss/listmle"):
        assert all(np.isfinite(r[f"train/{key}"]) for r in rows), key
    assert all(r["train/mask/tsd_entropy_penalty"] == pytest.approx(0.9, abs=0.02) for r in rows)
    assert all(0 < r["train/mask/listmle"] < 1 for r in rows)
    manager = ocp.CheckpointManager(os.path.join(tmp_path, "checkpoints"))
    saved = manager.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    _, initial = teachers.split_model(experiment.build_model(c.student, "student", 0))
    after, before = jax.tree.leaves(saved["params"]["student"]), jax.tree.leaves(initial)
    assert len(after) == len(before)
    assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(after, before))
