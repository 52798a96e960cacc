r"""Sparse teacher: the teacher's top-k next-token log-probabilities, and divergences against it.

A ``SparseTeacher`` keeps, per position, the K most probable token ids of p = softmax(z_t / tau_g),
their full-vocabulary log-probs, the log-normaliser logsumexp(z_t / tau_g) (so the teacher's
logits at K are recoverable: z_k / tau_g = log p_k + lse) and the log of the mass outside K,
taken exactly when the list is made (1 - sum_K p in float32 is noise once sum_K p > 0.9999). It
is what an offline teacher cache stores and what an online teacher can emit to save memory.
Three semantics turn it into two distributions over a common support (METHODS.md 1.13); any
per-position core of ``divergences.CORES`` then applies:

* ``"renorm_both"``: teacher and student both renormalised over the teacher's top-k,
  KL(softmax(z_t[K]) || softmax(z_s[K])) for forward KL (tunix, MaxText offline distillation,
  ModelOpt ``TopKLogitsKLLoss``);
* ``"renorm_teacher"``: teacher renormalised over K against the student's *full-vocabulary*
  log-probs gathered at K, sum_k pt_k (log pt_k - log q_k) = renorm_both - log sum_K q_k, which
  also pushes student mass into K (DistillKit's ``zero`` mode). Defined for ``forward_kl`` only:
  the student side is not a distribution over K;
* ``"tail_bucket"``: K + 1 bins, the unrenormalised top-k probabilities plus one bucket for the
  missing mass 1 - sum_K, on both sides (DistillKit ``symmetric_uniform``, TRL ``loss_add_tail``).
  By the data-processing inequality this is <= the full divergence for any f-divergence.

With K = V all three equal the dense divergence (a test pins this).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from distill_jax.losses import divergences
from distill_jax.losses.tokens import (
    NEG_INF,
    apply_mask,
    log_probs,
    masked_logits,
    masked_temperature,
)

SEMANTICS = ("renorm_both", "renorm_teacher", "tail_bucket")


@struct.dataclass
class SparseTeacher:
    """Teacher top-k at temperature ``temperature``.

    ids: [..., K] int32 token ids, most probable first.
    logprobs: [..., K] float32 full-vocabulary log p_k at ``temperature``.
    log_normalizer: [...] float32 logsumexp(z_t / temperature) over the full vocabulary.
    log_tail: [...] float32 log of the probability outside the top-k (-inf when K = V).
    temperature: [] float32, the temperature the log-probs were taken at.
    """

    ids: jax.Array
    logprobs: jax.Array
    log_normalizer: jax.Array
    log_tail: jax.Array
    temperature: jax.Array

    @property
    def k(self) -> int:
        return self.ids.shape[-1]


def sparse_teacher(
    teacher_logits: jax.Array,
    k: int,
    *,
    temperature: float = 1.0,
    vocab_mask: jax.Array | None = None,
) -> SparseTeacher:
    """Top-k of softmax(z_t / tau) per position.

    Args:
        teacher_logits: [..., W] float.
        k: kept entries, 1 <= k <= W.
        temperature: tau_g > 0 (scalar).
        vocab_mask: [W] bool or None; padded rows are never selected while real ones remain.

    Returns:
        SparseTeacher with ids/logprobs [..., k], log_normalizer [...].
    """
    w = teacher_logits.shape[-1]
    if not 1 <= k <= w:
        raise ValueError(f"top-k teacher: k={k} must be in [1, vocabulary size {w}].")
    z = teacher_logits.astype(jnp.float32) / temperature
    if vocab_mask is not None:
        z = jnp.where(vocab_mask, z, NEG_INF)
    lse = jax.nn.logsumexp(z, axis=-1)
    top, ids = jax.lax.top_k(z, k)
    return SparseTeacher(
        ids=ids.astype(jnp.int32),
        logprobs=top - lse[..., None],
        log_normalizer=lse,
        log_tail=log_mass_outside(z - lse[..., None], ids),
        temperature=jnp.asarray(temperature, jnp.float32),
    )


def log_mass_outside(logp: jax.Array, ids: jax.Array) -> jax.Array:
    """log sum_{v not in ids} p_v, summed directly (exact where the kept mass is near 1).

    Args:
        logp: [..., V] log-probabilities; ids: [..., K] int.

    Returns:
        [...] float32; -inf when the ids cover every entry with mass.
    """
    rest = jnp.put_along_axis(logp, ids, NEG_INF, axis=-1, inplace=False)
    empty = jnp.all(rest == NEG_INF, axis=-1)
    out = jax.nn.logsumexp(jnp.where(empty[..., None], 0.0, rest), axis=-1)
    return jnp.where(empty, NEG_INF, out)


def masked_sparse(sparse: SparseTeacher, mask: jax.Array | None) -> SparseTeacher:
    """``sparse`` with every masked position replaced by a finite stand-in (uniform over the K
    entries and the tail bucket), before any arithmetic: a padded position's stored -inf / NaN
    would otherwise reach the gradient (see ``tokens.masked_logits``)."""
    if mask is None:
        return sparse
    m = mask.astype(bool)
    uniform = -jnp.log(jnp.float32(sparse.k + 1))
    return sparse.replace(
        logprobs=jnp.where(m[..., None], sparse.logprobs, uniform),
        log_normalizer=jnp.where(m, sparse.log_normalizer, 0.0),
        log_tail=jnp.where(m, sparse.log_tail, uniform),
    )


def retemper(sparse: SparseTeacher, temperature) -> jax.Array:
    """Teacher log-probs at K under another temperature tau_d, with one bucket for the tail.

    Over K the teacher's logits are known exactly (log p_k + lse); the mass outside K is not,
    so it is treated as one bucket (METHODS.md 1.13): with r = tau_g / tau_d,
    log p'_k = r log p_k - log(sum_K p_k^r + tail^r), tail = ``sparse.log_tail``.

    Returns:
        [..., K + 1] log-probs at ``temperature`` (last entry: the tail bucket).
    """
    r = sparse.temperature / jnp.asarray(temperature, jnp.float32)
    r = r[..., None] if r.ndim else r
    bins = jnp.concatenate([sparse.logprobs, sparse.log_tail[..., None]], axis=-1)
    scaled = jnp.where(bins > NEG_INF, r * jnp.where(bins > NEG_INF, bins, 0.0), NEG_INF)
    return jax.nn.log_softmax(scaled, axis=-1)


def support_log_probs(
    student_logits: jax.Array,
    sparse: SparseTeacher,
    *,
    semantics: str = "renorm_both",
    temperature=1.0,
    vocab_mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(student, teacher) log-probs over the common support of a semantics.

    Args:
        student_logits: [..., V] float.
        sparse: SparseTeacher [..., K] over the same vocabulary.
        semantics: one of ``SEMANTICS``.
        temperature: tau_d > 0 (scalar or [...]); the teacher is re-tempered when it differs from
            ``sparse.temperature``.
        vocab_mask: [V] bool or None.

    Returns:
        (logq, logp), each [..., K] (renorm_*) or [..., K + 1] (tail_bucket), float32.
    """
    if semantics not in SEMANTICS:
        raise ValueError(f"Unknown top-k semantics {semantics!r}; choose one of {SEMANTICS}.")
    teacher = jax.lax.stop_gradient(retemper(sparse, temperature))  # [..., K + 1]
    logq_full = log_probs(student_logits, temperature, vocab_mask)
    logq_k = jnp.take_along_axis(logq_full, sparse.ids, axis=-1)  # [..., K]
    if semantics == "tail_bucket":
        tail = log_mass_outside(logq_full, sparse.ids)[..., None]
        return jnp.concatenate([logq_k, tail], axis=-1), teacher
    logp = jax.nn.log_softmax(teacher[..., :-1], axis=-1)
    if semantics == "renorm_both":
        return jax.nn.log_softmax(logq_k, axis=-1), logp
    return logq_k, logp


