r"""Bridge loss terms (cross-tokenizer), one function per registered bridge term.

A bridge term is ``fn(inputs, knobs, projector) -> (loss_sum, chunk_count, metrics)`` over
common-boundary chunks (``bridges``): ``inputs`` the ``objective.LossInputs`` with the bridge's
fields filled in, ``knobs`` the term's checked knobs (``terms.LOSS_TERMS``), ``projector`` its
trainable parameters or None. Sums are normalised by the global chunk count.
"""

from __future__ import annotations

import jax.numpy as jnp

from distill_jax.bridges import alm


def alm_sum(inputs, term, projector=None):
    """ALM (bridges.alm) of the student's tokens against the teacher's chunk log-likelihoods,
    plus ``hidden_weight`` x the chunk-end hidden-state loss when that weight is not 0."""
    if inputs.teacher_token_logprobs is None or inputs.student_chunk is None:
        raise ValueError("The alm term needs a cross-tokenizer teacher: set config.bridge.")
    append_space = term["append_space"]
    s_lp, s_lpb = alm.token_and_boundary_logprobs(
        inputs.student_hidden,
        inputs.student_head,
        inputs.targets,
        inputs.student_boundary_mask if append_space else None,
        softcap=inputs.student_softcap,
        chunk_size=term["student_logprob_chunk_tokens"],
    )
    t_chunk, s_chunk, c = inputs.teacher_chunk, inputs.student_chunk, inputs.student_chunk.shape[1]
    threshold = term["merge_threshold"]
    if threshold:  # coarsen on device by the teacher's word-boundary probability (tokenkit)
        prob = jnp.exp(alm.at_chunk_ends(inputs.teacher_boundary_logprobs, t_chunk, c))
        t_chunk = alm.merge_chunks_by_boundary_prob(t_chunk, prob, threshold)
        s_chunk = alm.merge_chunks_by_boundary_prob(s_chunk, prob, threshold)
    total, count, metrics = alm.alm_loss(
        inputs.teacher_token_logprobs,
        s_lp,
        t_chunk,
        s_chunk,
        c,
        teacher_lp_boundary=inputs.teacher_boundary_logprobs if append_space else None,
        student_lp_boundary=s_lpb if append_space else None,
        temperature=term["temperature"],
        distance=term["distance"],
    )
    hidden_weight = term["hidden_weight"]
    if hidden_weight:
        if inputs.teacher_token_hidden is None:
            raise ValueError("alm hidden_weight needs the teacher's hidden states (config.bridge).")
        h_sum, h_count = alm.chunk_hidden_loss(
            inputs.student_hidden,
            inputs.teacher_token_hidden,
            s_chunk,
            t_chunk,
            c,
            projector=projector,
            kind=term["hidden_kind"],
        )
        metrics["alm/chunk_hidden"] = (h_sum, h_count)
        total = total + hidden_weight * h_sum  # the same chunks: one chunk count for both
    return total, count, metrics
