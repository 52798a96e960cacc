"""Chunked per-token log-probs from hidden states (``tokens.token_logprobs_from_hidden``, what the
pair terms and ALM use instead of [B, T, V] logits) against a float64 NumPy reference: values
with padded vocabulary rows, soft-caps and a set's log-probability, and the closed-form
gradient d log p(y) / dz = onehot(y) - p carried to the hidden states and the head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.losses import tokens


def _setup(b=2, t=7, d=5, v=11, seed=0):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(b, t, d)).astype(np.float32)
    head = rng.normal(size=(d, v)).astype(np.float32)
    targets = rng.integers(0, v - 2, size=(b, t)).astype(np.int32)
    mask = rng.random((b, t)) < 0.7
    return hidden, head, targets, mask


def _reference(hidden, head, targets, vocab_mask=None, softcap=None, set_mask=None):
    z = np.einsum("btd,dv->btv", hidden.astype(np.float64), head.astype(np.float64))
    if softcap:
        z = softcap * np.tanh(z / softcap)
    if vocab_mask is not None:
        z = np.where(vocab_mask, z, -np.inf)
    m = z.max(-1, keepdims=True)
    logp = z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))
    lp = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    if set_mask is None:
        return lp, None
    with np.errstate(divide="ignore"):
        return lp, np.log(np.where(set_mask, np.exp(logp), 0.0).sum(-1))


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_chunked_logprobs_equal_the_dense_reference(chunk_size, softcap):
    hidden, head, targets, mask = _setup()
    vocab_mask = np.arange(11) < 9  # two padded rows
    set_mask = np.arange(11) % 3 == 0
    fn = jax.jit(
        lambda h, w, y: tokens.token_and_set_logprobs_from_hidden(
            h, w, y, set_mask, vocab_mask=vocab_mask, softcap=softcap, chunk_size=chunk_size
        )
    )
    lp, lp_set = fn(hidden, head, targets)
    want_lp, want_set = _reference(hidden, head, targets, vocab_mask, softcap, set_mask)
    np.testing.assert_allclose(lp, want_lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lp_set, want_set, rtol=1e-5, atol=1e-5)
    masked = jax.jit(
        lambda h, w, y, m: tokens.token_logprobs_from_hidden(
            h, w, y, m, vocab_mask=vocab_mask, softcap=softcap, chunk_size=chunk_size
        )
    )(hidden, head, targets, mask)
    np.testing.assert_allclose(masked, np.where(mask, want_lp, 0.0), rtol=1e-5, atol=1e-5)


def test_gradient_is_onehot_minus_softmax_through_the_head():
    """L = sum_t m_t c_t log p(y_t): dL/dz_t = m_t c_t (onehot(y_t) - p_t), so dL/dh = dz W^T
    and dL/dW = h^T dz; padded vocabulary rows get no gradient."""
    hidden, head, targets, mask = _setup(seed=1)
    c = np.random.default_rng(2).normal(size=mask.shape).astype(np.float32)
    vocab_mask = np.arange(11) < 10

    def loss(h, w):
        lp = tokens.token_logprobs_from_hidden(
            h, w, targets, mask, vocab_mask=vocab_mask, chunk_size=3
        )
        return jnp.sum(lp * c)

    g_h, g_w = jax.jit(jax.grad(loss, argnums=(0, 1)))(hidden, head)
    z = np.einsum("btd,dv->btv", hidden.astype(np.float64), head.astype(np.float64))
    z = np.where(vocab_mask, z, -np.inf)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dz = (np.eye(11)[targets] - p) * (mask * c)[..., None]
    np.testing.assert_allclose(g_h, np.einsum("btv,dv->btd", dz, head), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g_w, np.einsum("btd,btv->dv", hidden, dz), rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(g_w)[:, 10] == 0.0)
