r"""Bridge loss terms (cross-tokenizer), one function per registered bridge term.

A bridge term is ``fn(inputs, knobs, params) -> (parts, metrics)``: ``inputs`` the
``objective.LossInputs`` with the bridge's fields filled in (the teacher on its own tokens:
``teacher_token_*``; both sides' common-boundary chunk ids, ``bridges.align``), ``knobs`` the
term's checked knobs (``registry.LOSS_TERMS``), ``params`` its trainable parameters or None.
``parts`` maps a part name to (loss_sum, count); each part is a normaliser group of its own
(``objective.loss_groups``): ALM per chunk, ULD and MinED per position pair, DSKD's three terms
each over its own mask. The part "" is the term itself; others are ``<label>/<part>``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from distill_jax.bridges import alm, dskd, mined, uld
from distill_jax.losses.tokens import log_probs

F32 = jnp.float32


def alm_sum(inputs, term, projector=None):
    """ALM (bridges.alm) of the student's tokens against the teacher's chunk log-likelihoods,
    plus ``hidden_weight`` x the chunk-end hidden-state loss when that weight is not 0.
    Returns ({"": (sum over chunks, chunk count)}, metrics)."""
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
    return {"": (total, count)}, metrics


# ---------------------------------------------------------------------- ULD, MinED, DSKD


def _logits(hidden: jax.Array, head: jax.Array, softcap: float | None) -> jax.Array:
    """[B, L, D] @ [D, V] -> [B, L, V] float32 logits, soft-capped like the model's own."""
    z = jnp.einsum("bld,dv->blv", hidden, head.astype(hidden.dtype), preferred_element_type=F32)
    return jnp.tanh(z / softcap) * softcap if softcap else z


def _gather(x: jax.Array, positions: jax.Array) -> jax.Array:
    """x [B, L, ...] at positions [B, K] -> [B, K, ...] (positions clipped into range)."""
    idx = jnp.clip(positions, 0, x.shape[1] - 1)
    return jnp.take_along_axis(x, idx.reshape(*idx.shape, *([1] * (x.ndim - 2))), axis=1)


