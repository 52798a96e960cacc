r"""Logit terms with a token mask of their own: TSD-KD's entropy penalty and its early-position
ListMLE (METHODS.md 2.4).

The fused head takes one token-weights array for all its terms (``fused.fused_distill_loss``),
so a term averaged over its own tokens cannot share the main pass. It runs a fused pass of its
own, with only that term and its mask m as the token weights, and is its own normaliser group
(``objective.LossSpec.groups``): it adds w * sum_i m_i l(i) / sum_i m_i to the loss, both sums
taken over every micro-batch and data shard of the optimizer step. No [B, T, V] array is formed.

    OWN_MASKS[kind] = OwnMask(knob, fused_kind, needs_teacher, token_mask)

A term of that kind has its own mask when its ``knob`` is not None: ``tsd_entropy_penalty``
always (``quantile``), ``listmle`` when ``entropy_threshold`` is set. Both masks are functions of
the student's entropy H(q_tau) at the term's temperature, computed through the same chunked head
(``selection_rules.token_stats``) under stop_gradient: the mask is a constant and the gradient
flows through the term's per-token values only. The quantile and the cumulative entropy share
are taken over the (micro-)batch one pass sees.

The mask replaces the selection rule's weights for this term (``loss_options.selection`` weights
the main pass, e.g. TSD-KD's confidence weights on its direct JSD term); a teacher's
``token_weights`` multiply it. Source: "Explain in Your Own Words: Token-Selective Dual Knowledge
Distillation" (ICLR 2026), kmswin1/TSD-KD ``DistillTrainer.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from distill_jax.losses import fused, preference, selection
from distill_jax.train import selection_rules
from distill_jax.train.terms import Term


@dataclasses.dataclass(frozen=True)
class OwnMask:
    """How one term kind gets its own mask: ``knob`` (the term has a mask when it is not None),
    ``fused_kind`` (the per-token value the fused pass computes), ``needs_teacher`` (the pass
    runs the teacher's head) and ``token_mask(student_entropy [B, T], mask [B, T], knob value)
    -> [B, T] bool``."""

    knob: str
    fused_kind: str
    needs_teacher: bool
    token_mask: Callable[[jax.Array, jax.Array, float], jax.Array]


def _penalty_tokens(student_entropy, mask, quantile):
    return selection.tsd_entropy_penalty_mask(student_entropy, mask, quantile=quantile)


def _early_positions(student_entropy, mask, threshold):
    return preference.tsd_listmle_mask(student_entropy, mask, threshold=threshold)


OWN_MASKS = {
    "tsd_entropy_penalty": OwnMask("quantile", "student_entropy", False, _penalty_tokens),
    "listmle": OwnMask("entropy_threshold", "listmle", True, _early_positions),
}


def has_own_mask(term: Term) -> bool:
    """Whether ``term`` runs in its own pass with its own mask (static)."""
    own = OWN_MASKS.get(term.kind)
    return own is not None and term.knobs[own.knob] is not None


def token_mask(inputs, spec, term: Term, fused_term: dict) -> jax.Array:
    """[B, T] bool: the valid tokens ``term`` is averaged over, a constant.

    Args:
        inputs: ``objective.LossInputs``; spec: the ``objective.LossSpec``.
        term: the parsed term; fused_term: its fused term dict of this step (schedules
            evaluated), whose temperature the entropy uses.
    """
    own = OWN_MASKS[term.kind]
    tau = fused_term.get("temperature", 1.0)
    stats = selection_rules.token_stats(
        inputs, spec, {"h": {"divergence": "student_entropy", "temperature": tau}}
    )
    return own.token_mask(stats["h"], inputs.mask, term.knobs[own.knob])


def masked_term_sums(inputs, spec, term: Term, fused_term: dict):
    """One term over its own mask m, through its own fused pass.

    Returns:
        (loss_sum [] = weight * sum_i m_i l(i), count [] = sum_i m_i, metrics): ``loss/<label>``
        (sum_i m_i l(i), count) unweighted, and ``mask/<label>`` (kept tokens, valid tokens).
    """
    own = OWN_MASKS[term.kind]
    keep = token_mask(inputs, spec, term, fused_term)
    weights = keep.astype(jnp.float32)
    if inputs.token_weights is not None:
        weights = weights * jax.lax.stop_gradient(inputs.token_weights.astype(jnp.float32))
    if own.needs_teacher:
        teacher = selection_rules.teacher_kwargs(inputs)
    else:  # the student's entropy alone: no teacher head in this pass
        teacher = dict(student_softcap=inputs.student_softcap)
    label = term.label
    total, count, metrics = fused.fused_distill_loss(
        inputs.student_hidden,
        inputs.student_head,
        weights=weights,
        terms={label: {**fused_term, "divergence": own.fused_kind}},
        implementation=spec.options["implementation"],
        **selection_rules.head_kwargs(inputs, spec),
        **teacher,
    )
    valid = inputs.mask.astype(bool)
    kept = (jnp.sum((keep & valid).astype(jnp.float32)), jnp.sum(valid.astype(jnp.float32)))
    return total, count, {f"loss/{label}": metrics[f"loss/{label}"], f"mask/{label}": kept}
