r"""Token selection and weighting on per-token arrays [B, T] (METHODS.md section 2).

Every function here takes per-token statistics (difficulty scores, entropies, per-token
divergences or cross-entropies, all [B, T]) and returns masks or weights of the same shape, so
it composes with the fused head+loss path, which produces [B, T] statistics without ever
building [B, T, V] logits. Static shapes throughout (METHODS.md 2.1): a selection is a boolean
mask built with ``jnp.where`` and sorting, never boolean indexing, so a ratio that changes during
training is a traced scalar and changes no shape; ``top_k_positions`` is the fixed-size gather
for callers that project only the kept hidden states.

Global batch: quantiles and "top fraction" ranks are computed over all valid tokens of the array
passed in. Under ``jit`` with a data-sharded batch that array is the *global* batch and XLA
inserts the collectives (an all-gather of the [B, T] scores, which is small next to the
activations); inside ``shard_map`` it would be the local shard, i.e. a per-shard selection.

Ranking convention (one helper, ``top_fraction_mask``): the n_keep = ceil(r * n_valid) valid
tokens with the largest score are kept; equal scores are broken by position (the earlier token
in row-major [B, T] order wins); invalid tokens are never kept. Masks carry no gradient; every
score, threshold and weight derived here is under ``stop_gradient``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from distill_jax.losses.tokens import apply_mask

# Relative slack on r * n so that e.g. 0.6 * 10 evaluated in float32 (6.0000002) keeps 6, not 7;
# past ~1e6 valid tokens the count is exact only to within one token (float32 products anyway).
_CEIL_SLACK = 1e-6


# ------------------------------------------------------------------------- shared primitives


def _valid(mask: jax.Array | None, shape: tuple[int, ...]) -> jax.Array:
    return jnp.ones(shape, bool) if mask is None else mask.astype(bool)


def _groups(x: jax.Array, per_row: bool) -> jax.Array:
    """[B, T] -> [G, N]: one group (global batch) or one group per row."""
    return x.reshape(-1, x.shape[-1]) if per_row and x.ndim > 1 else x.reshape(1, -1)


def _sort_key(scores: jax.Array, valid: jax.Array) -> jax.Array:
    """Ascending sort key: -score for valid tokens (finite), +inf for invalid ones.

    Valid keys are clipped to finite values (a score of +inf ranks first, -inf and NaN tie for
    last), so every valid token sorts before every invalid one; + 0.0 maps -0.0 to
    +0.0, so the two zeros tie and fall back to position order.
    """
    big = jnp.finfo(jnp.float32).max
    neg = jnp.nan_to_num(-scores.astype(jnp.float32) + 0.0, nan=big, posinf=big, neginf=-big)
    return jnp.where(valid, neg, jnp.inf)


def _sorted(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Stable ascending sort of each row of ``key`` [G, N]: (sorted keys, their positions)."""
    pos = jax.lax.broadcasted_iota(jnp.int32, key.shape, 1)
    return jax.lax.sort((key, pos), dimension=1, num_keys=1, is_stable=True)


def _n_keep(fraction, n_valid: jax.Array) -> jax.Array:
    """ceil(r * n) clipped to [0, n], with r a static or traced scalar; n: [G] int."""
    r = jnp.clip(jnp.asarray(fraction, jnp.float32), 0.0, 1.0)
    n = n_valid.astype(jnp.float32)
    return jnp.clip(jnp.ceil(r * n * (1.0 - _CEIL_SLACK)), 0.0, n).astype(jnp.int32)