def _logits_at(inputs, s_pos: jax.Array, t_pos: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Student logits [B, K, V] at s_pos [B, K] and the teacher's [B, K, W] at t_pos (constant)."""
    s = inputs.student_hidden, inputs.student_head, inputs.student_softcap
    t = inputs.teacher_token_hidden, inputs.teacher_token_head, inputs.teacher_softcap
    z_s = _logits(_gather(s[0], s_pos), *s[1:])
    return z_s, jax.lax.stop_gradient(_logits(_gather(t[0], t_pos), *t[1:]))


def _needs_token_side(inputs, name: str) -> None:
    if inputs.teacher_token_hidden is None or inputs.teacher_token_mask is None:
        raise ValueError(f"The {name} term needs a cross-tokenizer teacher: set config.bridge.")


def uld_sum(inputs, term, params=None):
    """ULD (bridges.uld, Boizard et al. 2024): the sorted-probability L1 between the k-th valid
    student position and the k-th valid teacher position of each row, summed over the pairs.

    Logits exist only at the L = min(T, U) gathered positions of each side ([B, L, V] and
    [B, L, W]). Paper: CE + 1.5 ULD, i.e. ``losses=dict(ce={}, uld=dict(weight=1.5))``.
    Returns ({"": (sum, pairs)}, metrics).
    """
    _needs_token_side(inputs, "uld")
    length = min(inputs.mask.shape[1], inputs.teacher_token_mask.shape[1])
    s_pos, s_n = uld.first_valid_positions(inputs.mask, length)
    t_pos, t_n = uld.first_valid_positions(inputs.teacher_token_mask, length)
    pairs = jnp.arange(length) < jnp.minimum(s_n, t_n)[:, None]  # [B, L]
    z_s, z_t = _logits_at(inputs, s_pos, t_pos)
    logq = log_probs(z_s, term["student_temperature"])
    logp = log_probs(z_t, term["teacher_temperature"])
    values = jnp.where(pairs, uld.sorted_l1(logq, logp), 0.0)
    return {"": (jnp.sum(values), jnp.sum(pairs.astype(F32)))}, {}


def chunk_end_pairs(inputs) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Positions where both sides predict a token that starts at the same byte.

    The last token of common-boundary chunk c (``bridges.align``) predicts the first token of
    chunk c + 1 on both sides, so (student end of c, teacher end of c) is a 1:1 pair whenever
    chunks c and c + 1 are present on both sides and both positions are in their loss masks.

    Returns:
        (student positions [B, C - 1], teacher positions [B, C - 1], valid [B, C - 1] bool).
    """
    c = inputs.student_chunk.shape[1]
    s_end = alm.chunk_end_positions(inputs.student_chunk, c)  # [B, C], -1 where empty
    t_end = alm.chunk_end_positions(inputs.teacher_chunk, c)
    both = (s_end >= 0) & (t_end >= 0)
    valid = both[:, :-1] & both[:, 1:]
    s_pos, t_pos = s_end[:, :-1], t_end[:, :-1]
    valid &= _gather(inputs.mask.astype(bool), s_pos)
    valid &= _gather(inputs.teacher_token_mask.astype(bool), t_pos)
    return s_pos, t_pos, valid


def mined_sum(inputs, term, params=None):
    """MinED (bridges.mined, FuseLLM's minimum-edit-distance vocabulary map, a DSKD baseline):
    KL(p' || q) with p'_v = softmax(z_t[map[v]] / tau) over the student vocabulary, at the
    positions ``chunk_end_pairs`` pairs 1:1 (both sides predict a token starting at the same
    byte; the reference pairs positions by a DTW over token edit distances instead).

    Returns ({"": (sum, pairs)}, metrics).
    """
    _needs_token_side(inputs, "mined")
    if inputs.mined_map is None:
        raise ValueError("The mined term needs the MinED vocabulary map (config.bridge builds it).")
    s_pos, t_pos, valid = chunk_end_pairs(inputs)
    z_s, z_t = _logits_at(inputs, s_pos, t_pos)
    values = mined.mined_forward_kl(
        z_s, z_t, inputs.mined_map, valid, temperature=term["temperature"]
    )
    return {"": (jnp.sum(values), jnp.sum(valid.astype(F32)))}, {}


DSKD_PARTS = ("t2s_ce", "t2s_kd", "s2t_kd")


def dskd_parts(inputs, term, params):
    """DSKD with cross-model attention (bridges.dskd, Zhang et al. 2024): its three terms, each
    a (sum, count) over its own mask (normalised separately: KD = mean t2s_ce + mean t2s_kd +
    mean s2t_kd, the reference's ``dual_space_kd_with_cma``). ``params``: ``dskd.init_dskd``.

    Materialises both sides' logits ([B, T, V] and [B, U, W]), as the reference does.
    Returns ({part: (sum, count)}, {"dskd/t2s_accuracy": (sum, count)}).
    """
    _needs_token_side(inputs, "dskd")
    if inputs.student_embeddings is None or inputs.teacher_token_embeddings is None:
        raise ValueError("The dskd term needs both models' token embeddings (config.bridge).")
    sg = jax.lax.stop_gradient
    terms = dskd.cma_terms(
        params,
        inputs.student_hidden,
        inputs.teacher_token_hidden,
        tuple(sg(e) for e in inputs.student_embeddings),
        inputs.teacher_token_embeddings,
        inputs.student_head,
        inputs.teacher_token_head,
        _logits(inputs.student_hidden, inputs.student_head, inputs.student_softcap),
        sg(_logits(inputs.teacher_token_hidden, inputs.teacher_token_head, inputs.teacher_softcap)),
        inputs.targets,
        inputs.mask,
        inputs.teacher_token_mask,
        divergence=term["divergence"],
        temperature=term["temperature"],
    )
    _, metrics = dskd.dskd_objective(terms)
    parts = {p: metrics[p] for p in DSKD_PARTS}
    return parts, {"dskd/t2s_accuracy": metrics["t2s_accuracy"]}
