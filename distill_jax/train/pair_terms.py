r"""Pair loss terms: objectives on (chosen, rejected) pairs, one function per registered term.

The batch (``data.pairs``, ``config.data.source="pairs"``) holds one pair per row: the chosen
side in the step's standard fields and the rejected side in ``rejected_*`` fields of the same
[B, L] shape. The step runs the student (and the teacher, when a pair term needs it) on both
sides; ``objective.LossInputs`` is the chosen side and ``inputs.rejected`` the rejected one.

A pair term is ``fn(inputs, knobs, state, options) -> (sums, counts, metrics)``: ``knobs`` its
checked knobs with schedules evaluated (``registry/losses.py``), ``state`` its entry of the loss
state (or None), ``options`` the checked ``loss_options``; ``sums`` / ``counts`` map each of its
normaliser groups (``Entry.parts``) to a float32 scalar. The step adds both over micro-batches
and data shards and divides once, so a sequence-level term is a mean over pairs and a per-token
term a mean over its own side's response tokens, exact under gradient accumulation, beside any
token-level term of the chosen side (CE = REDI's SFT on the positives, forward KL, ...).

Per-token log-probs come from hidden states and head weights a chunk of positions at a time
(``losses.tokens.token_logprobs_from_hidden``); DistiLLM-2's full-vocabulary skew KLs go through
the fused head (``losses.fused``), so no [B, T, V] array is formed. Teacher quantities are
constants.

What the data is: ``--mode=seqkd`` writes teacher-positive vs teacher-negative traces of one
problem (REDI's setting). DPO with the teacher as reference then asks the student to prefer the
verified trace more than the teacher does; DistiLLM-2's paper uses teacher responses as chosen
and the student's own responses as rejected, which a pairs.jsonl of that kind gives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from distill_jax.losses import fused, preference
from distill_jax.losses.tokens import token_logprobs_from_hidden

LOGPROB_CHUNK_TOKENS = 128  # positions per step of the log-prob walk without head_chunk_tokens


# ---------------------------------------------------------------------------------- helpers


def _token_logprobs(side, options: dict, *, teacher: bool) -> jax.Array:
    """[B, T] log p(y_t) of the student (or, constant, the teacher) on one side, masked."""
    if teacher:
        hidden, head, cap = side.teacher_hidden, side.teacher_head, side.teacher_softcap
        if hidden is None or isinstance(hidden, tuple | list):
            raise ValueError(
                "A pair term that reads the teacher's log-probs needs one teacher model run in "
                "the step: use teacher.kind='online' or 'ema'."
            )
    else:
        hidden, head, cap = side.student_hidden, side.student_head, side.student_softcap
    lp = token_logprobs_from_hidden(
        hidden,
        head,
        side.targets,
        side.mask,
        vocab_mask=side.vocab_mask,
        softcap=cap,
        chunk_size=options.get("head_chunk_tokens") or LOGPROB_CHUNK_TOKENS,
    )
    return jax.lax.stop_gradient(lp) if teacher else lp


def _lengths(side) -> jax.Array:
    """[B] response tokens per row (float32)."""
    return jnp.sum(side.mask.astype(jnp.float32), axis=-1)


def _rows(inputs) -> jax.Array:
    """[B] float32: 1 for a pair whose two responses both have loss tokens."""
    return ((_lengths(inputs) > 0) & (_lengths(inputs.rejected) > 0)).astype(jnp.float32)


def _row_sum(values: jax.Array, rows: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(rows > 0, values, 0.0))


def _mean_logprob(lp: jax.Array, side) -> jax.Array:
    """[B] mean per-token log-prob of the response, sum_t lp / |y| (0 for an empty one)."""
    return preference.sequence_logprobs(lp, side.mask) / jnp.maximum(_lengths(side), 1.0)


# ---------------------------------------------------------------------------- the terms


def dpo_sums(inputs, knobs, state, options):
    r"""DPO with the frozen teacher as the reference, per pair (``preference.
    dpo_with_teacher_reference``): -log sigmoid(beta [(log pi(y_w) - log pi_T(y_w)) -
    (log pi(y_l) - log pi_T(y_l))]), sequence log-probs summed over response tokens.

    Source: LLaVA-MoD (ICLR 2025) stage-2 preference distillation; DPO (Rafailov et al., 2023).
    METHODS.md 4.7. One group, "dpo": the sum over pairs and the pair count. Metrics: the
    margin and the fraction of pairs with a positive margin.
    """
    del state
    rejected, rows = inputs.rejected, _rows(inputs)
    policy = [
        preference.sequence_logprobs(_token_logprobs(s, options, teacher=False), s.mask)
        for s in (inputs, rejected)
    ]
    ref = [
        preference.sequence_logprobs(_token_logprobs(s, options, teacher=True), s.mask)
        for s in (inputs, rejected)
    ]
    loss = preference.dpo_with_teacher_reference(*policy, *ref, beta=knobs["beta"])  # [B]
    margin = jax.lax.stop_gradient(preference.dpo_margin(*policy, *ref))
    n = jnp.sum(rows)
    total = _row_sum(loss, rows)
    metrics = {
        "loss/dpo": (total, n),
        "dpo/margin": (_row_sum(margin, rows), n),
        "dpo/accuracy": (_row_sum((margin > 0).astype(jnp.float32), rows), n),
    }
    return {"dpo": total}, {"dpo": n}, metrics


def redi_sums(inputs, knobs, state, options):
    r"""REDI, per pair (``preference.redi_loss``): -c_pos log pi(y+|x) / |y+| + c_neg
    log pi(y-|x) / |y-|, length-normalised log-likelihoods, no reference model.

    Source: "Harnessing Negative Signals: Reinforcement Distillation from Teacher Data for LLM
    Reasoning" (Xu et al., 2025), Tim-Siu/reinforcement-distillation ``dpo2_trainer.py``
    (loss_type "reinforce"); METHODS.md 4.6. REDI's stage 1 (SFT on the positives) is the
    ``ce`` term beside it. One group, "redi"; metrics: the mean per-token log-prob of each side.
    """
    del state
    rejected, rows = inputs.rejected, _rows(inputs)
    lp_w = _token_logprobs(inputs, options, teacher=False)
    lp_l = _token_logprobs(rejected, options, teacher=False)
    loss = preference.redi_loss(
        preference.sequence_logprobs(lp_w, inputs.mask),
        _lengths(inputs),
        preference.sequence_logprobs(lp_l, rejected.mask),
        _lengths(rejected),
        c_pos=knobs["c_pos"],
        c_neg=knobs["c_neg"],
    )
    n = jnp.sum(rows)
    total = _row_sum(loss, rows)
    stop = jax.lax.stop_gradient
    metrics = {
        "loss/redi": (total, n),
        "redi/chosen_logprob": (_row_sum(stop(_mean_logprob(lp_w, inputs)), rows), n),
        "redi/rejected_logprob": (_row_sum(stop(_mean_logprob(lp_l, rejected)), rows), n),
    }
    return {"redi": total}, {"redi": n}, metrics


DISTILLM2_GROUPS = ("on_chosen", "on_rejected")


def distillm2_init() -> dict:
    """DistiLLM-2's loss state: the two anchor gaps g_0 and whether they are set yet."""
    # Distinct arrays: the state is donated to the step, and one buffer cannot be donated twice.
    return {
        "anchor_chosen": jnp.zeros((), jnp.float32),
        "anchor_rejected": jnp.zeros((), jnp.float32),
        "anchored": jnp.zeros((), jnp.int32),
    }