def top_fraction_mask(
    scores: jax.Array, mask: jax.Array | None, fraction, *, per_row: bool = False
) -> jax.Array:
    r"""Keep the ceil(r * n_valid) valid tokens with the largest score; static shapes.

    The one selector behind AdaKD (LATF), TIP, Rho-1 and AdaSPEC. Ties are broken by position
    (earlier first), so the kept count is exact even when all scores are equal; invalid tokens
    are never kept. ``fraction`` may be traced (a controller value): it changes no shape and
    causes no retrace.

    Args:
        scores: [B, T] float, larger = more worth keeping (NaN ranks with -inf, last).
        mask: [B, T] bool or None (all valid).
        fraction: r in [0, 1], a float or a traced scalar (clipped to [0, 1]).
        per_row: rank within each row (n_valid per row) instead of over the whole batch.

    Returns:
        [B, T] bool, exactly ceil(r * n_valid) True entries (per row if ``per_row``).
    """
    valid = _valid(mask, scores.shape)
    v = _groups(valid, per_row)  # [G, N]
    key = _sort_key(_groups(jax.lax.stop_gradient(scores), per_row), v)
    sorted_key, sorted_pos = _sorted(key)
    n_keep = _n_keep(fraction, v.sum(axis=1))[:, None]  # [G, 1]
    # The last kept token (key_k, pos_k); a token is kept iff it sorts at or before it. A compare
    # against one gathered element instead of a scatter of ranks.
    last = jnp.maximum(n_keep - 1, 0)
    key_k = jnp.take_along_axis(sorted_key, last, axis=1)
    pos_k = jnp.take_along_axis(sorted_pos, last, axis=1)
    pos = jax.lax.broadcasted_iota(jnp.int32, key.shape, 1)
    keep = (key < key_k) | ((key == key_k) & (pos <= pos_k))
    return (keep & v & (n_keep > 0)).reshape(scores.shape)


def top_k_positions(
    scores: jax.Array, mask: jax.Array | None, n_keep: int
) -> tuple[jax.Array, jax.Array]:
    r"""Fixed-size gather indices: the ``n_keep`` highest-scoring valid positions of each row.

    For the memory-saving path of METHODS.md 2.1 (TIP): gather these hidden states, then apply
    the vocabulary projection to [B, K] positions only. Same order as ``top_fraction_mask``
    (score descending, ties by position); rows with fewer than K valid tokens are padded with
    invalid positions, flagged False.

    Args:
        scores: [B, T] float; mask: [B, T] bool or None.
        n_keep: K, a static int <= T (one compiled bucket per K).

    Returns:
        (positions [B, K] int32 in keep order, valid [B, K] bool).
    """
    valid = _valid(mask, scores.shape)
    sorted_key, sorted_pos = _sorted(_sort_key(jax.lax.stop_gradient(scores), valid))
    return sorted_pos[:, :n_keep], sorted_key[:, :n_keep] < jnp.inf  # [B, K] each


def masked_quantile(values: jax.Array, mask: jax.Array | None, q) -> jax.Array:
    r"""q-quantile over the valid tokens, NumPy's default "linear" rule; static shapes.

    Sorted valid values x_(0) <= ... <= x_(n-1); position h = q (n - 1);
    Q = x_(floor h) + (h - floor h) (x_(floor h + 1) - x_(floor h)). q = 0.5 is the median
    (mean of the two middle values for even n). Under ``stop_gradient``.

    Args:
        values: [B, T] float; mask: [B, T] bool or None.
        q: quantile in [0, 1], static or traced.

    Returns:
        float32 scalar; 0 when no token is valid.
    """
    valid = _valid(mask, values.shape).reshape(-1)
    x = jnp.sort(
        jnp.where(valid, jax.lax.stop_gradient(values).astype(jnp.float32).reshape(-1), jnp.inf)
    )
    n = valid.sum()
    h = jnp.clip(jnp.asarray(q, jnp.float32), 0.0, 1.0) * jnp.maximum(n - 1, 0).astype(jnp.float32)
    lo = jnp.floor(h).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, jnp.maximum(n - 1, 0))
    frac = h - lo.astype(jnp.float32)
    x_lo, x_hi = x[lo], x[hi]
    out = jnp.where(frac > 0, x_lo + frac * (x_hi - x_lo), x_lo)
    return jnp.where(n > 0, out, 0.0)


def quantile_mask(values: jax.Array, mask: jax.Array | None, q) -> jax.Array:
    """Valid tokens at or above the q-quantile of the valid values ([B, T] -> [B, T] bool)."""
    valid = _valid(mask, values.shape)
    return valid & (values >= masked_quantile(values, valid, q))


