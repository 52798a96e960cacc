r"""Chunked head + loss: distillation losses from hidden states without a [B, T, V] array.

The student's logits z_s = h_s W_s (and the teacher's, z_t = h_t W_t, or a sparse top-k teacher)
are formed for ``chunk_size`` positions at a time inside a ``lax.scan``; each chunk is reduced to
per-token loss values before the next one is formed, so the largest live array is
[B, chunk_size, V] in the forward *and* the backward pass (METHODS.md 1.14). Two gradients:

* ``implementation="custom_vjp"`` (default): the gradient is computed inside the forward scan
  (dL/dz per chunk by autodiff of the chunk's loss, then dh = dz W^T and dW += h^T dz), as
  Liger-Kernel's fused linear cross-entropy does; backward only scales it by the cotangent.
  Same FLOPs as the unfused loss, no recomputation. The teacher side gets no gradient.
* ``implementation="remat"``: the scan body runs under ``jax.checkpoint`` and autodiff does
  the rest (EasyDeL's ``chunked_distillation_loss``); the backward recomputes each chunk's
  logits. Gradients reach every input.

Both give the value and gradient of the unfused computation. The same per-position cores as the
unfused path are used (``divergences.CORES``, ``topk.support_log_probs``), so any divergence works.
``sinkhorn`` and ``multilevel_ot`` couple tokens and are computed over vocabulary blocks instead
(Gram matrices q_i . p_j, or logit statistics and column masses, accumulated block by block;
live arrays [B, T, vocab_block] and [N, N]).

Sharding: nothing here names a mesh axis. With the head's vocabulary dimension sharded over
``tensor`` (``sharding.DEFAULT_RULES``), each chunk's logits stay vocabulary-sharded and the
softmax reductions become all-reduces inserted by the compiler; the batch stays data-sharded
because chunks are taken along T.

The scans, the per-chunk maths and the custom VJP live in ``fused_scan``; this module checks the
inputs, builds the static spec and is the public entry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from distill_jax.losses import composite, topk
from distill_jax.losses.fused_scan import (
    COUPLED_KINDS,
    EXTRA_KINDS,
    Static,
    chunked_inputs,
    clip_values,
    from_chunks,
    fused_sums,
    multilevel_ot_values,
    parse_terms,
    per_token_scan,
    remat_sums,
    sinkhorn_values,
    tau_factor,
)

IMPLEMENTATIONS = ("custom_vjp", "remat")
__all__ = [
    "EXTRA_KINDS",
    "IMPLEMENTATIONS",
    "auto_chunk_size",
    "fused_distill_loss",
    "fused_per_token",
]


# ----------------------------------------------------------------------------------- public


def auto_chunk_size(batch: int, vocab: int, target_logits: int = 2**24) -> int:
    """The power of two C in [16, 1024] nearest below target / (B V): [B, C, V] stays ~64 MiB.

    Small enough that the chunk's logits and their float32 temporaries are a fraction of the
    unfused [B, T, V] arrays, large enough that each chunk's matmul keeps the machine busy
    (benchmarks/fused_loss.py measures the trade-off).
    """
    c = max(1, target_logits // max(batch * vocab, 1))
    return int(min(1024, max(16, 2 ** int(math.floor(math.log2(c))))))


def _prepare(
    student_hidden,
    student_head,
    teacher_hidden,
    teacher_head,
    sparse_teacher,
    mask,
    weights,
    targets,
    terms,
    divergence,
    temperature,
    semantics,
    chunk_size,
    student_softcap,
    teacher_softcap,
    vocab_block,
    implementation,
    teacher_combine=None,
):
    """Check inputs (before anything compiles) and build the static spec and scan inputs."""
    if student_hidden.ndim != 3 or student_head.ndim != 2:
        raise ValueError(
            f"student_hidden must be [B, T, D] and student_head [D, V]; got "
            f"{student_hidden.shape} and {student_head.shape}."
        )
    b, t, d = student_hidden.shape
    if student_head.shape[0] != d:
        raise ValueError(
            f"student_head {student_head.shape} does not match hidden width D={d}; pass the "
            "[D, V] output projection (model.head_weights())."
        )
    v = student_head.shape[1]
    sparse = sparse_teacher is not None
    if sparse and teacher_hidden is not None:
        raise ValueError(
            "Pass exactly one teacher: teacher_hidden with teacher_head, or sparse_teacher."
        )
    has_teacher = sparse or teacher_hidden is not None
    if not has_teacher:
        teacher_hidden, teacher_head, teacher_softcap = (), (), ()
    elif not sparse:
        teacher_hidden, teacher_head, teacher_softcap = _teacher_tuples(
            teacher_hidden, teacher_head, teacher_softcap, teacher_combine
        )
        for h, w in zip(teacher_hidden, teacher_head):
            if w is None or h.shape[:2] != (b, t):
                raise ValueError(
                    f"teacher_hidden must be [B, T, D_t] = [{b}, {t}, ...] with a teacher_head; "
                    f"got {h.shape} and {getattr(w, 'shape', None)}."
                )
            if w.shape != (h.shape[2], v):
                raise ValueError(
                    f"teacher_head {w.shape} must be [D_t, V] with the student's V={v}; "
                    "teachers with another vocabulary need a bridge (distill_jax.bridges)."
                )
    elif sparse_teacher.ids.shape[:2] != (b, t):
        raise ValueError(
            f"sparse_teacher ids {sparse_teacher.ids.shape} must be [B, T, K] = [{b}, {t}, K]."
        )
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}: choose one of {IMPLEMENTATIONS}.")
    if chunk_size is None:
        chunk_size = auto_chunk_size(b, v)
    if chunk_size < 1 or vocab_block < 1:
        raise ValueError(f"chunk_size={chunk_size} and vocab_block={vocab_block} must be >= 1.")
    if terms is None:
        terms = {divergence: {"temperature": temperature}}
    static_terms, dynamic = parse_terms(terms, semantics, (b, t))
    kinds = {term.kind for term in static_terms}
    if not has_teacher and kinds - {"ce", "student_entropy"}:
        raise ValueError(
            f"Loss terms {sorted(kinds - {'ce', 'student_entropy'})} need a teacher: pass "
            "teacher_hidden with teacher_head, or sparse_teacher."
        )
    if "ce" in kinds and targets is None:
        raise ValueError("A 'ce' loss term needs targets [B, T] (the next-token ids).")
    for kind in sorted(kinds & set(COUPLED_KINDS)):
        if sparse or len(teacher_hidden) > 1:
            raise ValueError(f"{kind} needs one teacher's full distribution (no sparse/ensemble).")
    static = Static(
        terms=static_terms,
        chunk_size=min(int(chunk_size), t),
        student_softcap=student_softcap,
        teacher_softcap=() if sparse else teacher_softcap,
        sparse=sparse,
        has_teacher=has_teacher,
        teacher_combine=teacher_combine,
        vocab_block=int(vocab_block),
    )
    valid = jnp.ones((b, t), bool) if mask is None else mask.astype(bool)
    m = valid.astype(jnp.float32)
    if weights is not None:
        m = m * jax.lax.stop_gradient(weights.astype(jnp.float32))
    tok = {
        "valid": valid,
        "weight": m,
        "targets": jnp.zeros((b, t), jnp.int32) if targets is None else targets.astype(jnp.int32),
    }
    for term in static_terms:
        if term.per_token_temperature and term.kind in COUPLED_KINDS:
            raise ValueError(f"Loss term {term.label!r}: {term.kind} takes a scalar temperature.")
        if term.per_token_temperature:
            tok[f"tau/{term.label}"] = jnp.asarray(dynamic[term.label]["temperature"], jnp.float32)
            dynamic[term.label]["temperature"] = None
    teacher = sparse_teacher if sparse else teacher_hidden
    return static, teacher, teacher_head, tok, dynamic


def _clear_masked(static: Static, student_hidden, teacher, mask):
    """Hidden states (each teacher's too) with masked positions set to 0, and a sparse teacher's
    masked positions set to a uniform stand-in, before the head: the double-where's first half
    (``tokens.masked_logits``). A padded position may hold +-inf or NaN; the per-token values
    there are zeroed after the loss anyway, but without this their gradient would be NaN
    (0 * inf) and, through dW += h^T dz, poison every parameter. Valid positions unchanged."""
    if mask is None:
        return student_hidden, teacher
    keep = mask.astype(bool)[..., None]
    student_hidden = jnp.where(keep, student_hidden, jnp.zeros((), student_hidden.dtype))
    if static.sparse:
        return student_hidden, topk.masked_sparse(teacher, mask)
    if static.has_teacher:
        teacher = tuple(jnp.where(keep, h, jnp.zeros((), h.dtype)) for h in teacher)
    return student_hidden, teacher


def _teacher_tuples(hidden, head, softcap, combine):
    """One teacher or several as tuples; several need a ``teacher_combine`` of matching size."""
    several = isinstance(hidden, tuple | list)
    hidden = tuple(hidden) if several else (hidden,)
    head = tuple(head) if isinstance(head, tuple | list) else (head,)
    softcap = tuple(softcap) if isinstance(softcap, tuple | list) else (softcap,) * len(hidden)
    if len(head) != len(hidden) or len(softcap) != len(hidden):
        raise ValueError(
            f"{len(hidden)} teacher hidden states need as many heads and softcaps; got "
            f"{len(head)} and {len(softcap)}."
        )
    if combine is None and len(hidden) > 1:
        raise ValueError("Several teachers need teacher_combine=('logits'|'probs', coefficients).")
    if combine is not None:
        kind, coeffs = combine
        if kind == composite.ADAPTIVE:
            if len(hidden) != 3 or len(coeffs) != 2:
                raise ValueError(
                    f"teacher_combine={combine!r}: ('{kind}', (scale, max_alpha)) needs three "
                    f"teachers (a, b, c), got {len(hidden)}."
                )
        elif kind not in ("logits", "probs") or len(coeffs) != len(hidden):
            raise ValueError(
                f"teacher_combine={combine!r}: use ('logits', c) or ('probs', w) with one "
                f"coefficient per teacher ({len(hidden)}), or ('{composite.ADAPTIVE}', "
                "(scale, max_alpha)) for three."
            )
    return hidden, head, softcap


def fused_distill_loss(
    student_hidden: jax.Array,
    student_head: jax.Array,
    *,
    teacher_hidden: jax.Array | None = None,
    teacher_head: jax.Array | None = None,
    sparse_teacher: topk.SparseTeacher | None = None,
    mask: jax.Array | None = None,
    weights: jax.Array | None = None,
    targets: jax.Array | None = None,
    terms: Mapping[str, Mapping[str, Any]] | None = None,
    divergence: str = "forward_kl",
    temperature: float | jax.Array = 1.0,
    semantics: str = "renorm_both",
    vocab_mask: jax.Array | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    chunk_size: int | None = None,
    vocab_block: int = 8192,
    implementation: str = "custom_vjp",
    teacher_combine: tuple[str, tuple[float, ...]] | None = None,
) -> tuple[jax.Array, jax.Array, dict[str, tuple[jax.Array, jax.Array]]]:
    r"""Distillation loss sum from hidden states and head weights, chunked over tokens.

    loss_sum = sum_terms weight_term * sum_i m_i w_i l_term(i), where l_term(i) is the term's
    per-token value (``divergences``/``topk`` semantics, or ``ce``: -log q(y_i) at tau = 1).
    Divide by the *global* token count (all micro-batches and data shards) to get the mean.

    Args:
        student_hidden: [B, T, D] final hidden states (``model.forward(..., compute_logits=False)
            .hidden``).
        student_head: [D, V] output projection (``model.head_weights()``).
        teacher_hidden, teacher_head: [B, T, D_t] and [D_t, V] (or tuples of them, one per
            teacher, combined as ``teacher_combine`` says, see ``fused_scan._teacher_logits``); or
        sparse_teacher: a ``topk.SparseTeacher`` [B, T, K] (then ``semantics`` applies).
        mask: [B, T] bool, valid tokens (default all).
        weights: [B, T] float token weights (selection rules), not differentiated.
        targets: [B, T] int next-token ids, needed by a ``ce`` term.
        terms: ``{label: {"divergence": name (default: label), "weight": 1.0,
            "temperature": 1.0 (scalar or [B, T]), "semantics": ..., "temperature_squared":
            False (multiply by tau^2, per token for a [B, T] tau), "clip": None (cap c: min(l, c),
            zero gradient above it), **knobs}}``; a name is a ``divergences.CORES`` key or one of
            ``EXTRA_KINDS``. Default: one term ``{divergence: {"temperature": temperature}}``.
        vocab_mask: [V] bool, False for padded vocabulary rows.
        student_softcap, teacher_softcap: final-logit soft-capping of each model (Gemma-2 style;
            a tuple for several teachers).
        chunk_size: positions per chunk C; live logits are [B, C, V]. None: ``auto_chunk_size``
            (about 2^24 logits per chunk, 64 MiB in float32).
        vocab_block: vocabulary block of the token-coupling terms (``sinkhorn``, ``multilevel_ot``).
        implementation: "custom_vjp" (gradient computed in the forward scan) or "remat".
        teacher_combine: for several teachers, ``("logits", coefficients)`` or
            ``("probs", weights)``.

    Returns:
        (loss_sum [], token_count [] = sum_i m_i w_i, metrics) with metrics as (sum, count)
        pairs: ``loss/<label>`` per term (unweighted, no tau^2), ``agreement`` (student top-1
        equals the teacher's), and ``topk/teacher_mass`` with a sparse teacher.
    """
    static, teacher, teacher_head, tok, dynamic = _prepare(
        student_hidden,
        student_head,
        teacher_hidden,
        teacher_head,
        sparse_teacher,
        mask,
        weights,
        targets,
        terms,
        divergence,
        temperature,
        semantics,
        chunk_size,
        student_softcap,
        teacher_softcap,
        vocab_block,
        implementation,
        teacher_combine,
    )
    student_hidden, teacher = _clear_masked(static, student_hidden, teacher, mask)
    if implementation == "custom_vjp":
        total, sums = fused_sums(
            static, student_hidden, student_head, teacher, teacher_head, tok, dynamic, vocab_mask
        )
    else:
        sparse_temperature = teacher.temperature if static.sparse else None
        inputs = chunked_inputs(static, student_hidden, teacher, tok)
        total, sums = remat_sums(
            static, inputs, student_head, teacher_head, sparse_temperature, dynamic, vocab_mask
        )
    count = jnp.sum(tok["weight"])
    for term in static.terms:
        if term.kind in COUPLED_KINDS:
            coupled = sinkhorn_values if term.kind == "sinkhorn" else multilevel_ot_values
            values = coupled(
                static,
                term,
                dynamic[term.label],
                student_hidden,
                student_head,
                jax.lax.stop_gradient(teacher[0]),
                teacher_head[0],
                tok["valid"],
                vocab_mask,
            )
            dyn = dynamic[term.label]
            values = clip_values(term, dyn, values)
            s = jnp.sum(jnp.where(tok["weight"] != 0, values * tok["weight"], 0.0))
            sums = {**sums, f"loss/{term.label}": s}
            total = total + dyn["weight"] * tau_factor(term, dyn["temperature"]) * s
    n_valid = jnp.sum(tok["valid"].astype(jnp.float32))
    metrics = {k: (s, count if k.startswith("loss/") else n_valid) for k, s in sums.items()}
    return total, count, metrics


def fused_per_token(
    student_hidden: jax.Array,
    student_head: jax.Array,
    *,
    teacher_hidden: jax.Array | None = None,
    teacher_head: jax.Array | None = None,
    sparse_teacher: topk.SparseTeacher | None = None,
    mask: jax.Array | None = None,
    targets: jax.Array | None = None,
    terms: Mapping[str, Mapping[str, Any]] | None = None,
    divergence: str = "forward_kl",
    temperature: float | jax.Array = 1.0,
    semantics: str = "renorm_both",
    vocab_mask: jax.Array | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    chunk_size: int | None = None,
    teacher_combine: tuple[str, tuple[float, ...]] | None = None,
) -> dict[str, jax.Array]:
    """Per-token values [B, T] of each token-local term, chunked like ``fused_distill_loss``.

    For selection rules (AdaKD difficulty, TIP entropies, Rho-1 excess loss) that need per-token
    statistics of the full distributions before weights are chosen. Arguments as in
    ``fused_distill_loss``; differentiable (autodiff through a checkpointed scan); invalid
    positions give 0. Sinkhorn terms couple tokens and are left out.
    """
    static, teacher, teacher_head, tok, dynamic = _prepare(
        student_hidden,
        student_head,
        teacher_hidden,
        teacher_head,
        sparse_teacher,
        mask,
        None,
        targets,
        terms,
        divergence,
        temperature,
        semantics,
        chunk_size,
        student_softcap,
        teacher_softcap,
        8192,
        "remat",
        teacher_combine,
    )
    student_hidden, teacher = _clear_masked(static, student_hidden, teacher, mask)
    sparse_temperature = teacher.temperature if static.sparse else None
    inputs = chunked_inputs(static, student_hidden, teacher, tok)
    values = per_token_scan(
        static, inputs, student_head, teacher_head, sparse_temperature, dynamic, vocab_mask
    )
    return {k: from_chunks(v, student_hidden.shape[1]) for k, v in values.items()}
