r"""Sequence-level and ranking objectives: token and sequence log-probs, DPO with the teacher as
reference, REDI, TSD-KD's ListMLE and its early-position mask, and DistiLLM-2's two-sided skew KL
with its per-sample skew (METHODS.md 2.4, 4.6-4.8).

Per-token functions return [B, T] float32 (zero where ``mask`` is False); per-sequence ones
return [B] float32. Nothing is reduced over the batch. Teacher inputs are constants.

In the trainer these are the pair terms ``dpo``, ``redi`` and ``distillm2``
(``train/pair_terms.py``) on ``config.data.source="pairs"`` (``data.pairs``): the pairs.jsonl
that ``--mode=seqkd`` writes holds teacher-positive vs teacher-negative traces of one problem
(REDI's data); DistiLLM-2's paper uses teacher responses as chosen and the student's own
responses as rejected.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from distill_jax.losses.divergences import skew_kl, skew_reverse_kl
from distill_jax.losses.tokens import apply_mask, cross_entropy, masked_logits


def token_logprobs(
    logits: jax.Array,
    targets: jax.Array,
    mask: jax.Array | None = None,
    *,
    vocab_mask: jax.Array | None = None,
) -> jax.Array:
    r"""log softmax(z)[y] per token, in float32 (the negative of ``tokens.cross_entropy``).

    Args:
        logits: [B, T, V] float, the prediction for each target.
        targets: [B, T] int token ids (already shifted: ``targets[:, t]`` follows position t).
        mask: [B, T] bool or None; masked positions give 0 (their targets may be anything).
        vocab_mask: [V] bool or None.

    Returns:
        [B, T] float32 <= 0.
    """
    return -cross_entropy(logits, targets, mask, vocab_mask=vocab_mask)


def sequence_logprobs(token_logprobs: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    r"""log pi(y | x) = sum_t m_t log pi(y_t | x, y_<t); [B, T] -> [B] float32."""
    return jnp.sum(apply_mask(token_logprobs.astype(jnp.float32), mask), axis=-1)


def dpo_margin(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    teacher_chosen: jax.Array,
    teacher_rejected: jax.Array,
) -> jax.Array:
    r"""[log pi(y_w) - log pi_T(y_w)] - [log pi(y_l) - log pi_T(y_l)]; [B] x 4 -> [B] float32.

    The teacher log-probs are constants. Source: LLaVA-MoD (ICLR 2025); METHODS.md 4.7.
    """
    f32 = lambda x: x.astype(jnp.float32)
    tc, tr = (jax.lax.stop_gradient(f32(x)) for x in (teacher_chosen, teacher_rejected))
    return (f32(policy_chosen) - tc) - (f32(policy_rejected) - tr)


def dpo_with_teacher_reference(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    teacher_chosen: jax.Array,
    teacher_rejected: jax.Array,
    *,
    beta: float = 0.1,
) -> jax.Array:
    r"""DPO with the frozen teacher as the reference model: -log sigmoid(beta * margin).

    margin = [log pi(y_w|x) - log pi_T(y_w|x)] - [log pi(y_l|x) - log pi_T(y_l|x)] (``dpo_margin``),
    with sequence log-probs summed over completion tokens (``sequence_logprobs``) and pi_T the
    teacher (same tokenizer). pi = pi_T gives log 2.

    Source: "LLaVA-MoD: Making LLaVA Tiny via MoE Knowledge Distillation" (ICLR 2025), stage 2
    preference distillation (shufangxun/LLaVA-MoD); DPO: Rafailov et al., 2023, arXiv:2305.18290.
    METHODS.md 4.7; the LLaVA-MoD beta is `[unverified]`, 0.1 is DPO's default.

    Args:
        policy_chosen, policy_rejected: [B] student sequence log-probs of y_w, y_l.
        teacher_chosen, teacher_rejected: [B] teacher sequence log-probs, constants.
        beta: inverse temperature > 0.

    Returns:
        [B] float32 > 0.
    """
    margin = dpo_margin(policy_chosen, policy_rejected, teacher_chosen, teacher_rejected)
    return -jax.nn.log_sigmoid(beta * margin)


def redi_loss(
    chosen_logp_sum: jax.Array,
    chosen_len: jax.Array,
    rejected_logp_sum: jax.Array,
    rejected_len: jax.Array,
    *,
    c_pos: float = 1.0,
    c_neg: float = 0.8,
) -> jax.Array:
    r"""REDI stage-2 loss -c_pos log pi(y+|x) / |y+| + c_neg log pi(y-|x) / |y-|.

    Length-normalised log-likelihoods of a positive and a negative teacher trace, no reference
    model; dL/dlog pi(y+) = -c_pos / |y+| and dL/dlog pi(y-) = +c_neg / |y-|. Unbounded below
    (the negative trace's log-prob can go to -inf): REDI uses c_neg < c_pos and a small lr.

    Source: "Harnessing Negative Signals: Reinforcement Distillation from Teacher Data for LLM
    Reasoning"; Tim-Siu/reinforcement-distillation ``dpo2_trainer.py`` (loss_type "reinforce");
    METHODS.md 4.6.

    Args:
        chosen_logp_sum, rejected_logp_sum: [B] sequence log-probs (``sequence_logprobs``).
        chosen_len, rejected_len: [B] completion lengths in tokens (int or float; floored at 1).
        c_pos, c_neg: weights of the positive and negative terms.

    Returns:
        [B] float32.
    """
    n_pos = jnp.maximum(jnp.asarray(chosen_len, jnp.float32), 1.0)
    n_neg = jnp.maximum(jnp.asarray(rejected_len, jnp.float32), 1.0)
    pos = chosen_logp_sum.astype(jnp.float32) / n_pos
    neg = rejected_logp_sum.astype(jnp.float32) / n_neg
    return -c_pos * pos + c_neg * neg


def listmle(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    mask: jax.Array | None = None,
    *,
    k: int = 10,
    temperature: float = 1.0,
    normalization: str = "suffix",
) -> jax.Array:
    r"""TSD-KD ListMLE on the student's top-K tokens ranked by the teacher.

    Take the student's K highest-logit tokens, order them by teacher logit (descending; ties keep
    the student's order), s_(1..K) the student logits / tau in that order;
    ``normalization="suffix"``: l = -sum_{k=1..K} [s_(k) - logsumexp_{j >= k} s_(j)] (Plackett-Luce
    likelihood of the teacher's ranking, as in the paper's formula). ``"prefix"``: the public
    code's -sum_k [s_(k) - logsumexp_{j <= k} s_(j)] (logcumsumexp of the higher-ranked items)
    `[unverified which the paper intends]`. Invariant to adding a constant to the student
    logits; with the suffix form -> 0 when the student already orders the K tokens as the teacher
    does, by large margins. The top-K selection carries no gradient. TSD-KD applies it only at
    early positions: weight the result with ``tsd_listmle_mask`` (weight 0.1 in the paper).

    Source: "Explain in Your Own Words: Token-Selective Dual Knowledge Distillation" (ICLR 2026),
    kmswin1/TSD-KD ``DistillTrainer.py``; ListMLE: Xia et al., ICML 2008. METHODS.md 2.4.

    Args:
        student_logits: [B, T, V] float.
        teacher_logits: [B, T, V] float, constant.
        mask: [B, T] bool or None.
        k: list length K (capped at V).
        temperature: tau > 0 dividing both logit sets (the public code's T, default 1).
        normalization: "suffix" or "prefix".

    Returns:
        [B, T] float32 >= 0.
    """
    if normalization not in ("suffix", "prefix"):
        raise ValueError(f"listmle: normalization={normalization!r} must be 'suffix' or 'prefix'.")
    s = masked_logits(student_logits, mask).astype(jnp.float32) / temperature
    t = jax.lax.stop_gradient(masked_logits(teacher_logits, mask).astype(jnp.float32))
    k = min(k, s.shape[-1])
    _, ids = jax.lax.top_k(jax.lax.stop_gradient(s), k)  # [B, T, K]
    order = jnp.argsort(-jnp.take_along_axis(t, ids, axis=-1), axis=-1, stable=True)
    ranked = jnp.take_along_axis(jnp.take_along_axis(s, ids, axis=-1), order, axis=-1)
    # -inf logits (masked vocabulary rows among the top-K) leave the list instead of giving NaN.
    live = ranked > -jnp.inf
    ranked = jnp.where(live, ranked, -1e30)
    # logsumexp over j >= k (suffix) or j <= k (prefix)
    norm = jax.lax.cumlogsumexp(ranked, axis=ranked.ndim - 1, reverse=normalization == "suffix")
    return apply_mask(jnp.sum(jnp.where(live, norm - ranked, 0.0), axis=-1), mask)


def tsd_listmle_mask(
    student_entropy: jax.Array, mask: jax.Array | None = None, *, threshold: float = 0.1
) -> jax.Array:
    r"""TSD-KD: the early positions of each row on which ListMLE applies.

    Per row, n_t = H(q_t) / sum_{valid s} H(q_s) over the valid positions; keep the valid
    positions t whose cumulative share sum_{valid s <= t} n_s is still below ``threshold``
    (those before the first position where it reaches it). A row whose entropies are all 0
    keeps nothing. Static shapes; no gradient.

    The public code (kmswin1/TSD-KD ``top_k_entropy_position``) computes the share over the
    flattened valid tokens of the whole batch and cuts every row at that flat index, and uses the
    same knob (``token_entropy_percentile_threshold``) as the entropy-penalty quantile; we cut
    each row at its own position `[unverified which the paper intends]`.

    Args:
        student_entropy: [B, T] H(q_t) >= 0; mask: [B, T] bool or None.
        threshold: cumulative entropy share in [0, 1].

    Returns:
        [B, T] bool.
    """
    h = jax.lax.stop_gradient(apply_mask(student_entropy.astype(jnp.float32), mask))
    total = jnp.sum(h, axis=-1, keepdims=True)
    share = jnp.cumsum(h / jnp.where(total > 0, total, 1.0), axis=-1)
    valid = jnp.ones(h.shape, bool) if mask is None else mask.astype(bool)
    return valid & (share < threshold) & (total > 0)


def distillm2(
    student_logits_on_teacher: jax.Array,
    teacher_logits_on_teacher: jax.Array,
    teacher_response_mask: jax.Array | None,
    student_logits_on_student: jax.Array,
    teacher_logits_on_student: jax.Array,
    student_response_mask: jax.Array | None,
    *,
    alpha: float | jax.Array = 0.1,
    b: float | jax.Array = 1.0,
    temperature: float = 1.0,
    student_alpha: float | jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    r"""DistiLLM-2's two per-token terms: (2 - b) SKL_a on teacher responses, b SRKL_a on student
    responses.

    SKL_a = KL(p || a p + (1 - a) q) (``skew_kl``) raises the student's likelihood of teacher
    responses; SRKL_a = KL(q || a q + (1 - a) p) (``skew_reverse_kl``) lowers it where the
    student's own responses are unlike the teacher's. b = 1 weights both equally; the paper's
    curriculum raises b from 1 to 1.5. Each term is reduced with its own mask and count. The
    per-sample skews come from ``distillm2_alpha`` (pass them as [B, 1, 1] arrays: ``alpha`` for
    the teacher responses, ``student_alpha`` for the student responses). The released code
    stops the gradient through q inside SRKL's mixture; here it flows [unverified which the
    paper intends].

    Source: "DistiLLM-2: A Contrastive Approach Boosts the Distillation of LLMs" (Ko et al., ICML
    2025), lyx0727/distillm-2 ``src/distillm_trainer.py``; METHODS.md 4.8.

    Args:
        student_logits_on_teacher, teacher_logits_on_teacher: [B, T, V] on teacher responses.
        teacher_response_mask: [B, T] bool or None.
        student_logits_on_student, teacher_logits_on_student: [B, T', V] on student responses.
        student_response_mask: [B, T'] bool or None.
        alpha: skew a in (0, 1] of the SKL term; scalar or broadcastable to [B, T, V].
        b: curriculum weight in [0, 2].
        temperature: softmax temperature.
        student_alpha: skew of the SRKL term; None: ``alpha``.

    Returns:
        ([B, T] (2 - b) SKL_a, [B, T'] b SRKL_a), float32.
    """
    on_teacher = skew_kl(
        student_logits_on_teacher,
        teacher_logits_on_teacher,
        teacher_response_mask,
        temperature=temperature,
        alpha=alpha,
    )
    on_student = skew_reverse_kl(
        student_logits_on_student,
        teacher_logits_on_student,
        student_response_mask,
        temperature=temperature,
        alpha=alpha if student_alpha is None else student_alpha,
    )
    return (2.0 - b) * on_teacher, b * on_student


def distillm2_alpha(
    own_mean_logprob: jax.Array,
    other_mean_logprob: jax.Array,
    anchor_gap: float | jax.Array,
    *,
    base_alpha: float = 0.1,
    min_alpha: float = 0.01,
) -> jax.Array:
    r"""DistiLLM-2's per-sample skew from the probability gap, constant for autodiff.

    g = exp(own_mean_logprob) - exp(other_mean_logprob) per sample (geometric-mean token
    probabilities over the response); a = clip(1 - (1 - a_0) g_0 / (g + 1e-5), min_alpha, a_0)
    with a_0 = ``base_alpha`` and g_0 = ``anchor_gap``. Teacher responses (SKL term): own = the
    teacher's mean token log-prob, other = the student's; student responses (SRKL term): own =
    the student's, other = the teacher's, each with its own anchor. A sample whose gap is large
    relative to the anchor gets a close to a_0; a small gap pushes a down to ``min_alpha``.

    Source: lyx0727/distillm-2 ``src/distillm_trainer.py`` (``get_batch_logps``; the anchor is
    the batch-mean gap logged at the first logging step, kept fixed afterwards).

    Args:
        own_mean_logprob, other_mean_logprob: [B] mean per-token log-probs of the response
            (``sequence_logprobs / length``).
        anchor_gap: g_0, a scalar (state kept by the caller).
        base_alpha: a_0 in (0, 1); min_alpha: the floor.

    Returns:
        [B] float32 in [min_alpha, base_alpha].
    """
    own = jnp.exp(own_mean_logprob.astype(jnp.float32))
    other = jnp.exp(other_mean_logprob.astype(jnp.float32))
    alpha = 1.0 - (1.0 - base_alpha) * anchor_gap / (own - other + 1e-5)
    return jax.lax.stop_gradient(jnp.clip(alpha, min_alpha, base_alpha))