# --------------------------------------------------------------------- 2.2 AdaKD (LATF, IDTS)


def adakd_token_mask(
    scores: jax.Array, mask: jax.Array | None, ratio, *, per_row: bool = False
) -> jax.Array:
    r"""AdaKD LATF: train on the top fraction r of valid tokens by difficulty score.

    "LLM-Oriented Token-Adaptive Knowledge Distillation" (AAAI 2026), SassyRong/AdaKD
    ``loss/losses.py``. Default difficulty s_i = Hellinger(p_i, q_i) (``divergences.hellinger``);
    FKL, RKL, JSD, entropy or CE also work. Keeps ceil(r n_valid) tokens (the repo keeps
    max(1, floor(r n_valid))). ``ratio`` is usually ``AdaKDState.ratio`` (traced).

    Args:
        scores: [B, T] float difficulty; mask: [B, T] bool or None; ratio: r in [0, 1].
        per_row: rank within each row instead of over the batch.

    Returns:
        [B, T] bool selection.
    """
    return top_fraction_mask(scores, mask, ratio, per_row=per_row)


def adakd_review(
    key: jax.Array, selected: jax.Array, mask: jax.Array | None, review_prob
) -> jax.Array:
    r"""AdaKD "review": with probability ``review_prob`` use all valid tokens this step.

    One Bernoulli draw per call (per step), as the repo's ``review_ratio``
    (SassyRong/AdaKD ``loss/losses.py``, AAAI 2026).

    Args:
        key: PRNG key; selected: [B, T] bool (from ``adakd_token_mask``);
        mask: [B, T] bool or None; review_prob: probability in [0, 1], static or traced.

    Returns:
        [B, T] bool: ``mask`` (all valid) on a review step, else ``selected``.
    """
    review = jax.random.bernoulli(key, jnp.asarray(review_prob, jnp.float32))
    return jnp.where(review, _valid(mask, selected.shape), selected)


def idts_temperatures(
    scores: jax.Array,
    selected: jax.Array,
    *,
    base_temperature: float = 1.0,
    kappa: float = 0.6,
) -> jax.Array:
    r"""AdaKD IDTS: per-token temperatures from the score relative to the selected median.

    tau_i = tau_base exp(-kappa tanh(log(s_i / m))), m = median(s over selected tokens), so hard
    tokens (s_i > m) get tau_i < tau_base and tau_i lies in [tau_base e^-kappa, tau_base e^kappa].
    tanh(log x) is evaluated as (x^2 - 1) / (x^2 + 1), finite at s_i = 0. Use as the per-token
    ``temperature`` of both logit sets and weight the token loss by tau_i^2.
    "LLM-Oriented Token-Adaptive Knowledge Distillation" (AAAI 2026), SassyRong/AdaKD
    (kappa = 0.6 in its scripts, ``temperature_scale``; the function default there is 0.3; the
    repo's ``torch.median`` takes the lower middle value for even counts, here it is the mean).

    Args:
        scores: [B, T] float >= 0 difficulty; selected: [B, T] bool (validity included).
        base_temperature: tau_base > 0; kappa: strength >= 0.

    Returns:
        [B, T] float32 under ``stop_gradient``; tau_base outside ``selected`` or when m <= 0.
    """
    s = jax.lax.stop_gradient(scores).astype(jnp.float32)
    m = masked_quantile(s, selected, 0.5)
    rel = jnp.clip(jnp.where(m > 0, s / jnp.where(m > 0, m, 1.0), 1.0), 0.0, 1e18)
    tanh_log = (rel * rel - 1.0) / (rel * rel + 1.0)
    tau = base_temperature * jnp.exp(-kappa * tanh_log)
    return jnp.where(selected.astype(bool), tau, jnp.float32(base_temperature))


