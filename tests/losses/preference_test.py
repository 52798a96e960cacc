"""Sequence and ranking objectives against float64 NumPy formulas written here, hand-computed
values (DPO log 2, ListMLE on three tokens) and properties: the REDI gradient identities, DPO
margin antisymmetry, ListMLE shift invariance and its zero, DistiLLM-2 term weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.losses import preference as pf

# ------------------------------------------------------------------- float64 NumPy references


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_logsumexp(x):
    m = max(x)
    return m + np.log(sum(np.exp(v - m) for v in x))


def np_listmle(s, t, mask, k, prefix=False, tau=1.0):
    """Loops over positions: student top-k ids, teacher order, suffix (or prefix) Plackett-Luce
    NLL of the student logits / tau."""
    s, t = np.asarray(s, np.float64) / tau, np.asarray(t, np.float64)
    out = np.zeros(s.shape[:-1])
    for idx in np.ndindex(*s.shape[:-1]):
        if not mask[idx]:
            continue
        ids = np.argsort(-s[idx], kind="stable")[:k]
        ids = sorted(ids, key=lambda i: -t[idx][i])  # sorted() is stable
        ranked = [s[idx][i] for i in ids]
        n = len(ranked)
        parts = [ranked[: j + 1] if prefix else ranked[j:] for j in range(n)]
        out[idx] = sum(np_logsumexp(parts[j]) - ranked[j] for j in range(n))
    return out


def np_skew_kl(p, q, a):
    m = a * p + (1 - a) * q
    return (p * np.log(p / m)).sum(-1)


def np_softmax(z):
    return np.exp(np_log_softmax(z))


def _rand(seed, *shape, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


MASK = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)

# ------------------------------------------------------------------------------ log-probs


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_token_and_sequence_logprobs_match_numpy(dtype):
    logits = _rand(0, 2, 4, 11, scale=3.0)
    targets = np.random.default_rng(1).integers(0, 11, (2, 4))
    targets[0, 3] = 999  # a masked position may hold any id
    lp = jax.jit(pf.token_logprobs)(jnp.asarray(logits, dtype), targets, MASK)
    assert lp.dtype == jnp.float32 and lp.shape == (2, 4)
    ref_logits = np.asarray(jnp.asarray(logits, dtype).astype(jnp.float32))
    gathered = np.take_along_axis(
        np_log_softmax(ref_logits), np.clip(targets, 0, 10)[..., None], -1
    )[..., 0]
    want = np.where(MASK, gathered, 0.0)
    np.testing.assert_allclose(lp, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.jit(pf.sequence_logprobs)(lp, MASK), want.sum(-1), rtol=1e-6)


# ------------------------------------------------------------------------------------ DPO


def test_dpo_equals_log_two_when_policy_is_the_teacher():
    lp = jnp.asarray([-12.0, -3.5, -40.0])
    rej = jnp.asarray([-10.0, -8.0, -1.0])
    got = jax.jit(pf.dpo_with_teacher_reference)(lp, rej, lp, rej)
    np.testing.assert_allclose(got, np.log(2.0), rtol=1e-6)  # 0.693147


def test_dpo_matches_numpy_and_swap_negates_margin():
    pc, pr, tc, tr = (_rand(i, 5, scale=5.0) for i in range(4))
    f = jax.jit(lambda *a: pf.dpo_with_teacher_reference(*a, beta=0.3))
    margin = (pc.astype(np.float64) - tc) - (pr - tr)
    np.testing.assert_allclose(f(pc, pr, tc, tr), np.log1p(np.exp(-0.3 * margin)), rtol=1e-5)
    np.testing.assert_allclose(pf.dpo_margin(pc, pr, tc, tr), margin, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        pf.dpo_margin(pr, pc, tr, tc), -pf.dpo_margin(pc, pr, tc, tr), rtol=1e-6
    )
    # The teacher is a constant: no gradient reaches it.
    grads = jax.grad(lambda tc, tr: jnp.sum(f(pc, pr, tc, tr)), argnums=(0, 1))(tc, tr)
    assert all(np.all(g == 0) for g in grads)
    # Gradient w.r.t. the chosen log-prob: -beta * sigmoid(-beta * margin).
    g = jax.grad(lambda x: jnp.sum(f(x, pr, tc, tr)))(pc)
    np.testing.assert_allclose(g, -0.3 / (1 + np.exp(0.3 * margin)), rtol=1e-5)


# ----------------------------------------------------------------------------------- REDI


def test_redi_value_and_gradient_identities():
    pos, neg = jnp.asarray([-30.0, -4.0]), jnp.asarray([-50.0, -9.0])
    n_pos, n_neg = jnp.asarray([10, 4]), jnp.asarray([25, 3])
    f = jax.jit(pf.redi_loss)
    np.testing.assert_allclose(f(pos, n_pos, neg, n_neg), [3.0 - 1.6, 1.0 - 2.4], rtol=1e-6)
    g_pos, g_neg = jax.grad(lambda a, b: jnp.sum(f(a, n_pos, b, n_neg)), argnums=(0, 1))(pos, neg)
    np.testing.assert_allclose(g_pos, -1.0 / np.asarray([10, 4]), rtol=1e-6)
    np.testing.assert_allclose(g_neg, 0.8 / np.asarray([25, 3]), rtol=1e-6)
    g = jax.grad(lambda a: jnp.sum(pf.redi_loss(a, n_pos, neg, n_neg, c_pos=2.0, c_neg=0.5)))(pos)
    np.testing.assert_allclose(g, -2.0 / np.asarray([10, 4]), rtol=1e-6)


# -------------------------------------------------------------------------------- ListMLE


def test_listmle_hand_computed_value():
    # Student prefers 0 > 1 > 2, the teacher 2 > 1 > 0: ranked student logits [0, 1, 2];
    # l = [lse(0, 1, 2) - 0] + [lse(1, 2) - 1] + 0 = 2.407606 + 1.313262.
    s = jnp.asarray([[[2.0, 1.0, 0.0]]])
    t = jnp.asarray([[[0.0, 1.0, 2.0]]])
    np.testing.assert_allclose(pf.listmle(s, t, k=3), [[3.720868]], atol=1e-5)
    np.testing.assert_allclose(
        pf.listmle(s, s, k=3),
        [[np.log1p(np.exp(-1) + np.exp(-2)) + np.log1p(np.exp(-1))]],
        atol=1e-6,
    )


@pytest.mark.parametrize("k", [1, 3, 10, 50])
def test_listmle_matches_numpy(k):
    s, t = _rand(0, 2, 4, 17, scale=2.0), _rand(1, 2, 4, 17, scale=2.0)
    got = jax.jit(lambda s, t: pf.listmle(s, t, MASK, k=k))(s, t)
    assert got.shape == (2, 4) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, np_listmle(s, t, MASK, min(k, 17)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalization,tau", [("prefix", 1.0), ("suffix", 2.0), ("prefix", 0.5)])
def test_listmle_normalizations_and_temperature_match_numpy(normalization, tau):
    s, t = _rand(4, 2, 4, 17, scale=2.0), _rand(5, 2, 4, 17, scale=2.0)
    got = jax.jit(
        lambda s, t: pf.listmle(s, t, MASK, k=6, temperature=tau, normalization=normalization)
    )(s, t)
    want = np_listmle(s, t, MASK, 6, prefix=normalization == "prefix", tau=tau)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="normalization='infix'"):
        pf.listmle(s, t, normalization="infix")


def np_tsd_listmle_mask(h, mask, threshold):
    """Per row: keep valid positions while the running entropy share is below the threshold."""
    out = np.zeros(h.shape, bool)
    for b in range(h.shape[0]):
        total = sum(h[b, i] for i in range(h.shape[1]) if mask[b, i])
        running = 0.0
        for i in range(h.shape[1]):
            if mask[b, i] and total > 0:
                running += h[b, i] / total
                out[b, i] = running < threshold
    return out


def test_tsd_listmle_mask_hand_case_and_numpy():
    # Shares 0.1, 0.2, 0.3, 0.4 -> cumulative 0.1, 0.3, 0.6, 1.0: threshold 0.5 keeps the first
    # two; a masked position takes no share; an all-zero row keeps nothing.
    h = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 1.0, 1.0, 3.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
    mask = np.array([[1, 1, 1, 1], [1, 0, 1, 1], [1, 1, 1, 1]], bool)
    got = jax.jit(lambda h: pf.tsd_listmle_mask(h, mask, threshold=0.5))(h)
    want = [[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]  # row 2: 5 / 9 >= 0.5 at once
    np.testing.assert_array_equal(got, np.array(want, bool))
    h2 = np.abs(_rand(6, 3, 12, scale=2.0))
    m2 = np.random.default_rng(7).random((3, 12)) > 0.3
    for thr in (0.1, 0.35, 1.0):
        np.testing.assert_array_equal(
            pf.tsd_listmle_mask(h2, m2, threshold=thr), np_tsd_listmle_mask(h2, m2, thr)
        )


def test_listmle_shift_invariant_and_zero_at_matching_order():
    s, t = _rand(2, 2, 4, 20, scale=2.0), _rand(3, 2, 4, 20, scale=2.0)
    f = jax.jit(lambda s, t: pf.listmle(s, t, MASK, k=10))
    np.testing.assert_allclose(f(s + 7.5, t), f(s, t), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(f(s, t)) >= 0)
    # The student orders every token as the teacher does, by margins of 50.
    ranks = np.argsort(np.argsort(-t, -1), -1)
    student = (-50.0 * ranks).astype(np.float32)
    np.testing.assert_allclose(f(student, t), 0.0, atol=1e-6)
    g = jax.grad(lambda x: jnp.sum(f(x, t)))(s)
    assert np.all(np.isfinite(g)) and np.any(g != 0)


def test_listmle_with_masked_vocabulary_is_finite():
    s = np.array([[[3.0, 1.0, -np.inf, -np.inf]]], np.float32)
    t = np.array([[[0.0, 2.0, 1.0, 5.0]]], np.float32)
    got = pf.listmle(s, t, k=4)
    np.testing.assert_allclose(got, [[np.log1p(np.exp(2.0))]], atol=1e-6)  # list [1, 3]
    assert np.all(np.isfinite(jax.grad(lambda x: jnp.sum(pf.listmle(x, t, k=4)))(s)))


# ----------------------------------------------------------------------------- DistiLLM-2


@pytest.mark.parametrize("b", [1.0, 1.5])
def test_distillm2_terms_and_weights(b):
    s1, t1 = _rand(0, 2, 4, 9), _rand(1, 2, 4, 9)
    s2, t2 = _rand(2, 2, 3, 9), _rand(3, 2, 3, 9)
    m2 = np.array([[1, 1, 0], [1, 1, 1]], bool)
    f = jax.jit(lambda *a: pf.distillm2(*a, alpha=0.1, b=b))
    on_teacher, on_student = f(s1, t1, MASK, s2, t2, m2)
    p1, q1 = np_softmax(t1), np_softmax(s1)
    p2, q2 = np_softmax(t2), np_softmax(s2)
    skl = np.where(MASK, np_skew_kl(p1, q1, 0.1), 0.0)
    srkl = np.where(m2, np_skew_kl(q2, p2, 0.1), 0.0)
    np.testing.assert_allclose(on_teacher, (2 - b) * skl, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(on_student, b * srkl, rtol=1e-5, atol=1e-7)
    if b == 1.0:  # b = 1 weights both terms equally
        same = f(s1, t1, MASK, s1, t1, MASK)
        np.testing.assert_allclose(same[0], skl, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(same[1], np.where(MASK, np_skew_kl(q1, p1, 0.1), 0), rtol=1e-5)


def test_distillm2_alpha_hand_values_and_per_sample_skews():
    # a_0 = 0.1, g_0 = 0.2: a = clip(1 - 0.18 / (g + 1e-5), 0.01, 0.1).
    own = np.log(np.array([0.9, 0.5, 0.3, 0.2], np.float32))
    other = np.log(np.array([0.5, 0.3, 0.2, 0.2], np.float32))  # g = 0.4, 0.2, 0.1, 0
    got = jax.jit(lambda o, t: pf.distillm2_alpha(o, t, 0.2, base_alpha=0.1))(own, other)
    g = np.array([0.4, 0.2, 0.1, 0.0])
    want = np.clip(1 - 0.9 * 0.2 / (g + 1e-5), 0.01, 0.1)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    np.testing.assert_allclose(got, [0.1, 0.1, 0.01, 0.01], rtol=1e-3)  # by hand
    g2 = jax.grad(lambda o: pf.distillm2_alpha(o, other, 0.2).sum())(own)
    assert np.all(np.asarray(g2) == 0)
    # Per-sample skews as [B, 1, 1]: each sample matches the scalar-skew call on it alone.
    s1, t1 = _rand(0, 2, 4, 9), _rand(1, 2, 4, 9)
    a1 = jnp.asarray([0.05, 0.1]).reshape(2, 1, 1)
    a2 = jnp.asarray([0.02, 0.08]).reshape(2, 1, 1)
    on_t, on_s = pf.distillm2(s1, t1, MASK, s1, t1, MASK, alpha=a1, student_alpha=a2)
    for i in range(2):
        p, q = np_softmax(t1[i]), np_softmax(s1[i])
        want_t = np.where(MASK[i], np_skew_kl(p, q, float(a1[i, 0, 0])), 0.0)
        want_s = np.where(MASK[i], np_skew_kl(q, p, float(a2[i, 0, 0])), 0.0)
        np.testing.assert_allclose(on_t[i], want_t, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(on_s[i], want_s, rtol=1e-5, atol=1e-7)
