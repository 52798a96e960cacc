r"""DSKD: dual-space knowledge distillation with learned projections (METHODS.md 6.7).

Zhang et al., "Dual-Space Knowledge Distillation for Large Language Models" (EMNLP 2024,
arXiv:2406.17328); reference code: songmzhang/DSKD ``code/criterions/dual_space_kd.py`` and
``dual_space_kd_with_cma.py``.

Instead of comparing the two output distributions in two different spaces, DSKD projects each
model's hidden states into the other model's space and scores them with the other model's
(frozen) head:

* teacher -> student (t2s): h_t P_t2s is scored by the student head W_s (no gradient into W_s),
  giving logits z_t2s over the student vocabulary. z_t2s is trained to predict the student's
  target (CE), and, as a constant, it is the teacher distribution the student is distilled
  towards: D(q || stopgrad(p_t2s)) for a divergence D of ``losses.divergences``.
* student -> teacher (s2t): h_s P_s2t is scored by the teacher head W_t, and the teacher's own
  distribution supervises it: FKL(p || p_s2t). This trains the student's hidden states (and
  P_s2t) in the teacher's space.

KD = CE(z_t2s, y) + D(q || p_t2s) + FKL(p || p_s2t); the paper's total is (1 - r) CE(z_s, y) +
r KD with r = 0.5 (``kd_rate``), set here by the caller's weights.

With the same tokenizer the two sequences are position-aligned (``same_vocab_terms``). With
different tokenizers, cross-model attention (CMA, ``cma_terms``) aligns them: each student
position i queries the teacher positions with its input and target embeddings,

    Q_i = [e_s(x_i); e_s(y_i)] P_q,   K_j = [e_t(x_j) / sigma_e; e_t(y_j) / sigma_e],
    A = softmax_j(Q K^T / sqrt(2 D_t))   (teacher padding masked),

t2s hidden states are A (h_t / sigma_h + e_t(y) / sigma_e) P_t2s and s2t hidden states are
softmax_i(K Q^T / sqrt(2 D_t)) (h_s P_s2t) (student padding masked). sigma_h and sigma_e are the
standard deviations of the teacher's hidden states and of its embeddings of the batch over
valid positions. The t2s KD term counts only where the projected teacher predicts the student's
target (argmax z_t2s = y), as in the reference.

The projections are parameters the optimizer trains with the student and does not export
(``init_dskd``). The paper reports that s2t accuracy stays low for new pairs.
Every term is per position, zero where invalid, not reduced; ``dskd_objective`` reduces.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from distill_jax.losses.divergences import get_core, kl_core
from distill_jax.losses.features import apply_projector, init_projector
from distill_jax.losses.tokens import apply_mask, log_probs, masked_sum_and_count

_MASKED = -1e30


class DSKDTerms(NamedTuple):
    """Per-position DSKD terms.

    t2s_ce [B, S]: -log p_t2s(y); t2s_kd [B, S]: D(q || stopgrad(p_t2s)); s2t_kd [B, U]:
    FKL(p || p_s2t) (U = S for the same vocabulary); the masks say which entries count
    (t2s_kd_mask drops positions where the projected teacher misses the target under CMA);
    t2s_accuracy [B, S] float: argmax z_t2s == y.
    """

    t2s_ce: jax.Array
    t2s_kd: jax.Array
    s2t_kd: jax.Array
    student_mask: jax.Array
    t2s_kd_mask: jax.Array
    teacher_mask: jax.Array
    t2s_accuracy: jax.Array


def init_dskd(
    key: jax.Array,
    d_student: int,
    d_teacher: int,
    *,
    cross_tokenizer: bool,
    init: str = "xavier",
    dtype=jnp.float32,
) -> dict[str, dict[str, jax.Array]]:
    """The DSKD projections: {"t2s": [D_t, D_s], "s2t": [D_s, D_t]} (+ "query": [2 D_s, 2 D_t]
    for CMA), as ``losses.features`` projectors (bias-free; the reference's are linear too).
    """
    k1, k2, k3 = jax.random.split(key, 3)
    params = {
        "t2s": init_projector(k1, d_teacher, d_student, init, dtype),
        "s2t": init_projector(k2, d_student, d_teacher, init, dtype),
    }
    if cross_tokenizer:
        params["query"] = init_projector(k3, 2 * d_student, 2 * d_teacher, init, dtype)
    return params


def _head_logits(h: jax.Array, head: jax.Array) -> jax.Array:
    """h [..., D] @ head [D, V] in float32."""
    return jnp.einsum("...d,dv->...v", h.astype(jnp.float32), head.astype(jnp.float32))


def _target_logprob(logits: jax.Array, targets: jax.Array) -> jax.Array:
    safe = jnp.clip(targets, 0, logits.shape[-1] - 1)
    return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), safe[..., None], -1)[..., 0]


def _check(name: str, x: jax.Array, ndim: int) -> None:
    if x.ndim != ndim:
        raise ValueError(f"{name} has shape {x.shape}; expected {ndim} dimensions.")


def _t2s_terms(z_t2s, student_logits, targets, mask, divergence, temperature, knobs):
    """CE of the projected teacher, its accuracy, and D(q || p_t2s) with p_t2s a constant."""
    t2s_ce = apply_mask(-_target_logprob(z_t2s, targets), mask)
    accuracy = apply_mask((jnp.argmax(z_t2s, -1) == targets).astype(jnp.float32), mask)
    logq = log_probs(student_logits, temperature)
    logp = jax.lax.stop_gradient(log_probs(z_t2s, temperature))
    t2s_kd = apply_mask(get_core(divergence)(logq, logp, **knobs), mask)
    return t2s_ce, accuracy, t2s_kd


def _s2t_kd(z_s2t, teacher_logits, mask, temperature):
    """FKL(p || p_s2t): the teacher's distribution supervises the student's projection."""
    logp = jax.lax.stop_gradient(log_probs(teacher_logits, temperature))
    return apply_mask(kl_core(log_probs(z_s2t, temperature), logp), mask)


def same_vocab_terms(
    params: dict,
    student_hidden: jax.Array,
    teacher_hidden: jax.Array,
    student_head: jax.Array,
    teacher_head: jax.Array,
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    **knobs,
) -> DSKDTerms:
    r"""DSKD for one tokenizer: positions are shared, no attention.

    z_t2s = (h_t P_t2s) stopgrad(W_s), z_s2t = (h_s P_s2t) W_t (W_t, h_t, z_t constants).

    Args:
        params: ``init_dskd(..., cross_tokenizer=False)``.
        student_hidden: [B, T, D_s] final hidden states (after the final norm).
        teacher_hidden: [B, T, D_t].
        student_head: [D_s, V]; teacher_head: [D_t, V].
        student_logits, teacher_logits: [B, T, V] (h_s W_s and h_t W_t, possibly soft-capped).
        targets: [B, T] next-token ids; mask: [B, T] bool.
        divergence: D of the t2s KD term, a ``losses.divergences`` core name; ``knobs`` go to it.
        temperature: tau of both KD terms (the CE is at tau = 1).
    """
    for name, x, nd in (
        ("student_hidden", student_hidden, 3),
        ("teacher_hidden", teacher_hidden, 3),
    ):
        _check(name, x, nd)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {student_logits.shape} and teacher_logits {teacher_logits.shape} "
            "differ: same_vocab_terms needs one tokenizer; use cma_terms across tokenizers."
        )
    teacher_hidden = jax.lax.stop_gradient(teacher_hidden)
    z_t2s = _head_logits(
        apply_projector(params["t2s"], teacher_hidden), jax.lax.stop_gradient(student_head)
    )
    z_s2t = _head_logits(
        apply_projector(params["s2t"], student_hidden), jax.lax.stop_gradient(teacher_head)
    )
    mask = mask.astype(bool)
    t2s_ce, accuracy, t2s_kd = _t2s_terms(
        z_t2s, student_logits, targets, mask, divergence, temperature, knobs
    )
    s2t_kd = _s2t_kd(z_s2t, teacher_logits, mask, temperature)
    return DSKDTerms(t2s_ce, t2s_kd, s2t_kd, mask, mask, mask, accuracy)


def masked_std(x: jax.Array, mask: jax.Array) -> jax.Array:
    """The standard deviation of all entries of x [B, T, D] at valid positions (mask [B, T])."""
    w = mask.astype(jnp.float32)[..., None] * jnp.ones_like(x, jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)
    mean = jnp.sum(w * x) / n
    return jnp.sqrt(jnp.sum(w * (x - mean) ** 2) / n)


def cma_attention(query: jax.Array, keys: jax.Array, key_mask: jax.Array) -> jax.Array:
    """softmax_j(q_i . k_j / sqrt(E)) over valid keys; rows with no valid key are all zero.

    Args:
        query: [B, S, E]; keys: [B, U, E]; key_mask: [B, U] bool.

    Returns:
        [B, S, U] float32; each row sums to 1 over the valid keys and is 0 on invalid ones.
    """
    scores = jnp.einsum("bse,bue->bsu", query.astype(jnp.float32), keys.astype(jnp.float32))
    scores = scores / math.sqrt(query.shape[-1])
    key_mask = key_mask.astype(bool)[:, None, :]
    # A finite fill keeps rows without any valid key NaN-free in value and gradient.
    weights = jax.nn.softmax(jnp.where(key_mask, scores, _MASKED), axis=-1)
    return jnp.where(key_mask, weights, 0.0)


def cma_terms(
    params: dict,
    student_hidden: jax.Array,
    teacher_hidden: jax.Array,
    student_embeddings: tuple[jax.Array, jax.Array],
    teacher_embeddings: tuple[jax.Array, jax.Array],
    student_head: jax.Array,
    teacher_head: jax.Array,
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    student_targets: jax.Array,
    student_mask: jax.Array,
    teacher_mask: jax.Array,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    **knobs,
) -> DSKDTerms:
    r"""DSKD across tokenizers with cross-model attention (module docstring for the formulas).

    Args:
        params: ``init_dskd(..., cross_tokenizer=True)``.
        student_hidden: [B, S, D_s]; teacher_hidden: [B, U, D_t] (constant).
        student_embeddings: (e_s(x), e_s(y)), each [B, S, D_s]: the student's input embeddings
            of its input ids and of its target ids (gradients flow into P_q, not into these
            unless the caller lets them).
        teacher_embeddings: (e_t(x), e_t(y)), each [B, U, D_t] (constants).
        student_head: [D_s, V] (frozen in the t2s path); teacher_head: [D_t, W] (constant).
        student_logits: [B, S, V]; teacher_logits: [B, U, W].
        student_targets: [B, S] ids; student_mask: [B, S] bool; teacher_mask: [B, U] bool.
        divergence, temperature, knobs: as in ``same_vocab_terms``.
    """
    b, s = student_logits.shape[:2]
    u = teacher_logits.shape[1]
    shapes = {
        "student_hidden": (student_hidden.shape[:2], (b, s)),
        "student_embeddings": (student_embeddings[0].shape[:2], (b, s)),
        "student_targets": (student_targets.shape, (b, s)),
        "student_mask": (student_mask.shape, (b, s)),
        "teacher_hidden": (teacher_hidden.shape[:2], (b, u)),
        "teacher_embeddings": (teacher_embeddings[0].shape[:2], (b, u)),
        "teacher_mask": (teacher_mask.shape, (b, u)),
    }
    for name, (got, want) in shapes.items():
        if tuple(got) != want:
            raise ValueError(
                f"{name} starts with {tuple(got)} but the logits give {want}: the student side is "
                "[B, S, ...] (student tokens), the teacher side [B, U, ...] (teacher tokens)."
            )
    student_mask, teacher_mask = student_mask.astype(bool), teacher_mask.astype(bool)
    sg = jax.lax.stop_gradient
    t_in, t_out = (sg(e.astype(jnp.float32)) for e in teacher_embeddings)
    teacher_hidden = sg(teacher_hidden.astype(jnp.float32))
    t_index = jnp.concatenate([t_in, t_out], -1)  # [B, U, 2 D_t]
    sigma_e = masked_std(t_index, teacher_mask)
    sigma_h = masked_std(teacher_hidden, teacher_mask)
    query = apply_projector(params["query"], jnp.concatenate(student_embeddings, -1))  # [B,S,2Dt]
    keys = t_index / sigma_e
    t2s_weights = cma_attention(query, keys, teacher_mask)  # [B, S, U]
    s2t_weights = cma_attention(keys, query, student_mask)  # [B, U, S]
    values = apply_projector(params["t2s"], teacher_hidden / sigma_h + t_out / sigma_e)  # [B,U,Ds]
    t2s_hidden = jnp.einsum("bsu,bud->bsd", t2s_weights, values)
    s2t_hidden = jnp.einsum(
        "bus,bsd->bud", s2t_weights, apply_projector(params["s2t"], student_hidden)
    )
    z_t2s = _head_logits(t2s_hidden, sg(student_head))
    z_s2t = _head_logits(s2t_hidden, sg(teacher_head))
    t2s_ce, accuracy, t2s_kd = _t2s_terms(
        z_t2s, student_logits, student_targets, student_mask, divergence, temperature, knobs
    )
    kd_mask = student_mask & (accuracy > 0)
    t2s_kd = apply_mask(t2s_kd, kd_mask)
    s2t_kd = _s2t_kd(z_s2t, teacher_logits, teacher_mask, temperature)
    return DSKDTerms(t2s_ce, t2s_kd, s2t_kd, student_mask, kd_mask, teacher_mask, accuracy)


def dskd_objective(terms: DSKDTerms) -> tuple[jax.Array, dict[str, tuple[jax.Array, jax.Array]]]:
    """KD = mean t2s_ce + mean t2s_kd + mean s2t_kd, each over its own mask.

    Returns:
        (KD scalar, metrics as (sum, count) pairs: t2s_ce, t2s_kd, s2t_kd, t2s_accuracy).
        Under data parallelism reduce the pairs globally before dividing.
    """
    metrics = {
        "t2s_ce": masked_sum_and_count(terms.t2s_ce, terms.student_mask),
        "t2s_kd": masked_sum_and_count(terms.t2s_kd, terms.t2s_kd_mask),
        "s2t_kd": masked_sum_and_count(terms.s2t_kd, terms.teacher_mask),
        "t2s_accuracy": masked_sum_and_count(terms.t2s_accuracy, terms.student_mask),
    }
    mean = lambda pair: pair[0] / jnp.maximum(pair[1], 1.0)  # noqa: E731
    kd = mean(metrics["t2s_ce"]) + mean(metrics["t2s_kd"]) + mean(metrics["s2t_kd"])
    return kd, metrics