@struct.dataclass
class AdaKDState:
    """AdaKD's ratio controller state (LATF), carried in TrainState and checkpointed."""

    ratio: jax.Array  # float32 scalar, keep fraction r
    loss_ema: jax.Array  # float32, EMA of the distillation loss (NaN before the first update)
    ref_ema: jax.Array  # float32, EMA at the last ratio change (NaN until warm-up ends)
    step: jax.Array  # int32, updates seen


def adakd_init(ratio: float = 1.0) -> AdaKDState:
    """Initial controller state; AdaKD starts at r = 1.0. Every field its own buffer: the train
    state is donated to the step, and one buffer cannot be donated twice."""
    return AdaKDState(
        ratio=jnp.asarray(ratio, jnp.float32),
        loss_ema=jnp.full((), jnp.nan, jnp.float32),
        ref_ema=jnp.full((), jnp.nan, jnp.float32),
        step=jnp.asarray(0, jnp.int32),
    )


def adakd_update(
    state: AdaKDState,
    loss: jax.Array,
    *,
    ema_decay: float = 0.99,
    eps_loss: float = 0.1,
    eps_ratio: float = 0.1,
    warmup_steps: int = 0,
    update_every_steps: int = 1,
    min_ratio: float = 0.1,
    max_ratio: float = 1.0,
) -> AdaKDState:
    r"""One LATF controller step after an optimizer step (jit-able, no retrace as r moves).

    E = decay E + (1 - decay) L (E = L at the first call; a non-finite L leaves E unchanged,
    so one bad step cannot poison the controller). The first step after
    ``warmup_steps`` records ref = E; afterwards, every ``update_every_steps`` steps:
    E - ref > eps_L |ref| (loss rose)  -> r = min(max_ratio, r (1 + eps_r)), ref = E;
    ref - E > eps_L |ref| (loss fell)  -> r = max(min_ratio, r (1 - eps_r)), ref = E;
    otherwise nothing changes (ref stays the EMA at the last change, as in the repo).
    "LLM-Oriented Token-Adaptive Knowledge Distillation" (AAAI 2026), SassyRong/AdaKD
    ``distillation.py`` (there: checked every step, warm-up as a fraction of total steps).

    Args:
        state: ``AdaKDState``; loss: float scalar, the (global) distillation loss of the step.
        ema_decay, eps_loss, eps_ratio, min_ratio, max_ratio: static floats.
        warmup_steps, update_every_steps: static ints.

    Returns:
        The new ``AdaKDState``.
    """
    loss = jax.lax.stop_gradient(jnp.asarray(loss, jnp.float32))
    step = state.step + 1
    first = jnp.isnan(state.loss_ema)
    ema = jnp.where(first, loss, ema_decay * state.loss_ema + (1.0 - ema_decay) * loss)
    ema = jnp.where(jnp.isfinite(loss), ema, state.loss_ema)
    active = step > warmup_steps
    have_ref = ~jnp.isnan(state.ref_ema)
    check = active & have_ref & ((step - warmup_steps - 1) % update_every_steps == 0)
    tol = eps_loss * jnp.abs(state.ref_ema)
    rose = check & (ema - state.ref_ema > tol)
    fell = check & (state.ref_ema - ema > tol)
    r = state.ratio
    ratio = jnp.where(
        rose,
        jnp.minimum(max_ratio, r * (1 + eps_ratio)),
        jnp.where(fell, jnp.maximum(min_ratio, r * (1 - eps_ratio)), r),
    )
    ref = jnp.where((active & ~have_ref) | rose | fell, ema, state.ref_ema)
    return AdaKDState(ratio=ratio.astype(jnp.float32), loss_ema=ema, ref_ema=ref, step=step)


# ---------------------------------------------------------------- 2.3 TIP (entropy x divergence)


class TIPQuadrants(NamedTuple):
    """Four disjoint [B, T] bool masks whose union is the valid tokens."""

    high_entropy_high_divergence: jax.Array
    high_entropy_low_divergence: jax.Array
    low_entropy_high_divergence: jax.Array  # confident and wrong ("Q3" [unverified])
    low_entropy_low_divergence: jax.Array