def topk_divergence(
    name: str,
    student_logits: jax.Array,
    sparse: SparseTeacher,
    mask: jax.Array | None = None,
    *,
    semantics: str = "renorm_both",
    temperature=1.0,
    vocab_mask: jax.Array | None = None,
    **knobs,
) -> jax.Array:
    """Per-token divergence ``name`` between the student and a sparse teacher.

    Args:
        name: a key of ``divergences.CORES`` (``renorm_teacher``: ``forward_kl`` only).
        student_logits: [..., V] float.
        sparse: SparseTeacher [..., K].
        mask: [...] bool or None; masked positions give 0.
        semantics, temperature, vocab_mask: see ``support_log_probs``.
        **knobs: the divergence's knobs (beta, alpha, t, ...).

    Returns:
        [...] float32, not reduced.
    """
    core = divergences.get_core(name)
    if semantics == "renorm_teacher" and name != "forward_kl":
        raise ValueError(
            f"top-k semantics 'renorm_teacher' compares the teacher with unnormalised student "
            f"probabilities and is defined for forward_kl only, not {name!r}; use 'renorm_both' "
            "or 'tail_bucket'."
        )
    logq, logp = support_log_probs(  # masked positions cleared first (masked_logits)
        masked_logits(student_logits, mask),
        masked_sparse(sparse, mask),
        semantics=semantics,
        temperature=masked_temperature(temperature, mask),
        vocab_mask=vocab_mask,
    )
    return apply_mask(core(logq, logp, **knobs), mask)


