r"""Per-token divergences between the teacher distribution p and the student distribution q.

p = softmax(z_t / tau), q = softmax(z_s / tau), both in float32 (METHODS.md section 1). Each
divergence exists twice:

* a *core* on log-probabilities, ``core(logq, logp, **knobs)``: [..., V] float32 -> [...]. The
  fused head+loss (``fused.py``) and the sparse teacher (``topk.py``) apply the same cores to
  token chunks or to top-k supports, which is why fused equals unfused by construction;
* a public function on logits, ``fn(student_logits, teacher_logits, mask=None, *, temperature=1.0,
  vocab_mask=None, **knobs) -> [...]``: per-token values, zero where ``mask`` is False, not reduced.

Directions are fixed by the argument names (DESIGN.md): ``forward_kl`` = KL(p || q) (mode
covering), ``reverse_kl`` = KL(q || p) (mode seeking). No tau^2 factor appears here;
``train/objective.py`` applies it once. ``sinkhorn`` and ``multilevel_ot`` (defined in
``transport.py``, re-exported here) couple the tokens of a batch (optimal transport between two
point clouds) and so have no per-position core; they still return per-token values (see their
docstrings).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct

from distill_jax.losses.tokens import (
    NEG_INF,
    apply_mask,
    entropy_from_log_probs,
    log_probs,
    logaddexp,
    masked_logits,
    masked_temperature,
    xlogy_ratio,
)
from distill_jax.losses.transport import (  # noqa: F401  (re-exported: the OT losses)
    multilevel_ot,
    ot_token_costs,
    sinkhorn,
    sinkhorn_from_gram,
    sinkhorn_log_plan,
)

# ------------------------------------------------------------------- cores on log-probabilities
# Every core: (logq [..., V], logp [..., V], **knobs) -> [...] float32. Student first, teacher
# second, as in the public signatures.


def kl_core(logq: jax.Array, logp: jax.Array) -> jax.Array:
    """KL(p || q) = sum_v p_v (log p_v - log q_v)."""
    return jnp.sum(xlogy_ratio(logp, logq), axis=-1)


def reverse_kl_core(logq: jax.Array, logp: jax.Array) -> jax.Array:
    """KL(q || p) = sum_v q_v (log q_v - log p_v)."""
    return jnp.sum(xlogy_ratio(logq, logp), axis=-1)


def _is_static(x) -> bool:
    return isinstance(x, int | float)


def _log_mixture(log_a, log_b, weight_a):
    """log(w a + (1 - w) b) from log a, log b; w in [0, 1] (static or traced)."""
    w = jnp.asarray(weight_a, jnp.float32)
    log_w = jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)), NEG_INF)
    log_1mw = jnp.where(w < 1, jnp.log1p(-jnp.where(w < 1, w, 0.0)), NEG_INF)
    return logaddexp(log_w + log_a, log_1mw + log_b)


def jsd_core(logq, logp, beta=0.5, normalize: bool = False):
    """Generalized JSD of TRL's GKD trainer: m = beta p + (1 - beta) q,
    J = beta KL(p || m) + (1 - beta) KL(q || m); beta = 0 -> KL(p || q), beta = 1 -> KL(q || p).

    ``normalize`` divides the interior by beta (1 - beta), which is continuous with the two
    endpoints (METHODS.md 1.3, [design]); TRL's own endpoints jump by about 1/beta.
    """
    if _is_static(beta):
        if beta == 0:
            return kl_core(logq, logp)
        if beta == 1:
            return reverse_kl_core(logq, logp)
        if not 0 < beta < 1:
            raise ValueError(f"jsd: beta={beta} must lie in [0, 1].")
    b = jnp.clip(jnp.asarray(beta, jnp.float32), 1e-12, 1.0 - 1e-7)
    log_m = _log_mixture(logp, logq, b)
    j = b * kl_core(log_m, logp) + (1 - b) * kl_core(log_m, logq)
    if normalize:
        j = j / (b * (1 - b))
    if _is_static(beta):
        return j
    beta = jnp.asarray(beta, jnp.float32)  # a scheduled beta may hit the endpoints
    return jnp.where(
        beta <= 0, kl_core(logq, logp), jnp.where(beta >= 1, reverse_kl_core(logq, logp), j)
    )


def skew_kl_core(logq, logp, alpha=0.1):
    """KL(p || alpha p + (1 - alpha) q) (DistiLLM); bounded by -log alpha."""
    return kl_core(_log_mixture(logp, logq, alpha), logp)


def skew_reverse_kl_core(logq, logp, alpha=0.1):
    """KL(q || alpha q + (1 - alpha) p) (DistiLLM)."""
    return kl_core(_log_mixture(logq, logp, alpha), logq)


def tvd_core(logq, logp):
    """0.5 sum_v |p_v - q_v| = 1 - sum_v min(p_v, q_v)."""
    return 0.5 * jnp.sum(jnp.abs(jnp.exp(logp) - jnp.exp(logq)), axis=-1)


def _safe_sqrt(x):
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


def hellinger_core(logq, logp):
    """H = sqrt(0.5 sum_v (sqrt p_v - sqrt q_v)^2) in [0, 1]; sqrt p = exp(log p / 2)."""
    d = jnp.exp(0.5 * logp) - jnp.exp(0.5 * logq)
    return _safe_sqrt(0.5 * jnp.sum(d * d, axis=-1))


def _pow_expm1_over(c: float, s: float, lp: jax.Array, r: jax.Array) -> jax.Array:
    """p^s (e^(c r) - 1) / c (p^s r at c = 0) without cancellation or overflow.

    Where c r is large, e^(c r) alone would overflow although p^s e^(c r) is a plain power of
    p and q; there the product is formed in the exponent instead.
    """
    ps = jnp.exp(s * lp)
    if c == 0:
        return ps * r
    x = c * r
    big = x > 30.0
    moderate = ps * jnp.expm1(jnp.where(big, 0.0, x)) / c
    direct = (jnp.exp(s * lp + jnp.where(big, x, 0.0)) - ps) / c
    return jnp.where(big, direct, moderate)


def ab_core(logq, logp, alpha=1.0, beta=1.0):
    """Alpha-beta divergence (Cichocki, Cruces & Amari, 2011), with its limits.

    D = -1/(al be) sum_v [p^al q^be - al/(al+be) p^(al+be) - be/(al+be) q^(al+be)];
    (1, 0) -> KL(p || q), (0, 1) -> KL(q || p), (0.5, 0.5) -> 4 H^2, (1, 1) -> 0.5 ||p - q||^2.

    Evaluated as p^s [h(s) - h(be)] / al with r = log q - log p, s = al + be and
    h(c) = (e^(c r) - 1) / c (``_pow_expm1_over``), the same sum without its cancellation: the
    limits be -> 0, al + be -> 0 and al = be = 0 (0.5 r^2) come out of the same expression. The
    definition is symmetric under (p, al) <-> (q, be); the larger |al|, |be| is put in front so
    that nothing small is divided. ``alpha`` and ``beta`` are static floats.
    """
    al, be, lp, lq = float(alpha), float(beta), logp, logq
    if abs(be) > abs(al):
        al, be, lp, lq = be, al, lq, lp
    s = al + be
    pz, qz = lp == NEG_INF, lq == NEG_INF
    live = ~(pz & qz)
    finite = ~(pz | qz)
    r = jnp.where(finite, lq - lp, 0.0)
    if al == 0:  # al = be = 0
        terms = 0.5 * r * r
    else:
        lp0 = jnp.where(finite, lp, 0.0)
        terms = (_pow_expm1_over(s, s, lp0, r) - _pow_expm1_over(be, s, lp0, r)) / al
    # One side has zero mass: the sum's own limit (finite only for positive powers).
    only_q = jnp.exp(s * jnp.where(qz, 0.0, lq)) / (al * s) if s > 0 else jnp.inf
    only_p = jnp.exp(s * jnp.where(pz, 0.0, lp)) / (be * s) if be > 0 and s > 0 else jnp.inf
    terms = jnp.where(finite, terms, jnp.where(pz, only_q, only_p))
    return jnp.sum(jnp.where(live, terms, 0.0), axis=-1)


def akl_core(logq, logp, mu=0.5, eps=1e-12):
    """Adaptive KL (Wu et al., 2024): head/tail-weighted mix of forward and reverse KL.

    Sort p ascending; the tail is where the cumulative teacher mass is < mu. With
    g_head = sum_head |p - q| and g_tail = sum_tail |p - q| (stop-gradient),
    AKL = g_head / (g_head + g_tail) KL(p || q) + g_tail / (g_head + g_tail) KL(q || p).
    """
    p, q = jnp.exp(logp), jnp.exp(logq)
    order = jnp.argsort(p, axis=-1)
    p_sorted = jnp.take_along_axis(p, order, axis=-1)
    gap = jnp.abs(p_sorted - jnp.take_along_axis(q, order, axis=-1))
    tail = jnp.cumsum(p_sorted, axis=-1) < mu
    g_head = jax.lax.stop_gradient(jnp.sum(jnp.where(tail, 0.0, gap), axis=-1))
    g_tail = jax.lax.stop_gradient(jnp.sum(jnp.where(tail, gap, 0.0), axis=-1))
    total = g_head + g_tail + eps
    return g_head / total * kl_core(logq, logp) + g_tail / total * reverse_kl_core(logq, logp)


def todi_core(logq, logp):
    """ToDi (EMNLP 2025): per-entry mix w_v KL-term(p, q) + (1 - w_v) KL-term(q, p),
    w_v = sigmoid(log p_v - log q_v) (stop-gradient). The value equals FKL + RKL; the gradient
    does not."""
    live = (logp > NEG_INF) & (logq > NEG_INF)
    w = jax.nn.sigmoid(jnp.where(live, logp - logq, jnp.where(logp > NEG_INF, 1e4, -1e4)))
    w = jax.lax.stop_gradient(w)
    return jnp.sum(w * xlogy_ratio(logp, logq) + (1 - w) * xlogy_ratio(logq, logp), axis=-1)


def taid_core(logq, logp, t=0.4):
    """TAID (Shing et al., ICLR 2025): cross-entropy to an interpolated target.

    p_t = softmax((1 - t) stopgrad(log q) + t log p); value -sum_v p_t(v) log q(v), the form the
    TAID code optimises (= KL(p_t || q) + H(p_t); H(p_t) carries no gradient). At t = 0 the
    gradient is exactly zero; at t = 1 it is CE(p, q).
    """
    t = jnp.asarray(t, jnp.float32)
    sq = jax.lax.stop_gradient(logq)
    live = (sq > NEG_INF) & (logp > NEG_INF)
    mixed = jnp.where(live, (1 - t) * jnp.where(live, sq, 0.0) + t * jnp.where(live, logp, 0.0), 0)
    log_pt = jax.nn.log_softmax(jnp.where(live, mixed, NEG_INF), axis=-1)
    return entropy_from_log_probs(log_pt) + kl_core(logq, log_pt)


# Per-position divergences by name: the registry fused.py and topk.py dispatch through.
CORES: dict[str, Callable[..., jax.Array]] = {
    "forward_kl": kl_core,
    "reverse_kl": reverse_kl_core,
    "jsd": jsd_core,
    "skew_kl": skew_kl_core,
    "skew_reverse_kl": skew_reverse_kl_core,
    "tvd": tvd_core,
    "hellinger": hellinger_core,
    "ab": ab_core,
    "akl": akl_core,
    "todi": todi_core,
    "taid": taid_core,
}


def get_core(name: str) -> Callable[..., jax.Array]:
    """The log-prob core of a per-position divergence; a clear error for unknown names."""
    if name not in CORES:
        hint = (
            f" ({name} couples tokens; call divergences.{name})"
            if name in ("sinkhorn", "multilevel_ot")
            else ""
        )
        raise ValueError(
            f"Unknown per-position divergence {name!r}{hint}; choose one of {sorted(CORES)}."
        )
    return CORES[name]


def _per_token(core, student_logits, teacher_logits, mask, temperature, vocab_mask, **knobs):
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {student_logits.shape} and teacher_logits {teacher_logits.shape} "
            "must have the same shape; teachers with another vocabulary need a bridge "
            "(distill_jax.bridges)."
        )
    # Masked positions are cleared before the arithmetic (tokens.masked_logits): a -inf or +inf
    # logit there would otherwise send NaN back through the core's gradient.
    student_logits = masked_logits(student_logits, mask)
    teacher_logits = masked_logits(teacher_logits, mask)
    temperature = masked_temperature(temperature, mask)
    logq = log_probs(student_logits, temperature, vocab_mask)
    logp = jax.lax.stop_gradient(log_probs(teacher_logits, temperature, vocab_mask))
    return apply_mask(core(logq, logp, **knobs), mask)


# ----------------------------------------------------------------------- public, on logits
# Shared argument doc: student_logits, teacher_logits [..., V] float (any dtype; the teacher is
# a constant); mask [...] bool or None (masked positions give 0); temperature tau > 0, scalar or
# [...]; vocab_mask [V] bool or None (False = padded vocabulary row, logit -inf on both sides).
# Each returns [...] float32, not reduced.


def forward_kl(student_logits, teacher_logits, mask=None, *, temperature=1.0, vocab_mask=None):
    r"""KL(p || q), mode covering (Hinton et al., 2015, arXiv:1503.02531).

    Gradient w.r.t. the student logits at tau = 1 is q - p.
    """
    return _per_token(kl_core, student_logits, teacher_logits, mask, temperature, vocab_mask)


def reverse_kl(student_logits, teacher_logits, mask=None, *, temperature=1.0, vocab_mask=None):
    r"""KL(q || p), mode seeking (MiniLLM, Gu et al., 2024, arXiv:2306.08543)."""
    return _per_token(
        reverse_kl_core, student_logits, teacher_logits, mask, temperature, vocab_mask
    )


def jsd(
    student_logits,
    teacher_logits,
    mask=None,
    *,
    temperature=1.0,
    vocab_mask=None,
    beta=0.5,
    normalize=False,
):
    r"""Generalized Jensen-Shannon divergence with TRL GKD semantics (Agarwal et al., ICLR 2024).

    m = beta p + (1 - beta) q; J = beta KL(p || m) + (1 - beta) KL(q || m). beta = 0 returns
    KL(p || q) and beta = 1 returns KL(q || p), as ``trl``'s ``generalized_jsd_loss`` does.
    ``beta`` may be traced (a schedule); ``normalize`` divides by beta (1 - beta).
    """
    return _per_token(
        jsd_core,
        student_logits,
        teacher_logits,
        mask,
        temperature,
        vocab_mask,
        beta=beta,
        normalize=normalize,
    )


def skew_kl(
    student_logits, teacher_logits, mask=None, *, temperature=1.0, vocab_mask=None, alpha=0.1
):
    r"""Skew KL, KL(p || alpha p + (1 - alpha) q) (DistiLLM, Ko et al., ICML 2024)."""
    return _per_token(
        skew_kl_core, student_logits, teacher_logits, mask, temperature, vocab_mask, alpha=alpha
    )


def skew_reverse_kl(
    student_logits, teacher_logits, mask=None, *, temperature=1.0, vocab_mask=None, alpha=0.1
):
    r"""Skew reverse KL, KL(q || alpha q + (1 - alpha) p) (DistiLLM, Ko et al., ICML 2024)."""
    return _per_token(
        skew_reverse_kl_core,
        student_logits,
        teacher_logits,
        mask,
        temperature,
        vocab_mask,
        alpha=alpha,
    )


def tvd(student_logits, teacher_logits, mask=None, *, temperature=1.0, vocab_mask=None):
    r"""Total variation 0.5 sum |p - q| (DistillSpec, Zhou et al., ICLR 2024)."""
    return _per_token(tvd_core, student_logits, teacher_logits, mask, temperature, vocab_mask)


def hellinger(student_logits, teacher_logits, mask=None, *, temperature=1.0, vocab_mask=None):
    r"""Hellinger distance sqrt(0.5 sum (sqrt p - sqrt q)^2) (AdaKD's token difficulty)."""
    return _per_token(hellinger_core, student_logits, teacher_logits, mask, temperature, vocab_mask)


def ab(
    student_logits,
    teacher_logits,
    mask=None,
    *,
    temperature=1.0,
    vocab_mask=None,
    alpha=1.0,
    beta=1.0,
):
    r"""Alpha-beta divergence D_AB(p || q) (Cichocki et al., 2011; ABKD, ICML 2025)."""
    return _per_token(
        ab_core,
        student_logits,
        teacher_logits,
        mask,
        temperature,
        vocab_mask,
        alpha=alpha,
        beta=beta,
    )


def akl(student_logits, teacher_logits, mask=None, *, temperature=1.0, vocab_mask=None, mu=0.5):
    r"""Adaptive head/tail KL (Wu et al., 2024, "Rethinking KL Divergence in KD for LLMs")."""
    return _per_token(
        akl_core, student_logits, teacher_logits, mask, temperature, vocab_mask, mu=mu
    )


def todi(student_logits, teacher_logits, mask=None, *, temperature=1.0, vocab_mask=None):
    r"""ToDi per-vocabulary-entry FKL/RKL mix (EMNLP 2025)."""
    return _per_token(todi_core, student_logits, teacher_logits, mask, temperature, vocab_mask)


def taid(student_logits, teacher_logits, mask=None, *, temperature=1.0, vocab_mask=None, t=0.4):
    r"""TAID loss at interpolation ``t`` (a scalar, usually ``TAIDState.t``); see ``taid_core``."""
    return _per_token(taid_core, student_logits, teacher_logits, mask, temperature, vocab_mask, t=t)


# ------------------------------------------------------------------------------- TAID state


@struct.dataclass
class TAIDState:
    """TAID's adaptive interpolation state, carried in TrainState: t, momentum, previous loss."""

    t: jax.Array
    momentum: jax.Array
    prev_loss: jax.Array  # NaN before the first update


def taid_init(t_start: float = 0.4) -> TAIDState:
    return TAIDState(
        t=jnp.asarray(t_start, jnp.float32),
        momentum=jnp.zeros((), jnp.float32),
        prev_loss=jnp.asarray(jnp.nan, jnp.float32),
    )


def taid_update(
    state: TAIDState,
    loss: jax.Array,
    step: jax.Array,
    total_steps: int,
    *,
    t_start: float = 0.4,
    t_end: float = 1.0,
    alpha: float = 5e-4,
    beta: float = 0.99,
    adaptive: bool = True,
) -> TAIDState:
    """One TAID controller step after an optimizer step (SakanaAI/TAID, ICLR 2025).

    rel = (J_prev - J) / (J_prev + 1e-15); mom = beta mom + (1 - beta) rel;
    t = min(t_end, max(t_lin(step), t + alpha sigmoid(mom) (1 - t))), with t_lin linear from
    t_start to t_end over ``total_steps``. ``adaptive=False`` follows t_lin only. The first call
    (no J_prev) moves t to t_lin and records J.
    """
    loss = jnp.asarray(loss, jnp.float32)
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 0.0, 1.0)
    t_lin = t_start + (t_end - t_start) * frac
    if not adaptive:
        return state.replace(t=jnp.minimum(t_end, t_lin), prev_loss=loss)
    first = jnp.isnan(state.prev_loss)
    rel = jnp.where(first, 0.0, (state.prev_loss - loss) / (state.prev_loss + 1e-15))
    momentum = jnp.where(first, state.momentum, beta * state.momentum + (1 - beta) * rel)
    target = state.t + alpha * jax.nn.sigmoid(momentum) * (1 - state.t)
    target = jnp.where(first, state.t, target)
    t = jnp.minimum(t_end, jnp.maximum(t_lin, target))
    return TAIDState(t=t, momentum=momentum, prev_loss=loss)


# --------------------------------------------------------------------------------- dispatch

DIVERGENCES: dict[str, Callable[..., jax.Array]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
    "hellinger": hellinger,
    "ab": ab,
    "akl": akl,
    "todi": todi,
    "taid": taid,
    "sinkhorn": sinkhorn,
    "multilevel_ot": multilevel_ot,
}


def divergence(name: str, student_logits, teacher_logits, mask=None, *, temperature=1.0, **knobs):
    """``DIVERGENCES[name](student_logits, teacher_logits, mask, temperature=..., **knobs)``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if name not in DIVERGENCES:
        raise ValueError(f"Unknown divergence {name!r}; choose one of {sorted(DIVERGENCES)}.")
    return DIVERGENCES[name](student_logits, teacher_logits, mask, temperature=temperature, **knobs)