def tip_quadrants(
    student_entropy: jax.Array,
    divergence: jax.Array,
    mask: jax.Array | None = None,
    *,
    entropy_quantile=0.5,
    divergence_quantile=0.5,
    entropy_threshold=None,
    divergence_threshold=None,
) -> TIPQuadrants:
    r"""TIP's entropy x divergence quadrants; "high" = at or above the threshold.

    Thresholds default to quantiles over the valid tokens (batch medians, ``[design]``) or are
    given directly. D is a teacher-student divergence, per-token RKL being the usual on-policy
    choice ``[unverified]``; the low-entropy/high-divergence quadrant is the one the paper calls
    Q3 per third-party summaries ``[unverified]`` (< 10% of tokens nearly match all-token
    on-policy KD). "TIP: Token Importance in On-Policy Distillation" (arXiv:2604.14084), built on
    HJSang/OPSD_OnPolicyDistillation.

    Args:
        student_entropy: [B, T] H_s = -sum_v q_v log q_v; divergence: [B, T] D.
        mask: [B, T] bool or None.
        entropy_quantile, divergence_quantile: used when the threshold is None.
        entropy_threshold, divergence_threshold: fixed thresholds (float or traced) or None.

    Returns:
        ``TIPQuadrants`` of [B, T] bool masks, False at invalid tokens.
    """
    valid = _valid(mask, student_entropy.shape)
    if entropy_threshold is None:
        entropy_threshold = masked_quantile(student_entropy, valid, entropy_quantile)
    if divergence_threshold is None:
        divergence_threshold = masked_quantile(divergence, valid, divergence_quantile)
    high_h = student_entropy >= jax.lax.stop_gradient(entropy_threshold)
    high_d = divergence >= jax.lax.stop_gradient(divergence_threshold)
    return TIPQuadrants(
        high_entropy_high_divergence=valid & high_h & high_d,
        high_entropy_low_divergence=valid & high_h & ~high_d,
        low_entropy_high_divergence=valid & ~high_h & high_d,
        low_entropy_low_divergence=valid & ~high_h & ~high_d,
    )


def tip_entropy_mask(
    student_entropy: jax.Array, mask: jax.Array | None, fraction=0.5, *, per_row: bool = False
) -> jax.Array:
    r"""TIP: keep the top ``fraction`` of valid tokens by *student* entropy (deterministic top-k).

    "TIP: Token Importance in On-Policy Distillation" (arXiv:2604.14084) keeps 50% by student
    entropy with entropy-based *sampling* (``tip_entropy_sample``); this is the top-k variant.

    Args:
        student_entropy: [B, T]; mask: [B, T] bool or None; fraction: static or traced.
        per_row: rank within each row instead of over the batch (TIP's choice ``[unverified]``).

    Returns:
        [B, T] bool.
    """
    return top_fraction_mask(student_entropy, mask, fraction, per_row=per_row)


def tip_entropy_sample(
    key: jax.Array,
    student_entropy: jax.Array,
    mask: jax.Array | None,
    fraction=0.5,
    *,
    per_row: bool = False,
) -> jax.Array:
    r"""TIP: sample ceil(r n_valid) valid tokens without replacement, P proportional to H_s.

    Gumbel top-k: keep the top fraction of log H_i + G_i, G_i ~ Gumbel(0, 1), which samples
    without replacement with probability proportional to H_i (tokens with H_i = 0 only fill up
    the count). TIP's abstract: "retaining 50% of tokens with entropy-based sampling" of the
    student's entropy; the sampling law is ``[unverified]``. (arXiv:2604.14084)

    Args:
        key: PRNG key; student_entropy: [B, T] >= 0; mask: [B, T] bool or None;
        fraction: static or traced; per_row: sample within each row.

    Returns:
        [B, T] bool with exactly ceil(r n_valid) True entries.
    """
    h = jax.lax.stop_gradient(student_entropy).astype(jnp.float32)
    log_h = jnp.where(h > 0, jnp.log(jnp.where(h > 0, h, 1.0)), -jnp.inf)
    return top_fraction_mask(
        log_h + jax.random.gumbel(key, h.shape), mask, fraction, per_row=per_row
    )


