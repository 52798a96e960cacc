"""Per-token basics every loss builds on: tempered log-probabilities, entropy, label cross-entropy,
and the one reducer.

Conventions (METHODS.md section 0): logits of any float dtype are upcast to float32 before the
softmax; a temperature divides the logits; padded or banned vocabulary entries are given logit
-inf through ``vocab_mask`` and every function defines 0 * log 0 = 0 with explicit ``jnp.where``
(both in the value and in the gradient), so masked entries never produce NaN. Masked *positions*
(padding, a fully masked row) are cleared before any arithmetic (``masked_logits``), so their
logits may hold anything, +-inf and NaN included, without reaching the gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def _temperature(temperature, ndim: int) -> jax.Array:
    """A scalar or per-token [...] temperature as float32, broadcastable against [..., V]."""
    t = jnp.asarray(temperature, jnp.float32)
    return t[..., None] if t.ndim else t


def log_probs(
    logits: jax.Array, temperature: float | jax.Array = 1.0, vocab_mask: jax.Array | None = None
) -> jax.Array:
    """log softmax(z / tau) over the last axis, in float32.

    Args:
        logits: [..., V] float (any dtype).
        temperature: tau > 0, a scalar or a per-token array [...] (e.g. AdaKD's IDTS).
        vocab_mask: [V] bool or None; False entries (padded vocabulary rows) get log-prob -inf.

    Returns:
        [..., V] float32.
    """
    z = logits.astype(jnp.float32) / _temperature(temperature, logits.ndim)
    if vocab_mask is not None:
        z = jnp.where(vocab_mask, z, NEG_INF)
    return jax.nn.log_softmax(z, axis=-1)


def xlogy_ratio(log_a: jax.Array, log_b: jax.Array) -> jax.Array:
    """Elementwise a * (log a - log b) with 0 * log 0 = 0, from log a and log b.

    +inf where a > 0 and b = 0 (the divergence really is infinite there). Safe in the gradient:
    where a = 0 both logs are replaced before they meet, so no -inf - -inf reaches autodiff.
    """
    a = jnp.exp(log_a)
    pos = a > 0
    return jnp.where(pos, a * (jnp.where(pos, log_a, 0.0) - jnp.where(pos, log_b, 0.0)), 0.0)


def logaddexp(a: jax.Array, b: jax.Array) -> jax.Array:
    """log(e^a + e^b) that stays NaN-free in the gradient when both inputs are -inf."""
    both = (a == NEG_INF) & (b == NEG_INF)
    out = jnp.logaddexp(jnp.where(both, 0.0, a), jnp.where(both, 0.0, b))
    return jnp.where(both, NEG_INF, out)


def entropy_from_log_probs(logp: jax.Array) -> jax.Array:
    """H = -sum_v p_v log p_v over the last axis; [..., V] -> [...]."""
    p = jnp.exp(logp)
    return -jnp.sum(jnp.where(p > 0, p * jnp.where(p > 0, logp, 0.0), 0.0), axis=-1)


def masked_logits(logits: jax.Array, mask: jax.Array | None) -> jax.Array:
    """``logits`` [..., V] with every masked position's row set to 0; other rows unchanged.

    The first half of the double-where: ``apply_mask`` zeroes a masked position's *value*
    after the arithmetic, but the gradient still passes through that arithmetic, where a +-inf
    or NaN logit turns the zero cotangent into 0 * inf = NaN. Selecting the inputs first keeps
    the masked positions' arithmetic finite, so their (zero) gradient is finite too.

    Args:
        logits: [..., V] float; mask: [...] bool or None (None: returned as is).
    """
    if mask is None:
        return logits
    return jnp.where(mask.astype(bool)[..., None], logits, jnp.zeros((), logits.dtype))


def masked_temperature(temperature, mask: jax.Array | None):
    """A per-token temperature [...] with masked positions set to 1 (padding may carry tau = 0);
    a scalar is returned as is."""
    if mask is None or jnp.ndim(temperature) == 0:
        return temperature
    return jnp.where(mask.astype(bool), jnp.asarray(temperature, jnp.float32), 1.0)


def apply_mask(per_token: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Zero the per-token values where ``mask`` is False (with where, so NaN/inf cannot leak)."""
    if mask is None:
        return per_token
    return jnp.where(mask.astype(bool), per_token, 0.0)


def entropy(
    logits: jax.Array,
    mask: jax.Array | None = None,
    *,
    temperature: float | jax.Array = 1.0,
    vocab_mask: jax.Array | None = None,
) -> jax.Array:
    """Per-token entropy H(softmax(z / tau)) in nats.

    Args:
        logits: [..., V] float.
        mask: [...] bool or None; masked positions give 0.
        temperature: tau > 0, scalar or [...].
        vocab_mask: [V] bool or None.

    Returns:
        [...] float32.
    """
    logits, temperature = masked_logits(logits, mask), masked_temperature(temperature, mask)
    return apply_mask(entropy_from_log_probs(log_probs(logits, temperature, vocab_mask)), mask)


def cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    mask: jax.Array | None = None,
    *,
    vocab_mask: jax.Array | None = None,
) -> jax.Array:
    """Per-token hard-label cross-entropy -log softmax(z)[y] (the next-token NLL).

    Args:
        logits: [..., V] float.
        targets: [...] int token ids.
        mask: [...] bool or None; masked positions give 0 (their targets may be anything).
        vocab_mask: [V] bool or None.

    Returns:
        [...] float32.
    """
    logp = log_probs(masked_logits(logits, mask), 1.0, vocab_mask)
    safe = jnp.clip(targets, 0, logits.shape[-1] - 1)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    return apply_mask(nll, mask)


