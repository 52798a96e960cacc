r"""Composite teacher logits z* = z_a + alpha_t (z_b - z_c) (METHODS.md 3.6).

AlignDistil (Zhang et al., ACL 2025, arXiv:2503.02832) distils the student towards the per-token
optimum of RLHF with a DPO reward, whose logits are a reference (or anchor) plus an extrapolation
along a logit difference: z_ref + (beta0 / beta) (z_dpo - z_ref), or, contrastively, an anchor
plus alpha (z_dpo - z_rdpo) with a DPO model and a reverse-DPO model. Its token-adaptive logit
extrapolation picks alpha per position: where the two models' next-token distributions are far
apart the difference already carries a strong signal and a large alpha over-optimises; where
they nearly agree a small alpha under-optimises. ``token_adaptive_alpha`` implements that rule as
alpha_t = min(scale / TV(p_b, p_c), max_alpha); the inverse-distance form follows the paper's
description, its exact constants and distance are [unverified] (no code is public; METHODS.md
3.6). ``composite_logits`` applies either a scalar alpha or alpha_t.

Used per token chunk by ``fused._teacher_logits`` (``teacher_combine=("aligndistil", (scale,
max_alpha))``) and by ``teachers.CompositeTeacher``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from distill_jax.losses.tokens import log_probs

ADAPTIVE = "aligndistil"  # the teacher_combine kind of the token-adaptive rule


def token_adaptive_alpha(
    logits_b: jax.Array,
    logits_c: jax.Array,
    *,
    scale: float = 0.1,
    max_alpha: float = 5.0,
    vocab_mask: jax.Array | None = None,
    eps: float = 1e-6,
) -> jax.Array:
    r"""alpha_t = min(scale / (TV(p_b, p_c) + eps), max_alpha), constant for autodiff.

    TV(p_b, p_c) = 0.5 sum_v |p_b,v - p_c,v| with p = softmax(z) at temperature 1, per position.
    AlignDistil's token-adaptive logit extrapolation (see the module docstring; the exact
    constants are [unverified], defaults here are [design]).

    Args:
        logits_b, logits_c: [..., V] float, e.g. the DPO and the reverse-DPO model.
        scale: numerator > 0 (alpha_t = scale / TV until the cap).
        max_alpha: cap >= 0; also the value where the two distributions are equal.
        vocab_mask: [V] bool or None.

    Returns:
        [...] float32 in (0, max_alpha].
    """
    pb = jnp.exp(log_probs(logits_b, 1.0, vocab_mask))
    pc = jnp.exp(log_probs(logits_c, 1.0, vocab_mask))
    tv = 0.5 * jnp.sum(jnp.abs(pb - pc), axis=-1)
    alpha = jnp.minimum(scale / (tv + eps), max_alpha)
    return jax.lax.stop_gradient(alpha)


def composite_logits(
    logits_a: jax.Array,
    logits_b: jax.Array,
    logits_c: jax.Array,
    alpha: float | jax.Array,
) -> jax.Array:
    r"""z* = z_a + alpha (z_b - z_c); alpha a scalar or per position [...] (broadcast over V).

    Args:
        logits_a, logits_b, logits_c: [..., V] float.
        alpha: float, or [...] float (e.g. ``token_adaptive_alpha``).

    Returns:
        [..., V] float32.
    """
    a, b, c = (z.astype(jnp.float32) for z in (logits_a, logits_b, logits_c))
    alpha = jnp.asarray(alpha, jnp.float32)
    if alpha.ndim:
        alpha = alpha[..., None]
    return a + alpha * (b - c)
