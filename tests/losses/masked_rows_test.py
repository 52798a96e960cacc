"""A fully masked row may hold anything: -inf, +inf or NaN logits on either side give finite
values and finite gradients for every divergence and every logit term, on the plain per-token
functions, the sparse (top-k) teacher and the fused head+loss, and the unmasked rows' values and
gradients are exactly those of the same batch with ordinary numbers in the masked row."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.losses import divergences as dv
from distill_jax.losses import fused, preference, tokens, topk

B, T, V, D, DT = 3, 4, 9, 8, 6
MASK = np.ones((B, T), bool)
MASK[1] = False  # the fully masked row
MASK[2, 3] = False  # and one masked position of another row
KNOBS = {  # every divergence (dv.DIVERGENCES: the cores, sinkhorn and multilevel_ot)
    "forward_kl": {},
    "reverse_kl": {},
    "jsd": {"beta": 0.3},
    "skew_kl": {"alpha": 0.1},
    "skew_reverse_kl": {"alpha": 0.1},
    "tvd": {},
    "hellinger": {},
    "ab": {"alpha": 0.5, "beta": 0.3},
    "akl": {"mu": 0.5},
    "todi": {},
    "taid": {"t": 0.6},
    "sinkhorn": {"epsilon": 0.1, "num_iters": 10},
    "multilevel_ot": {"top_k": 5, "epsilon": 0.1, "num_iters": 10},
}
assert set(KNOBS) == set(dv.DIVERGENCES)
# What goes into the masked positions: one entry -inf or +inf, every entry -inf, NaN.
POISONS = {
    "one -inf": lambda x: x.at[1, :, 0].set(-jnp.inf).at[2, 3, 0].set(-jnp.inf),
    "one +inf": lambda x: x.at[1, :, 0].set(jnp.inf).at[2, 3, 0].set(jnp.inf),
    "all -inf": lambda x: x.at[1].set(-jnp.inf).at[2, 3].set(-jnp.inf),
    "nan": lambda x: x.at[1, 2].set(jnp.nan).at[2, 3].set(jnp.nan),
}


def _logits(seed: int, shape=(B, T, V)) -> jax.Array:
    return jnp.asarray(2.0 * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _check(fn, side: str, poison: str):
    """``fn(student, teacher)`` -> [B, T] with the masked positions poisoned on ``side``:
    finite, zero there, and equal to the clean run on the unmasked positions (values and
    gradients with respect to the student's logits)."""
    s, t = _logits(0), _logits(1)
    bad_s, bad_t = (POISONS[poison](s), t) if side == "student" else (s, POISONS[poison](t))
    grad_fn = jax.jit(jax.grad(lambda x, y: jnp.sum(fn(x, y))))
    values, grad = jax.jit(fn)(bad_s, bad_t), grad_fn(bad_s, bad_t)
    assert np.all(np.isfinite(values)), values
    assert np.all(np.isfinite(grad)), grad
    assert np.all(np.asarray(values)[~MASK] == 0) and np.all(np.asarray(grad)[~MASK] == 0)
    clean_values, clean_grad = jax.jit(fn)(s, t), grad_fn(s, t)
    np.testing.assert_array_equal(np.asarray(values)[MASK], np.asarray(clean_values)[MASK])
    np.testing.assert_array_equal(np.asarray(grad)[MASK], np.asarray(clean_grad)[MASK])


@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("name", sorted(KNOBS))
def test_every_divergence_is_finite_on_a_poisoned_masked_row(name, side):
    for poison in POISONS:
        _check(
            lambda s, t: dv.divergence(name, s, t, MASK, temperature=2.0, **KNOBS[name]),
            side,
            poison,
        )


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_other_logit_terms_are_finite_on_a_poisoned_masked_row(side):
    targets = jnp.asarray(np.random.default_rng(2).integers(0, V, (B, T)), jnp.int32)
    tau = jnp.where(jnp.asarray(MASK), 2.0, 0.0)  # padding may carry a per-token tau of 0
    terms = {
        "ce": lambda s, t: tokens.cross_entropy(s, targets, MASK),
        "student_entropy": lambda s, t: tokens.entropy(s, MASK, temperature=tau),
        "teacher_entropy": lambda s, t: (
            tokens.entropy(t, MASK, temperature=tau) + 0.0 * tokens.entropy(s, MASK)
        ),
        "listmle": lambda s, t: preference.listmle(s, t, MASK, k=4),
        "per-token tau": lambda s, t: dv.reverse_kl(s, t, MASK, temperature=tau),
    }
    for fn in terms.values():
        for poison in POISONS:
            _check(fn, side, poison)


@pytest.mark.parametrize("semantics", topk.SEMANTICS)
@pytest.mark.parametrize("name", sorted(dv.CORES))
def test_sparse_teacher_is_finite_on_a_poisoned_masked_row(name, semantics):
    """A top-k teacher whose stored masked positions are -inf / NaN (a padded cache position),
    against a student whose masked row holds +-inf or NaN logits."""
    if semantics == "renorm_teacher" and name != "forward_kl":
        pytest.skip("renorm_teacher is defined for forward_kl only")
    sparse = topk.sparse_teacher(_logits(1), 4)
    bad = sparse.replace(
        logprobs=sparse.logprobs.at[1].set(-jnp.inf).at[2, 3, 0].set(jnp.nan),
        log_tail=sparse.log_tail.at[1].set(jnp.nan),
    )

    def fn(s, teacher):
        return topk.topk_divergence(name, s, teacher, MASK, semantics=semantics, **KNOBS[name])

    for poison in POISONS:
        _check(lambda s, t: fn(s, bad), "student", poison)
    clean, poisoned = fn(_logits(0), sparse), fn(_logits(0), bad)
    np.testing.assert_array_equal(np.asarray(poisoned)[MASK], np.asarray(clean)[MASK])


def _fused_inputs(seed=3):
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    return f(B, T, D), f(D, V), f(B, T, DT), f(DT, V), targets


FUSED_KNOBS = {**KNOBS, "ce": {}, "student_entropy": {}, "teacher_entropy": {}, "listmle": {}}
assert set(FUSED_KNOBS) == set(dv.CORES) | set(fused.EXTRA_KINDS)


@pytest.mark.parametrize("implementation", fused.IMPLEMENTATIONS)
@pytest.mark.parametrize("name", sorted(FUSED_KNOBS))
def test_fused_loss_is_finite_on_a_poisoned_masked_row(name, implementation):
    """Hidden states of the masked positions set to +-inf or NaN (so their logits are +-inf or
    NaN) on either side: the fused loss and its gradients with respect to the student's hidden
    states and head are finite and equal those of the clean batch."""
    hs, ws, ht, wt, targets = _fused_inputs()
    terms = {"ce": {}} if name == "ce" else {name: dict(FUSED_KNOBS[name], temperature=2.0)}

    def loss(h_s, w_s, h_t):
        total, count, _ = fused.fused_distill_loss(
            h_s,
            w_s,
            teacher_hidden=h_t,
            teacher_head=wt,
            mask=jnp.asarray(MASK),
            targets=targets,
            terms=terms,
            chunk_size=2,
            vocab_block=4,
            implementation=implementation,
        )
        return total / count

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    clean_value, (clean_dh, clean_dw) = grad(hs, ws, ht)
    for poison in ("one -inf", "one +inf", "nan"):
        for side in ("student", "teacher"):
            bad_s = POISONS[poison](hs) if side == "student" else hs
            bad_t = POISONS[poison](ht) if side == "teacher" else ht
            value, (dh, dw) = grad(bad_s, ws, bad_t)
            assert np.isfinite(value) and np.all(np.isfinite(dh)) and np.all(np.isfinite(dw))
            np.testing.assert_allclose(value, clean_value, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(dh, clean_dh, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(dw, clean_dw, rtol=1e-5, atol=1e-7)
            assert np.all(np.asarray(dh)[~MASK] == 0)


@pytest.mark.parametrize("semantics", topk.SEMANTICS)
def test_fused_sparse_teacher_is_finite_on_a_poisoned_masked_row(semantics):
    hs, ws, ht, wt, _ = _fused_inputs()
    sparse = topk.sparse_teacher(ht @ wt, 4)
    bad = sparse.replace(
        logprobs=sparse.logprobs.at[1].set(-jnp.inf), log_tail=sparse.log_tail.at[1].set(jnp.nan)
    )

    def loss(h_s, teacher):
        total, count, _ = fused.fused_distill_loss(
            h_s,
            ws,
            sparse_teacher=teacher,
            mask=jnp.asarray(MASK),
            terms={"forward_kl": {"temperature": 2.0}},
            semantics=semantics,
            chunk_size=2,
        )
        return total / count

    grad = jax.jit(jax.value_and_grad(loss))
    clean_value, clean_dh = grad(hs, sparse)
    value, dh = grad(POISONS["one +inf"](hs), bad)
    assert np.isfinite(value) and np.all(np.isfinite(dh))
    np.testing.assert_allclose(value, clean_value, rtol=1e-6)
    np.testing.assert_allclose(dh, clean_dh, rtol=1e-6, atol=1e-7)