def distillm2_update(state: dict, mean) -> dict:
    """After the first optimizer step: the anchors become that step's batch-mean gaps (over
    every micro-batch and data shard); kept fixed afterwards. ``mean(key)`` reads a summed
    metric's mean."""
    first = state["anchored"] == 0
    keep = lambda key, metric: jnp.where(first, mean(metric), state[key])  # noqa: E731
    return {
        "anchor_chosen": keep("anchor_chosen", "distillm2/gap_chosen").astype(jnp.float32),
        "anchor_rejected": keep("anchor_rejected", "distillm2/gap_rejected").astype(jnp.float32),
        "anchored": jnp.ones((), jnp.int32),
    }


def _skew(side, alpha, kind: str, options: dict):
    """(sum over the side's response tokens of the skew divergence, token count) by the fused
    head, with a per-row skew alpha [B] ([B, 1, 1] against each chunk's [B, C, V])."""
    total, count, _ = fused.fused_distill_loss(
        side.student_hidden,
        side.student_head,
        teacher_hidden=side.teacher_hidden,
        teacher_head=side.teacher_head,
        mask=side.mask,
        terms={"skew": {"divergence": kind, "alpha": alpha[:, None, None]}},
        vocab_mask=side.vocab_mask,
        student_softcap=side.student_softcap,
        teacher_softcap=side.teacher_softcap,
        chunk_size=options.get("head_chunk_tokens"),
        implementation=options.get("implementation", "custom_vjp"),
    )
    return total, count