# ---------------------------------------------------------------------------------- 2.4 TSD-KD


def tsd_confidence_weights(
    student_entropy: jax.Array, teacher_entropy: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    r"""TSD-KD relative-confidence weights w_t = sigmoid(H(q_t) - H(p_t)), stop-gradient.

    High where the student is less confident than the teacher; 0.5 at equal entropies. Multiplies
    the per-token direct term (GJSD, beta = 0.9). "Explain in Your Own Words: Token-Selective
    Dual KD" (ICLR 2026), kmswin1/TSD-KD ``DistillTrainer.py``.

    Args:
        student_entropy: [B, T] H(q_t); teacher_entropy: [B, T] H(p_t);
        mask: [B, T] bool or None.

    Returns:
        [B, T] float32 in (0, 1), zero at invalid tokens.
    """
    gap = student_entropy.astype(jnp.float32) - teacher_entropy.astype(jnp.float32)
    return apply_mask(jax.lax.stop_gradient(jax.nn.sigmoid(gap)), mask)


def tsd_entropy_penalty_mask(
    student_entropy: jax.Array, mask: jax.Array | None, *, quantile=0.1
) -> jax.Array:
    r"""TSD-KD: the valid tokens whose student entropy is at or above its 0.1 quantile.

    "Explain in Your Own Words: Token-Selective Dual KD" (ICLR 2026),
    kmswin1/TSD-KD ``DistillTrainer.py``. Also UniSD's optional top-entropy-quantile mask.

    Returns:
        [B, T] bool.
    """
    return quantile_mask(student_entropy, mask, quantile)


def tsd_entropy_penalty(
    student_entropy: jax.Array, mask: jax.Array | None, *, quantile=0.1
) -> jax.Array:
    r"""TSD-KD entropy penalty, per token: H(q_t) on the penalised tokens, 0 elsewhere.

    The loss term is mean_t H(q_t) over ``tsd_entropy_penalty_mask`` tokens: reduce with
    ``masked_sum_and_count(penalty, tsd_entropy_penalty_mask(...))``. The gradient flows through
    H(q_t); the threshold is a constant. "Explain in Your Own Words: Token-Selective Dual
    KD" (ICLR 2026), kmswin1/TSD-KD.

    Args:
        student_entropy: [B, T] H(q_t) (differentiable); mask: [B, T] bool or None.

    Returns:
        [B, T] float32.
    """
    keep = tsd_entropy_penalty_mask(student_entropy, mask, quantile=quantile)
    return jnp.where(keep, student_entropy.astype(jnp.float32), 0.0)


# ---------------------------------------------------------------------------------- 2.5 Rho-1


def rho1_excess_loss(
    student_ce: jax.Array, reference_ce: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    r"""Rho-1 excess loss score_i = CE_student(x_i) - CE_ref(x_i), stop-gradient.

    "Rho-1: Not All Tokens Are What You Need" (Lin et al., NeurIPS 2024, arXiv:2404.07965);
    the reference model is trained on high-quality data.

    Args:
        student_ce: [B, T] per-token NLL of the student (``tokens.cross_entropy``);
        reference_ce: [B, T] per-token NLL of the reference; mask: [B, T] bool or None.

    Returns:
        [B, T] float32, zero at invalid tokens.
    """
    excess = student_ce.astype(jnp.float32) - reference_ce.astype(jnp.float32)
    return apply_mask(jax.lax.stop_gradient(excess), mask)


def rho1_token_mask(
    student_ce: jax.Array,
    reference_ce: jax.Array,
    mask: jax.Array | None,
    keep_ratio,
    *,
    per_row: bool = False,
) -> jax.Array:
    r"""Rho-1: train only on the top ``keep_ratio`` of valid tokens by excess loss.

    Paper ratio ~60-70% ``[unverified]``. Ties (e.g. reference == student, all scores 0) keep the
    earliest positions, so exactly ceil(k n_valid) tokens are kept. "Rho-1: Not All Tokens Are
    What You Need" (Lin et al., NeurIPS 2024, arXiv:2404.07965).

    Args:
        student_ce, reference_ce: [B, T]; mask: [B, T] bool or None;
        keep_ratio: k in [0, 1], static or traced; per_row: rank within each row.

    Returns:
        [B, T] bool.
    """
    scores = rho1_excess_loss(student_ce, reference_ce, mask)
    return top_fraction_mask(scores, mask, keep_ratio, per_row=per_row)


# -------------------------------------------------------------------------------- 2.6 AdaSPEC


def adaspec_delta(
    draft_kl: jax.Array, reference_kl: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    r"""AdaSPEC score delta_t = KL(p_target || q_draft) - KL(p_target || q_ref), stop-gradient.

    Large where the draft is much worse than the reference (a model with the draft's init that
    was distilled first); tokens where the reference is as bad as the draft score ~0 and are
    dropped first. "AdaSPEC: Selective KD for Efficient Speculative Decoders"
    (NeurIPS 2025), yuezhouhu/adaspec.

    Args:
        draft_kl: [B, T] per-token FKL of the draft (``divergences.forward_kl``);
        reference_kl: [B, T] per-token FKL of the reference; mask: [B, T] bool or None.

    Returns:
        [B, T] float32, zero at invalid tokens.
    """
    delta = draft_kl.astype(jnp.float32) - reference_kl.astype(jnp.float32)
    return apply_mask(jax.lax.stop_gradient(delta), mask)


def adaspec_token_mask(
    draft_kl: jax.Array,
    reference_kl: jax.Array,
    mask: jax.Array | None,
    keep_fraction,
    *,
    per_row: bool = False,
) -> jax.Array:
    r"""AdaSPEC: keep tokens with delta_t >= quantile_{1-k}(delta over valid tokens).

    Implemented as the top ceil(k n_valid) tokens by delta (ties by position), so the kept
    fraction is k exactly; with distinct deltas this is the quantile rule up to the quantile's
    interpolation convention (at most one token). Loss = mean draft FKL over the kept tokens.
    Default k ``[unverified]``. "AdaSPEC: Selective KD for Efficient Speculative
    Decoders" (NeurIPS 2025), yuezhouhu/adaspec.

    Args:
        draft_kl, reference_kl: [B, T]; mask: [B, T] bool or None;
        keep_fraction: k in [0, 1], static or traced; per_row: rank within each row.

    Returns:
        [B, T] bool.
    """
    delta = adaspec_delta(draft_kl, reference_kl, mask)
    return top_fraction_mask(delta, mask, keep_fraction, per_row=per_row)


# --------------------------------------------------------------------- 2.7 divergence clipping


def clip_per_token(
    per_token: jax.Array, mask: jax.Array | None = None, *, cap=None, quantile=None
) -> jax.Array:
    r"""Per-token clipping l_i' = min(l_i, c) after the vocabulary sum, before weighting.

    c is a fixed ``cap`` (UniSD static, 10.0) or c = stopgrad(quantile_q(l over valid tokens))
    (UniSD, q = 0.99) over the batch passed in. Tokens with l_i > c get the constant c and so
    zero gradient; l_i = c keeps its gradient, so q = 1 is the identity in value and gradient.
    Ahren09/UniSD ("JSD-Clip"); siyan-zhao/OPSD (point-wise per-token KL clipping).

    Args:
        per_token: [B, T] float per-token divergence.
        mask: [B, T] bool or None; invalid tokens give 0 and do not enter the quantile.
        cap: fixed c (float or traced), or None.
        quantile: q in [0, 1] (float or traced), or None. Exactly one of cap / quantile.

    Returns:
        [B, T] float32.
    """
    if (cap is None) == (quantile is None):
        raise ValueError("clip_per_token: give exactly one of cap= or quantile=.")
    x = per_token.astype(jnp.float32)
    if cap is None:
        c = masked_quantile(x, mask, quantile)
    else:
        c = jax.lax.stop_gradient(jnp.asarray(cap, jnp.float32))
    return apply_mask(jnp.where(x > c, c, x), mask)