def masked_sum_and_count(
    per_token: jax.Array, mask: jax.Array | None, weights: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """The only reducer: (sum_i m_i w_i l_i, sum_i m_i w_i), both float32 scalars.

    Means stay exact across hosts and accumulation steps when sums and counts are added first and
    divided once (METHODS.md section 0).

    Args:
        per_token: [...] float.
        mask: [...] bool/float or None (all valid).
        weights: [...] float or None (all 1); treated as data, not differentiated through.
    """
    m = jnp.ones(per_token.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    if weights is not None:
        m = m * jax.lax.stop_gradient(weights.astype(jnp.float32))
    total = jnp.sum(jnp.where(m != 0, per_token.astype(jnp.float32) * m, 0.0))
    return total, jnp.sum(m)


def token_and_set_logprobs_from_hidden(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    set_mask: jax.Array | None = None,
    *,
    vocab_mask: jax.Array | None = None,
    softcap: float | None = None,
    chunk_size: int = 128,
) -> tuple[jax.Array, jax.Array]:
    r"""Per position log p(y_t) and log p(S) = log sum_{v in S} p_v, without a [B, T, V] array.

    z = h W (soft-capped: cap tanh(z / cap)), p = softmax(z) over the vocabulary rows that
    ``vocab_mask`` keeps. The logits are formed ``chunk_size`` positions at a time inside a
    ``lax.map`` whose body is rematerialised, so the largest live array is [B, chunk_size, V] in
    the forward and the backward pass; gradients reach ``hidden`` and ``head``.

    Args:
        hidden: [B, T, D] final hidden states.
        head: [D, V] output projection.
        targets: [B, T] int, the next token at each position (anything where unused).
        set_mask: [V] bool or None (then the second output is zeros), e.g. ALM's word-start
            tokens (``bridges.alm``).
        vocab_mask: [V] bool or None; False rows (padded vocabulary) get probability 0.
        softcap: final-logit soft-cap (Gemma), or None.
        chunk_size: positions per step of the walk.

    Returns:
        (lp [B, T], lp_set [B, T]) float32.
    """
    b, t, _ = hidden.shape
    chunk_size = max(1, min(int(chunk_size), t))
    n = -(-t // chunk_size)
    pad = n * chunk_size - t
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk_size, -1)
    y = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk_size)
    smask = None if set_mask is None else jnp.asarray(set_mask, bool)

    @jax.checkpoint
    def one(args):
        hc, yc = args  # [B, c, D], [B, c]
        z = jnp.einsum("bcd,dv->bcv", hc, head.astype(hc.dtype), preferred_element_type=jnp.float32)
        if softcap:
            z = jnp.tanh(z / softcap) * softcap
        if vocab_mask is not None:
            z = jnp.where(vocab_mask, z, NEG_INF)
        lse = jax.nn.logsumexp(z, axis=-1)
        safe = jnp.clip(yc, 0, z.shape[-1] - 1)
        lp = jnp.take_along_axis(z, safe[..., None], axis=-1)[..., 0] - lse
        if smask is None:
            return lp, jnp.zeros_like(lp)
        return lp, jax.nn.logsumexp(jnp.where(smask, z, NEG_INF), axis=-1) - lse

    lp, lp_set = jax.lax.map(one, (jnp.moveaxis(h, 1, 0), jnp.moveaxis(y, 1, 0)))
    unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, n * chunk_size)[:, :t]  # noqa: E731
    return unchunk(lp), unchunk(lp_set)


def token_logprobs_from_hidden(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    mask: jax.Array | None = None,
    *,
    vocab_mask: jax.Array | None = None,
    softcap: float | None = None,
    chunk_size: int = 128,
) -> jax.Array:
    r"""log softmax(h W)[y] per token from hidden states, chunked (no [B, T, V] array).

    Equals ``-cross_entropy(hidden @ head, targets, mask)``; see
    ``token_and_set_logprobs_from_hidden`` for the chunking. Sequence-level objectives
    (``preference``: DPO, REDI, DistiLLM-2's skew) sum these over a response.

    Args:
        hidden: [B, T, D]; head: [D, V]; targets: [B, T] int next-token ids.
        mask: [B, T] bool or None; masked positions give 0.
        vocab_mask: [V] bool or None; softcap: float or None; chunk_size: positions per step.

    Returns:
        [B, T] float32 <= 0.
    """
    lp, _ = token_and_set_logprobs_from_hidden(
        hidden, head, targets, vocab_mask=vocab_mask, softcap=softcap, chunk_size=chunk_size
    )
    return apply_mask(lp, mask)