def distillm2_sums(inputs, knobs, state, options):
    r"""DistiLLM-2: (2 - b) SKL_a on the chosen responses + b SRKL_a on the rejected ones, each
    per token over its own side's response tokens (``preference.distillm2``).

    SKL_a = KL(p || a p + (1 - a) q), SRKL_a = KL(q || a q + (1 - a) p), p the teacher, q the
    student, tau = 1. With ``adaptive_alpha`` each pair gets its own skews from the probability
    gap (``preference.distillm2_alpha``): a = clip(1 - (1 - a_0) g_0 / (g + 1e-5), a_min, a_0)
    with g = exp(mean log p) - exp(mean log q) on the chosen response, exp(mean log q) -
    exp(mean log p) on the rejected one, and g_0 each side's batch-mean gap of the first step
    (the loss state, ``distillm2_update``; a = a_0 at that first step, as the released code has
    before its first logging step). b is a knob that may follow a schedule (the paper's
    curriculum raises it from 1 to 1.5).

    Normalisation differs from the released code, which averages each response's per-token
    KL and then the batch's sequences; here each term is divided by its global token count,
    exact under micro-batching. The paper's rejected responses are the student's own samples;
    seqkd's pairs give the teacher's wrong traces instead (module docstring).

    Source: "DistiLLM-2: A Contrastive Approach Boosts the Distillation of LLMs" (Ko et al.,
    ICML 2025), lyx0727/distillm-2 ``src/distillm_trainer.py``; METHODS.md 4.8.
    """
    rejected, rows = inputs.rejected, _rows(inputs)
    n_rows = jnp.sum(rows)
    means = {
        (side, who): jax.lax.stop_gradient(
            _mean_logprob(_token_logprobs(s, options, teacher=who == "teacher"), s)
        )
        for side, s in (("chosen", inputs), ("rejected", rejected))
        for who in ("student", "teacher")
    }
    gap_c = jnp.exp(means["chosen", "teacher"]) - jnp.exp(means["chosen", "student"])
    gap_r = jnp.exp(means["rejected", "student"]) - jnp.exp(means["rejected", "teacher"])
    base, low = knobs["base_alpha"], knobs["min_alpha"]
    alpha_c = jnp.full(rows.shape, base, jnp.float32)
    alpha_r = alpha_c
    if knobs["adaptive_alpha"]:
        kw = dict(base_alpha=base, min_alpha=low)
        anchored = state["anchored"] > 0
        a_c = preference.distillm2_alpha(
            means["chosen", "teacher"], means["chosen", "student"], state["anchor_chosen"], **kw
        )
        a_r = preference.distillm2_alpha(
            means["rejected", "student"],
            means["rejected", "teacher"],
            state["anchor_rejected"],
            **kw,
        )
        alpha_c, alpha_r = jnp.where(anchored, a_c, base), jnp.where(anchored, a_r, base)
    skl, n_c = _skew(inputs, alpha_c, "skew_kl", options)
    srkl, n_r = _skew(rejected, alpha_r, "skew_reverse_kl", options)
    b = knobs["b"]
    groups = tuple(f"distillm2/{g}" for g in DISTILLM2_GROUPS)
    metrics = {
        f"loss/{groups[0]}": (skl, n_c),
        f"loss/{groups[1]}": (srkl, n_r),
        "distillm2/gap_chosen": (_row_sum(gap_c, rows), n_rows),
        "distillm2/gap_rejected": (_row_sum(gap_r, rows), n_rows),
        "distillm2/alpha_chosen": (_row_sum(alpha_c, rows), n_rows),
        "distillm2/alpha_rejected": (_row_sum(alpha_r, rows), n_rows),
    }
    sums = {groups[0]: (2.0 - b) * skl, groups[1]: b * srkl}
    return sums, {groups[0]: n_c, groups[1]: n_r}, metrics
