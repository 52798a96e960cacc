"""ULD against a float64 NumPy reference with per-row loops, and the properties of METHODS.md 6.5:
invariance to permuting either vocabulary, 0 for relabelled identical distributions, 0 <= l <= 2.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.bridges import uld
from distill_jax.losses import masked_sum_and_count


def _softmax64(x, tau):
    z = np.asarray(x, np.float64) / tau
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _ref_uld(s, t, s_mask, t_mask, tau_s=1.0, tau_t=1.0):
    """Per row: valid positions by np.flatnonzero, the first n of each side, sorted L1."""
    b, length = s.shape[0], min(s.shape[1], t.shape[1])
    out, pair = np.zeros((b, length)), np.zeros((b, length), bool)
    for r in range(b):
        s_pos, t_pos = np.flatnonzero(s_mask[r]), np.flatnonzero(t_mask[r])
        for k in range(min(len(s_pos), len(t_pos))):
            q = sorted(_softmax64(s[r, s_pos[k]], tau_s), reverse=True)
            p = sorted(_softmax64(t[r, t_pos[k]], tau_t), reverse=True)
            size = max(len(q), len(p))
            q, p = np.pad(q, (0, size - len(q))), np.pad(p, (0, size - len(p)))
            out[r, k], pair[r, k] = np.abs(q - p).sum(), True
    return out, pair


def _ref_grad(s, t, s_mask, t_mask, tau_s, tau_t):
    """d sum(l) / d z_s: g_v = sign(q_v - p at v's rank), dz = q (g - <g, q>) / tau_s."""
    grad = np.zeros(s.shape)
    for r in range(s.shape[0]):
        s_pos, t_pos = np.flatnonzero(s_mask[r]), np.flatnonzero(t_mask[r])
        for k in range(min(len(s_pos), len(t_pos), s.shape[1], t.shape[1])):
            q, p = _softmax64(s[r, s_pos[k]], tau_s), _softmax64(t[r, t_pos[k]], tau_t)
            p_sorted = np.pad(np.sort(p)[::-1], (0, max(0, len(q) - len(p))))
            rank = np.argsort(np.argsort(-q, kind="stable"), kind="stable")
            g = np.sign(q - p_sorted[rank])
            grad[r, s_pos[k]] = q * (g - (g * q).sum()) / tau_s
    return grad


def _case(seed, b, t_len, u_len, v, w, scale=2.0):
    rng = np.random.default_rng(seed)
    s = (rng.normal(size=(b, t_len, v)) * scale).astype(np.float32)
    t = (rng.normal(size=(b, u_len, w)) * scale).astype(np.float32)
    s_mask = rng.random((b, t_len)) < 0.7
    t_mask = rng.random((b, u_len)) < 0.7
    s_mask[0, :] = False  # a row with no valid student position
    t_mask[-1, : u_len // 2] = False  # a prompt on the teacher side only
    return s, t, s_mask, t_mask


@functools.partial(jax.jit, static_argnames=("tau_s", "tau_t"))
def _uld(s, t, s_mask, t_mask, tau_s=1.0, tau_t=1.0):
    return uld.uld_loss(s, t, s_mask, t_mask, student_temperature=tau_s, teacher_temperature=tau_t)


@pytest.mark.parametrize(
    "t_len,u_len,v,w", [(6, 9, 11, 7), (8, 5, 5, 13), (7, 7, 10, 10)], ids=["V>W", "V<W", "V=W"]
)
@pytest.mark.parametrize("tau_s,tau_t", [(1.0, 1.0), (2.0, 0.5)])
def test_matches_float64_reference(t_len, u_len, v, w, tau_s, tau_t):
    s, t, s_mask, t_mask = _case(0, 3, t_len, u_len, v, w)
    got, pair = _uld(s, t, s_mask, t_mask, tau_s, tau_t)
    want, want_pair = _ref_uld(s, t, s_mask, t_mask, tau_s, tau_t)
    assert got.shape == pair.shape == (3, min(t_len, u_len)) and got.dtype == jnp.float32
    np.testing.assert_array_equal(pair, want_pair)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    total, count = masked_sum_and_count(got, pair)
    np.testing.assert_allclose(total / count, want[want_pair].mean(), rtol=1e-5)
    grad = jax.jit(jax.grad(lambda s: uld.uld_loss(
        s, t, s_mask, t_mask, student_temperature=tau_s, teacher_temperature=tau_t
    )[0].sum()))(s)  # fmt: skip
    np.testing.assert_allclose(grad, _ref_grad(s, t, s_mask, t_mask, tau_s, tau_t), atol=1e-5)


def test_first_valid_positions_keep_order():
    mask = np.array([[0, 1, 0, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], bool)
    pos, count = jax.jit(uld.first_valid_positions, static_argnums=1)(mask, 4)
    np.testing.assert_array_equal(count, [3, 6, 0])
    np.testing.assert_array_equal(pos[0, :3], [1, 3, 4])
    np.testing.assert_array_equal(pos[1], [0, 1, 2, 3])


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_invariant_to_permuting_either_vocabulary(side):
    s, t, s_mask, t_mask = _case(1, 2, 6, 6, 12, 9)
    base, _ = _uld(s, t, s_mask, t_mask)
    rng = np.random.default_rng(2)
    if side == "student":
        s = s[..., rng.permutation(s.shape[-1])]
    else:
        t = t[..., rng.permutation(t.shape[-1])]
    np.testing.assert_allclose(_uld(s, t, s_mask, t_mask)[0], base, rtol=1e-6, atol=1e-7)


def test_zero_for_relabelled_identical_distributions():
    rng = np.random.default_rng(3)
    t = rng.normal(size=(2, 5, 8)).astype(np.float32)
    s = t[..., rng.permutation(8)]
    mask = np.ones((2, 5), bool)
    np.testing.assert_allclose(_uld(s, t, mask, mask)[0], 0.0, atol=1e-6)
    # A larger student vocabulary whose extra ids have probability 0: still 0.
    s_big = np.concatenate([s, np.full((2, 5, 4), -np.inf, np.float32)], -1)
    s_big = s_big[..., rng.permutation(12)]
    np.testing.assert_allclose(_uld(s_big, t, mask, mask)[0], 0.0, atol=1e-6)


def test_bounded_by_two():
    rng = np.random.default_rng(4)
    s = (rng.normal(size=(4, 6, 50)) * rng.choice([0.1, 3, 30], (4, 6, 1))).astype(np.float32)
    t = (rng.normal(size=(4, 6, 300)) * rng.choice([0.1, 3, 30], (4, 6, 1))).astype(np.float32)
    mask = np.ones((4, 6), bool)
    got = np.asarray(_uld(s, t, mask, mask)[0])
    assert (got >= 0).all() and (got <= 2).all()
    # Student one-hot, teacher uniform over W = 1000: l = (1 - 1/W) + (W - 1)/W = 2 - 2/W.
    s = np.zeros((1, 1, 10), np.float32)
    s[..., 3] = 1e4
    t = np.zeros((1, 1, 1000), np.float32)
    one = np.ones((1, 1), bool)
    np.testing.assert_allclose(_uld(s, t, one, one)[0], [[2 - 2 / 1000]], rtol=1e-5)