def captured_mass(
    student_logits: jax.Array,
    sparse: SparseTeacher,
    mask: jax.Array | None = None,
    *,
    vocab_mask: jax.Array | None = None,
) -> dict[str, tuple[jax.Array, jax.Array]]:
    """How much probability the top-k support holds, as (sum, count) pairs over valid tokens.

    Returns:
        {"topk/teacher_mass": sum_K p (at the sparse teacher's temperature),
         "topk/student_mass": sum_K q (student at temperature 1),
         "topk/top1_agreement": 1 where argmax q equals the teacher's top-1}.
    """
    m = jnp.ones(sparse.ids.shape[:-1], jnp.float32) if mask is None else mask.astype(jnp.float32)
    logq = log_probs(student_logits, 1.0, vocab_mask)
    student_mass = jnp.exp(jax.nn.logsumexp(jnp.take_along_axis(logq, sparse.ids, -1), -1))
    teacher_mass = jnp.exp(jax.nn.logsumexp(sparse.logprobs, -1))
    agree = (jnp.argmax(logq, -1) == sparse.ids[..., 0]).astype(jnp.float32)
    count = jnp.sum(m)
    return {
        "topk/teacher_mass": (jnp.sum(teacher_mass * m), count),
        "topk/student_mass": (jnp.sum(student_mass * m), count),
        "topk/top1_agreement": (jnp.sum(agree * m), count),
    }


def sparse_teacher_from_hidden(
    hidden: jax.Array,
    head: jax.Array,
    k: int,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    vocab_mask: jax.Array | None = None,
    chunk_size: int = 128,
) -> SparseTeacher:
    """``sparse_teacher`` of the logits hidden @ head, formed ``chunk_size`` positions at a time.

    For writing a teacher cache (or an online sparse teacher) without a [B, T, V] array.

    Args:
        hidden: [B, T, D] final hidden states; head: [D, V].
        k, temperature, vocab_mask: as in ``sparse_teacher``; softcap: the model's final-logit
            soft-capping, if any.
        chunk_size: positions per chunk.

    Returns:
        SparseTeacher with ids/logprobs [B, T, k].
    """
    b, t, _ = hidden.shape
    c = min(chunk_size, t)
    n = -(-t // c)
    h = jnp.pad(hidden, ((0, 0), (0, n * c - t), (0, 0)))
    h = jnp.moveaxis(h.reshape(b, n, c, -1), 1, 0)  # [n, B, C, D]

    def body(_, h_c):
        z = jnp.einsum(
            "bcd,dv->bcv", h_c, head.astype(h_c.dtype), preferred_element_type=jnp.float32
        )
        if softcap:
            z = jnp.tanh(z / softcap) * softcap
        s = sparse_teacher(z, k, temperature=temperature, vocab_mask=vocab_mask)
        return None, (s.ids, s.logprobs, s.log_normalizer, s.log_tail)

    _, parts = jax.lax.scan(body, None, h)
    ids, logprobs, lse, tail = (
        jnp.moveaxis(x, 0, 1).reshape(b, n * c, *x.shape[3:])[:, :t] for x in parts
    )
    return SparseTeacher(ids, logprobs, lse, tail, jnp.asarray(temperature, jnp.float32))
