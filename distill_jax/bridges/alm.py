r"""ALM: approximate likelihood matching across tokenizers, on common-boundary chunks.

Minixhofer et al., "Cross-Tokenizer Distillation via Approximate Likelihood Matching"
(arXiv:2503.20083); reference code: bminixhofer/tokenkit ``tokenkit/training/losses.py``
(``compute_alm_loss``). METHODS.md 6.3-6.4.

Each model scores the same text with its own tokens. ``lp[s] = log p(x_{s+1} | x_<=s)`` is the
main-path log-prob of the next token; summed over the tokens of a chunk it is the chunk's
log-likelihood ``LP[c]`` under that model (``chunk_logprobs``; the host collator of
``bridges.align`` gives every token its chunk id). Chunk 0 holds each side's first token, whose
probability no model gives: it is always left out. With ``append_space`` each side adds
``log sum_{v in boundary set} p(v | prefix up to the chunk's end)``, so both score "the chunk,
then a word boundary" (the boundary set: tokens starting with whitespace, and specials).

The distance between LP_T and LP_S binarises each at a temperature tau_b: u = exp(LP_T / tau_b),
v = exp(LP_S / tau_b) are Bernoulli parameters, and

    binary_ce:  -[u log v + (1 - u) log(1 - v)]                      (tokenkit's default)
    binary_kl:  u log(u / v) + (1 - u) log((1 - u) / (1 - v))        (= binary_ce - H(u))
    reverse_binary_kl:  KL(Bern(v) || Bern(u));   abs: |LP_T - LP_S| / tau_b

``binary_kl`` has binary_ce's gradient and is 0 when the two chunk likelihoods are equal, which
makes "the same model through the same tokenizer gives loss 0" a checkable property; it is the
default here. log(1 - v) is ``log1mexp(LP_S / tau_b)`` with LP clipped to <= -1e-6 (a chunk of
probability 1 would give log 0). The loss is a sum over valid chunks, divided by the global chunk
count (the trainer adds sums and counts across micro-batches and hosts, as for tokens).

No [B, T, V] array: ``token_and_boundary_logprobs`` walks token chunks, computes each chunk's
logits from hidden states and head weights, and keeps two numbers per token (rematerialised in
the backward pass).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.losses.tokens import token_and_set_logprobs_from_hidden

MAX_CHUNK_LOGPROB = -1e-6


# ---------------------------------------------------------------------------- host helpers


def boundary_vocab_mask(tok, size: int | None = None) -> np.ndarray:
    """[V] bool: tokens that start a word (first byte space, tab, newline, CR) or are special.

    ``size`` pads with False to a model's (padded) vocabulary size V >= ``tok.vocab_size``.
    """
    if size is not None and size < tok.vocab_size:
        raise ValueError(f"The model's vocabulary ({size}) is smaller than {tok!r}'s.")
    mask = np.zeros(size or tok.vocab_size, bool)
    for i in range(tok.vocab_size):
        data = tok.token_bytes(i)
        mask[i] = (data[:1] in (b" ", b"\t", b"\n", b"\r")) or i in tok.special_ids
    return mask


# ---------------------------------------------------------------------------- token log-probs


def _log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - e^x) for x < 0, accurate near 0 and for very negative x (Maechler, 2012)."""
    return jnp.where(x > -np.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def token_and_boundary_logprobs(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    boundary_mask: jax.Array | None = None,
    *,
    softcap: float | None = None,
    chunk_size: int = 128,
) -> tuple[jax.Array, jax.Array]:
    """Per position: log p(target) and log p(boundary set), never materialising [B, T, V]
    (``losses.tokens.token_and_set_logprobs_from_hidden`` with the boundary set).

    Args:
        hidden: [B, T, D] final hidden states.
        head: [D, V] output projection.
        targets: [B, T] int, the next token at each position (anything where unused).
        boundary_mask: [V] bool or None (then the second output is zeros).
        softcap: final logit soft-capping (Gemma), or None.
        chunk_size: positions per step of the walk.

    Returns:
        (lp [B, T], lp_boundary [B, T]) float32.
    """
    return token_and_set_logprobs_from_hidden(
        hidden, head, targets, boundary_mask, softcap=softcap, chunk_size=chunk_size
    )


def logits_token_and_boundary_logprobs(logits, targets, boundary_mask=None):
    """``token_and_boundary_logprobs`` from dense logits [B, T, V] (tests, small models)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    safe = jnp.clip(targets, 0, logits.shape[-1] - 1)
    lp = jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    if boundary_mask is None:
        return lp, jnp.zeros_like(lp)
    return lp, jax.nn.logsumexp(jnp.where(boundary_mask, logp, -jnp.inf), axis=-1)


# ---------------------------------------------------------------------------- chunks


def next_token_chunks(chunk: jax.Array) -> jax.Array:
    """[B, L] chunk id of each token -> [B, L] chunk id of the token each position predicts."""
    return jnp.concatenate([chunk[:, 1:], jnp.full_like(chunk[:, :1], -1)], axis=1)


def _segment_sum(values: jax.Array, ids: jax.Array, num_chunks: int) -> jax.Array:
    """[B, L], [B, L] ids in [-1, C) -> [B, C]; id -1 is dropped."""
    safe = jnp.where(ids < 0, num_chunks, ids)
    seg = functools.partial(jax.ops.segment_sum, num_segments=num_chunks + 1)
    return jax.vmap(seg)(values, safe)[:, :num_chunks]


def chunk_logprobs(
    lp: jax.Array,
    chunk: jax.Array,
    num_chunks: int,
    lp_boundary: jax.Array | None = None,
) -> jax.Array:
    """LP[c] = sum of lp over the positions predicting a token of chunk c (+ the boundary
    log-prob at the chunk's last token when ``lp_boundary`` is given), clipped to <= -1e-6.

    Args:
        lp: [B, L] log p(x_{s+1} | x_<=s).
        chunk: [B, L] int chunk id of each *token* (-1: none), from the collator.
        num_chunks: C, static.
        lp_boundary: [B, L] or None: log p(boundary set | x_<=s).

    Returns:
        [B, C] float32.
    """
    total = _segment_sum(lp, next_token_chunks(chunk), num_chunks)
    if lp_boundary is not None:
        total = total + at_chunk_ends(lp_boundary, chunk, num_chunks)
    return jnp.minimum(total, MAX_CHUNK_LOGPROB)


def chunk_end_positions(chunk: jax.Array, num_chunks: int) -> jax.Array:
    """[B, L] chunk ids -> [B, C] position of each chunk's last token (-1 for an empty chunk)."""
    pos = jnp.arange(chunk.shape[1])
    last = jax.vmap(functools.partial(jax.ops.segment_max, num_segments=num_chunks + 1))(
        jnp.broadcast_to(pos, chunk.shape), jnp.where(chunk < 0, num_chunks, chunk)
    )
    return jnp.maximum(last[:, :num_chunks], -1)  # an empty chunk's max is the dtype's minimum


def at_chunk_ends(values: jax.Array, chunk: jax.Array, num_chunks: int) -> jax.Array:
    """[B, L] per-token values -> [B, C]: the value at each chunk's last token (0 if empty)."""
    last = chunk_end_positions(chunk, num_chunks)
    at_end = jnp.take_along_axis(values, jnp.clip(last, 0, chunk.shape[1] - 1), axis=1)
    return jnp.where(last >= 0, at_end, 0.0)


def chunk_hidden_loss(
    student_hidden: jax.Array,
    teacher_hidden: jax.Array,
    student_chunk: jax.Array,
    teacher_chunk: jax.Array,
    num_chunks: int,
    *,
    projector: dict | None = None,
    kind: str = "mse",
) -> tuple[jax.Array, jax.Array]:
    r"""Hidden-state matching at chunk ends (ALM's latent term, METHODS.md 6.3).

    After a chunk's last token both models have read exactly the same text, so their hidden
    states there describe the same prefix: l[c] = relative MSE ||P(h_s) - h_t||^2 / (D_t ms_t)
    (ms_t: the teacher's mean square over the valid chunk ends of the batch) or 1 - cos(P(h_s),
    h_t), with P a learned projector when the widths differ (``losses.features``).

    Args:
        student_hidden: [B, T, D_s]; teacher_hidden: [B, U, D_t] (constant).
        student_chunk, teacher_chunk: [B, T], [B, U] chunk ids per token.
        num_chunks: C, static.
        projector: ``features.init_projector(key, D_s, D_t)`` params, or None when D_s = D_t.
        kind: "mse" or "cosine".

    Returns:
        (sum over the chunks of ``chunk_mask``, their count), like ``alm_loss``.
    """
    from distill_jax.losses import features  # the loss library imports bridges.alm

    def ends(hidden, chunk):
        last = jnp.clip(chunk_end_positions(chunk, num_chunks), 0, chunk.shape[1] - 1)
        return jnp.take_along_axis(hidden, last[..., None], axis=1)  # [B, C, D]

    mask = chunk_mask(teacher_chunk, student_chunk, num_chunks)
    hs, ht = ends(student_hidden, student_chunk), ends(teacher_hidden, teacher_chunk)
    if kind == "mse":
        per_chunk = features.hidden_mse(hs, ht, mask, projector=projector, normalize="global")
    elif kind == "cosine":
        per_chunk = features.hidden_cosine(hs, ht, mask, projector=projector)
    else:
        raise ValueError(f"chunk hidden-state loss kind={kind!r}; use 'mse' or 'cosine'.")
    return jnp.sum(per_chunk), jnp.sum(mask.astype(jnp.float32))


def chunk_mask(teacher_chunk: jax.Array, student_chunk: jax.Array, num_chunks: int) -> jax.Array:
    """[B, C] bool: chunks present on both sides, except chunk 0 (its first token is unscored)."""

    def present(ids):
        return _segment_sum(jnp.ones(ids.shape, jnp.float32), ids, num_chunks) > 0

    return present(teacher_chunk) & present(student_chunk) & (jnp.arange(num_chunks) > 0)


def merge_chunks_by_boundary_prob(
    chunk: jax.Array, boundary_prob: jax.Array, threshold: float = 0.1
) -> jax.Array:
    """Coarsen chunks on device: chunk c joins c + 1 when the teacher's probability that a word
    boundary follows c is <= threshold (tokenkit's ``merge_by_space_prob``).

    Args:
        chunk: [B, L] chunk ids (-1 kept).
        boundary_prob: [B, C] teacher p(boundary | prefix through chunk c).
        threshold: 0 merges nothing.

    Returns:
        [B, L] new chunk ids, still 0..C'-1 in order (static shape: unused ids stay empty).
        Apply it to both sides' chunk ids with the same ``boundary_prob`` (the teacher's
        ``exp(at_chunk_ends(teacher boundary log-probs, teacher chunk ids, C))``), as the
        ``alm`` loss term does for ``merge_threshold > 0``.
    """
    closes = boundary_prob > threshold  # chunk c ends a merged chunk
    starts = jnp.concatenate([jnp.ones_like(closes[:, :1]), closes[:, :-1]], axis=1)
    new_id = jnp.cumsum(starts.astype(jnp.int32), axis=1) - 1  # [B, C]
    safe = jnp.clip(chunk, 0, boundary_prob.shape[1] - 1)
    return jnp.where(chunk < 0, -1, jnp.take_along_axis(new_id, safe, axis=1))


# ---------------------------------------------------------------------------- distances


def binary_distance(
    teacher_lp: jax.Array, student_lp: jax.Array, *, temperature: float = 100.0, kind: str
) -> jax.Array:
    """Elementwise distance between chunk log-likelihoods (see the module docstring)."""
    lt = jax.lax.stop_gradient(teacher_lp) / temperature
    ls = student_lp / temperature
    u = jnp.exp(lt)
    if kind == "abs":
        return jnp.abs(lt - ls)
    if kind == "binary_ce":
        return -(u * ls + (1 - u) * _log1mexp(ls))
    if kind == "binary_kl":
        return u * (lt - ls) + (1 - u) * (_log1mexp(lt) - _log1mexp(ls))
    if kind == "reverse_binary_kl":
        v = jnp.exp(ls)
        return v * (ls - lt) + (1 - v) * (_log1mexp(ls) - _log1mexp(lt))
    raise ValueError(
        f"ALM distance {kind!r} is unknown; use binary_kl, binary_ce, reverse_binary_kl or abs."
    )


def alm_loss(
    teacher_lp: jax.Array,
    student_lp: jax.Array,
    teacher_chunk: jax.Array,
    student_chunk: jax.Array,
    num_chunks: int,
    *,
    teacher_lp_boundary: jax.Array | None = None,
    student_lp_boundary: jax.Array | None = None,
    temperature: float = 100.0,
    distance: str = "binary_kl",
) -> tuple[jax.Array, jax.Array, dict]:
    """ALM from per-token log-probs of both sides: (loss sum, chunk count, metrics).

    Args:
        teacher_lp: [B, U] teacher log p(next token) (treated as constant).
        student_lp: [B, T] student log p(next token).
        teacher_chunk, student_chunk: [B, U], [B, T] int chunk ids per token (collator).
        num_chunks: C >= the largest chunk id + 1, static.
        teacher_lp_boundary, student_lp_boundary: [B, U], [B, T] or None: with both given, the
            append-space term is added on each side.
        temperature: tau_b (tokenkit: 100).
        distance: binary_kl (default), binary_ce, reverse_binary_kl or abs.

    Returns:
        (sum over valid chunks, number of valid chunks, {"alm/chunk_lp_gap": (sum |LP_T - LP_S|,
        count)}): divide the sum by the global count.
    """
    lt = chunk_logprobs(teacher_lp, teacher_chunk, num_chunks, teacher_lp_boundary)
    ls = chunk_logprobs(student_lp, student_chunk, num_chunks, student_lp_boundary)
    mask = chunk_mask(teacher_chunk, student_chunk, num_chunks)
    per_chunk = binary_distance(lt, ls, temperature=temperature, kind=distance)
    count = jnp.sum(mask.astype(jnp.float32))
    total = jnp.sum(jnp.where(mask, per_chunk, 0.0))
    gap = jnp.sum(jnp.where(mask, jnp.abs(jax.lax.stop_gradient(lt - ls)), 0.0))
    return total, count, {"alm/chunk_lp_gap": (gap, count)}
