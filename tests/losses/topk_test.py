"""Sparse (top-k) teacher: the three semantics against float64 NumPy, METHODS.md 1.13 values,
K = V equals dense, data processing, re-tempering, metrics and errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.losses import divergences as dv
from distill_jax.losses import topk

Z_T, Z_S = np.array([2.0, 1.0, 0.0, -1.0]), np.array([1.0, 1.0, 0.0, 0.0])


def np_softmax(z, tau=1.0):
    z = np.asarray(z, np.float64) / tau
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_kl(p, q):
    return np.where(p > 0, p * np.log(np.where(p > 0, p, 1) / q), 0).sum(-1)


def np_supports(zs, zt, k, semantics, tau=1.0):
    """(q, p) over the common support, written from METHODS.md 1.13 directly."""
    p, q = np_softmax(zt, tau), np_softmax(zs, tau)
    ids = np.argsort(-p, -1, kind="stable")[..., :k]
    pk, qk = np.take_along_axis(p, ids, -1), np.take_along_axis(q, ids, -1)
    if semantics == "renorm_both":
        return qk / qk.sum(-1, keepdims=True), pk / pk.sum(-1, keepdims=True)
    if semantics == "renorm_teacher":
        return qk, pk / pk.sum(-1, keepdims=True)
    tail = lambda x: np.concatenate([x, 1 - x.sum(-1, keepdims=True)], -1)
    return tail(qk), tail(pk)


NP_DIV = {
    "forward_kl": lambda q, p: np_kl(p, q),
    "reverse_kl": lambda q, p: np_kl(q, p),
    "tvd": lambda q, p: 0.5 * np.abs(p - q).sum(-1),
    "jsd": lambda q, p: 0.5 * np_kl(p, (p + q) / 2) + 0.5 * np_kl(q, (p + q) / 2),
}


@pytest.mark.parametrize(
    "semantics,expected",
    [("renorm_both", 0.110944), ("renorm_teacher", 0.424206), ("tail_bucket", 0.164850)],
)
def test_reference_values(semantics, expected):
    sparse = topk.sparse_teacher(jnp.asarray(Z_T), 2)
    got = topk.topk_divergence("forward_kl", jnp.asarray(Z_S), sparse, semantics=semantics)
    np.testing.assert_allclose(float(got), expected, atol=2e-6)
    np.testing.assert_allclose(float(dv.forward_kl(Z_S, Z_T)), 0.178075, atol=2e-6)


def _logits(seed, shape=(2, 5, 13), scale=2.5):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


PAIRS = [(n, sem) for n in sorted(NP_DIV) for sem in ("renorm_both", "tail_bucket")]
PAIRS += [("forward_kl", "renorm_teacher")]  # the only divergence it defines (tested below)


@pytest.mark.parametrize("name,semantics", PAIRS)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_matches_numpy(name, semantics, tau):
    s, t = _logits(0), _logits(1)
    sparse = topk.sparse_teacher(jnp.asarray(t), 4, temperature=tau)
    fn = jax.jit(
        lambda x: topk.topk_divergence(name, x, sparse, semantics=semantics, temperature=tau)
    )
    q, p = np_supports(s, t, 4, semantics, tau)
    np.testing.assert_allclose(fn(s), NP_DIV[name](q, p), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "name,semantics",
    [
        (name, semantics)
        for semantics in ("renorm_both", "tail_bucket")
        for name in ("forward_kl", "reverse_kl", "tvd", "jsd", "hellinger", "akl")
    ]
    + [("forward_kl", "renorm_teacher")],  # the teacher-renormalised form is a forward KL
)
def test_k_equal_to_v_is_the_dense_divergence(name, semantics):
    s, t = _logits(2), _logits(3)
    sparse = topk.sparse_teacher(jnp.asarray(t), t.shape[-1])
    got = topk.topk_divergence(name, jnp.asarray(s), sparse, semantics=semantics)
    np.testing.assert_allclose(got, dv.divergence(name, s, t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "tvd", "hellinger"])
def test_tail_bucket_never_exceeds_the_full_divergence(name):
    s, t = _logits(4), _logits(5)
    full = np.asarray(dv.divergence(name, s, t))
    for k in (1, 3, 8):
        sparse = topk.sparse_teacher(jnp.asarray(t), k)
        tail = np.asarray(
            topk.topk_divergence(name, jnp.asarray(s), sparse, semantics="tail_bucket")
        )
        assert np.all(tail <= full + 1e-6)


def test_renorm_teacher_is_renorm_both_minus_log_student_mass():
    s, t = _logits(6), _logits(7)
    sparse = topk.sparse_teacher(jnp.asarray(t), 3)
    a = topk.topk_divergence("forward_kl", s, sparse, semantics="renorm_both")
    b = topk.topk_divergence("forward_kl", s, sparse, semantics="renorm_teacher")
    q, _ = np_supports(s, t, 3, "renorm_teacher")
    np.testing.assert_allclose(b, np.asarray(a) - np.log(q.sum(-1)), rtol=1e-5)


def test_retempering_a_cached_teacher():
    s, t = _logits(8), _logits(9)
    cached = topk.sparse_teacher(jnp.asarray(t), 5, temperature=1.0)
    direct = topk.sparse_teacher(jnp.asarray(t), 5, temperature=2.0)
    # Over K the teacher's logits are exact, so renormalised semantics do not care where the
    # cache was tempered.
    a = topk.topk_divergence("forward_kl", s, cached, semantics="renorm_both", temperature=2.0)
    b = topk.topk_divergence("forward_kl", s, direct, semantics="renorm_both", temperature=2.0)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # The tail bucket follows METHODS.md: log p' = r log p - log(sum_K p^r + tail^r).
    full = np_softmax(t)
    p = np.take_along_axis(full, np.asarray(cached.ids), -1)
    bins = np.concatenate([p, full.sum(-1, keepdims=True) - p.sum(-1, keepdims=True)], -1) ** 0.5
    np.testing.assert_allclose(
        np.exp(topk.retemper(cached, 2.0)), bins / bins.sum(-1, keepdims=True), rtol=1e-5
    )


def test_captured_mass_and_vocab_mask():
    s, t = _logits(10), _logits(11)
    vocab = np.ones(t.shape[-1], bool)
    vocab[[0, 5]] = False
    t[..., [0, 5]] = 50.0  # padded rows with huge logits must still never be chosen
    sparse = topk.sparse_teacher(jnp.asarray(t), 4, vocab_mask=vocab)
    assert not np.isin(np.asarray(sparse.ids), [0, 5]).any()
    mask = np.ones(t.shape[:-1], bool)
    mask[0, :2] = False
    metrics = topk.captured_mass(jnp.asarray(s), sparse, mask, vocab_mask=vocab)
    tt, ss = t.copy(), s.copy()
    tt[..., [0, 5]] = -np.inf
    ss[..., [0, 5]] = -np.inf
    p, q = np_softmax(tt), np_softmax(ss)
    ids = np.argsort(-p, -1)[..., :4]
    pk, qk = np.take_along_axis(p, ids, -1).sum(-1), np.take_along_axis(q, ids, -1).sum(-1)
    for key, ref in (("topk/teacher_mass", pk), ("topk/student_mass", qk)):
        total, count = metrics[key]
        np.testing.assert_allclose(float(total), ref[mask].sum(), rtol=1e-5)
        assert float(count) == mask.sum()
    agree = (q.argmax(-1) == ids[..., 0])[mask].sum()
    assert float(metrics["topk/top1_agreement"][0]) == agree


def test_gradients_are_finite_and_masked_rows_are_zero():
    s, t = _logits(12), _logits(13)
    mask = np.ones(s.shape[:-1], bool)
    mask[1] = False
    sparse = topk.sparse_teacher(jnp.asarray(t), 3)
    for semantics in topk.SEMANTICS:
        g = jax.grad(
            lambda x, sem=semantics: topk.topk_divergence(
                "forward_kl", x, sparse, mask, semantics=sem
            ).sum()
        )(jnp.asarray(s))
        assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[1] == 0)


def test_errors_name_the_problem():
    s, t = jnp.zeros((2, 6)), jnp.zeros((2, 6))
    sparse = topk.sparse_teacher(t, 2)
    with pytest.raises(ValueError, match="forward_kl only"):
        topk.topk_divergence("reverse_kl", s, sparse, semantics="renorm_teacher")
    with pytest.raises(ValueError, match="Unknown top-k semantics"):
        topk.topk_divergence("forward_kl", s, sparse, semantics="renorm")
    with pytest.raises(ValueError, match="k=7"):
        topk.sparse_teacher(t, 7)


def test_sparse_teacher_from_hidden_equals_the_dense_top_k():
    rng = np.random.default_rng(20)
    h = jnp.asarray(rng.standard_normal((2, 13, 6)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((6, 40)), jnp.float32)
    vocab = np.ones(40, bool)
    vocab[-4:] = False
    got = jax.jit(
        lambda h, w: topk.sparse_teacher_from_hidden(
            h, w, 7, temperature=1.5, softcap=3.0, vocab_mask=vocab, chunk_size=5
        )
    )(h, w)
    z = jnp.tanh(h @ w / 3.0) * 3.0
    want = topk.sparse_teacher(z, 7, temperature=1.5, vocab_mask=vocab)
    np.testing.assert_array_equal(got.ids, want.ids)
    for field in ("logprobs", "log_normalizer", "log_tail"):
        np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=1e-5, atol=1e-6)
