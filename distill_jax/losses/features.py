r"""Feature losses: hidden states, MiniLM relations, attention transfer, output relations, and
the UniSD contrastive hinge (METHODS.md section 5).

Every loss returns per-token values [B, T] in float32, zero where ``mask`` is False, not reduced
(``tokens.masked_sum_and_count`` reduces). Teacher inputs are constants (``stop_gradient``).
Attention-side inputs are the per-layer q, k, v that ``Transformer.forward(...,
output_attention_qkv=True)`` returns in ``ModelOutput.attention_qkv`` (the blocks' "qkv"
intermediates, ``models.transformer.BLOCK_INTERMEDIATES``; hidden states are their "output");
which keys a query sees follows ``models.attention.attention_mask`` (same segment, not in the
future, inside the window), with the ``positions`` and ``segment_ids`` given to the model
(defaults: 0..T-1, one segment).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from distill_jax.losses.divergences import kl_core
from distill_jax.losses.tokens import NEG_INF, apply_mask, log_probs
from distill_jax.models.attention import attention_mask

Projector = dict[str, jax.Array]  # {"kernel": [D_s, D_t]}: bias-free linear map

# --------------------------------------------------------------------------- projector (5.1)

_PROJECTOR_INITS: dict[str, Callable] = {
    "xavier": jax.nn.initializers.glorot_uniform(),
    "kaiming": jax.nn.initializers.he_normal(),  # fan_in = D_s
    "zeros": lambda key, shape, dtype: jnp.zeros(shape, dtype),
    # Rectangular identity: copies the first min(D_s, D_t) channels.
    "identity": lambda key, shape, dtype: jnp.eye(*shape, dtype=dtype),
}


def init_projector(
    key: jax.Array, d_student: int, d_teacher: int, init: str = "xavier", dtype=jnp.float32
) -> Projector:
    """A bias-free linear projector P: R^{D_s} -> R^{D_t}; trained with the student, not exported.

    Source: METHODS.md 5.1; google/tunix ``tunix/distillation/strategies/feature_projection.py``,
    arcee-ai/DistillKit ``distillkit/lossfuncs/hidden_state.py``.

    Args:
        key: PRNG key (unused by "zeros" and "identity").
        d_student, d_teacher: widths D_s, D_t.
        init: "xavier" (Glorot uniform), "kaiming" (He normal, fan-in), "zeros" or "identity".
        dtype: parameter dtype.

    Returns:
        {"kernel": [D_s, D_t]}, a plain pytree for the optimizer.
    """
    if init not in _PROJECTOR_INITS:
        raise ValueError(f"init={init!r}: choose one of {sorted(_PROJECTOR_INITS)}.")
    return {"kernel": _PROJECTOR_INITS[init](key, (d_student, d_teacher), dtype)}


def apply_projector(params: Projector | None, h: jax.Array) -> jax.Array:
    """P(h) = h W in float32; [..., D_s] -> [..., D_t]. ``params=None`` is the identity."""
    h = h.astype(jnp.float32)
    if params is None:
        return h
    return jnp.einsum("...d,de->...e", h, params["kernel"].astype(jnp.float32))


# ----------------------------------------------------------------------- hidden states (5.1)


def _teacher_mean_square(t: jax.Array, mask: jax.Array | None, normalize: str) -> jax.Array:
    """Mean of t^2 over the valid tokens: a scalar ("global") or one per channel [D_t]."""
    valid = jnp.ones(t.shape[:-1], jnp.float32) if mask is None else mask.astype(jnp.float32)
    sq = jnp.where(valid[..., None] > 0, t * t, 0.0)
    count = jnp.maximum(jnp.sum(valid), 1.0)
    if normalize == "global":
        ms = jnp.sum(sq) / (count * t.shape[-1])
    elif normalize == "channel":
        ms = jnp.sum(sq.reshape(-1, t.shape[-1]), axis=0) / count
    else:
        raise ValueError(f"normalize={normalize!r}: choose None, 'global' or 'channel'.")
    return jnp.maximum(ms, 1e-12)


def _project_pair(student_h, teacher_h, projector):
    s = apply_projector(projector, student_h)
    t = jax.lax.stop_gradient(teacher_h.astype(jnp.float32))
    if s.shape != t.shape:
        raise ValueError(
            f"student features {s.shape} (after the projector) and teacher features {t.shape} "
            "differ; pass projector=init_projector(key, d_student, d_teacher)."
        )
    return s, t


def hidden_mse(
    student_h: jax.Array,
    teacher_h: jax.Array,
    mask: jax.Array | None = None,
    *,
    projector: Projector | None = None,
    normalize: str | None = None,
) -> jax.Array:
    r"""Per-token hidden-state MSE ||P(h_s) - h_t||^2 / D_t.

    ``normalize`` divides the squared error by the teacher's mean square over the valid tokens of
    this batch, one number ("global") or one per channel ("channel") `[design]`: a relative MSE
    that does not depend on the teacher's activation scale. It couples the tokens of the batch
    (under jit with sharding the statistic is over the global batch).

    Source: METHODS.md 5.1; arcee-ai/DistillKit ``distillkit/lossfuncs/hidden_state.py``;
    google/tunix ``feature_projection.py``; UniSD (Ahren09/UniSD) final-layer MSE, no projector.

    Args:
        student_h: [B, T, D_s] float.
        teacher_h: [B, T, D_t] float, constant.
        mask: [B, T] bool or None; masked positions give 0 and are left out of the statistic.
        projector: ``init_projector`` params, or None when D_s = D_t.
        normalize: None, "global" or "channel".

    Returns:
        [B, T] float32.
    """
    s, t = _project_pair(student_h, teacher_h, projector)
    err = (s - t) ** 2  # [B, T, D_t]
    if normalize is not None:
        err = err / _teacher_mean_square(t, mask, normalize)
    return apply_mask(jnp.mean(err, axis=-1), mask)


def _safe_norm(x: jax.Array, eps: float) -> jax.Array:
    """max(||x||, eps) over the last axis, with a zero (not NaN) gradient at x = 0."""
    return jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1), eps * eps))


def hidden_cosine(
    student_h: jax.Array,
    teacher_h: jax.Array,
    mask: jax.Array | None = None,
    *,
    projector: Projector | None = None,
    eps: float = 1e-8,
) -> jax.Array:
    r"""Per-token cosine distance 1 - <P(h_s), h_t> / (max(||P(h_s)||, eps) max(||h_t||, eps)).

    All-zero features give loss 1 and a finite gradient (the norms are floored at ``eps`` as in
    ``torch.nn.functional.cosine_similarity``).

    Source: METHODS.md 5.1; google/tunix ``feature_pooling.py`` (cosine); MaxText masked cosine.

    Args:
        student_h: [B, T, D_s] float.
        teacher_h: [B, T, D_t] float, constant.
        mask: [B, T] bool or None.
        projector: ``init_projector`` params, or None when D_s = D_t.
        eps: norm floor.

    Returns:
        [B, T] float32 in [0, 2].
    """
    s, t = _project_pair(student_h, teacher_h, projector)
    cos = jnp.sum(s * t, axis=-1) / (_safe_norm(s, eps) * _safe_norm(t, eps))
    return apply_mask(1.0 - cos, mask)


def layer_map(
    num_student_layers: int,
    num_teacher_layers: int,
    kind: str = "uniform",
    pairs: Sequence[tuple[int, int]] | None = None,
) -> tuple[tuple[int, int], ...]:
    r"""(student_layer, teacher_layer) pairs of block indices in [0, L).

    "uniform": l_t = round((l_s + 1) L_t / L_s) - 1 for every student layer, rounding halves up
    and clamped to >= 0 `[design]` (the last layers are paired); "all": l_t = l_s (needs
    L_s = L_t); "last": only the last layers. Explicit ``pairs`` override ``kind``.
    Source: METHODS.md 5.1.

    Returns:
        A tuple of (l_s, l_t). Block l's output is ``hidden_states[l + 1]`` (index 0 is the
        embeddings), which ``layerwise_hidden_loss`` takes care of.
    """
    ls, lt = num_student_layers, num_teacher_layers
    if pairs is not None:
        pairs = tuple((int(a), int(b)) for a, b in pairs)
        bad = [p for p in pairs if not (0 <= p[0] < ls and 0 <= p[1] < lt)]
        if bad or not pairs:
            raise ValueError(f"layer pairs {bad or pairs} are outside [0, {ls}) x [0, {lt}).")
        return pairs
    if kind == "uniform":
        # round(x) = floor(x + 1/2) with x = (l_s + 1) L_t / L_s, in integers.
        return tuple((s, max(0, (2 * (s + 1) * lt + ls) // (2 * ls) - 1)) for s in range(ls))
    if kind == "all":
        if ls != lt:
            raise ValueError(f"kind='all' needs equal depths, got {ls} and {lt}; use 'uniform'.")
        return tuple((s, s) for s in range(ls))
    if kind == "last":
        return ((ls - 1, lt - 1),)
    raise ValueError(f"kind={kind!r}: choose 'uniform', 'all', 'last' or give pairs.")


def layerwise_hidden_loss(
    loss_fn: Callable[..., jax.Array],
    student_hidden_states: Sequence[jax.Array],
    teacher_hidden_states: Sequence[jax.Array],
    mask: jax.Array | None,
    pairs: Sequence[tuple[int, int]],
    *,
    projectors: Projector | Sequence[Projector | None] | None = None,
    **knobs,
) -> jax.Array:
    r"""(1 / |pairs|) sum_{(l_s, l_t)} loss_fn(h_s[l_s + 1], h_t[l_t + 1], mask, projector=P).

    Source: METHODS.md 5.1 (average over mapped pairs).

    Args:
        loss_fn: ``hidden_mse`` or ``hidden_cosine`` (or any function of that signature).
        student_hidden_states, teacher_hidden_states: ``ModelOutput.hidden_states``, L + 1 arrays
            [B, T, D] each (embeddings, then each block's output).
        mask: [B, T] bool or None.
        pairs: from ``layer_map``.
        projectors: None, one projector shared by all pairs, or one (or None) per pair.
        **knobs: passed to ``loss_fn`` (e.g. normalize="global").

    Returns:
        [B, T] float32.
    """
    if not pairs:
        raise ValueError("layerwise_hidden_loss needs at least one layer pair.")
    if projectors is None or isinstance(projectors, dict):
        projectors = [projectors] * len(pairs)
    if len(projectors) != len(pairs):
        raise ValueError(f"{len(projectors)} projectors for {len(pairs)} layer pairs.")
    ns, nt = len(student_hidden_states) - 1, len(teacher_hidden_states) - 1
    for l_s, l_t in pairs:
        if not (0 <= l_s < ns and 0 <= l_t < nt):
            raise ValueError(f"pair ({l_s}, {l_t}) is outside {ns} x {nt} layers.")
    terms = [
        loss_fn(
            student_hidden_states[l_s + 1],
            teacher_hidden_states[l_t + 1],
            mask,
            projector=p,
            **knobs,
        )
        for (l_s, l_t), p in zip(pairs, projectors)
    ]
    return sum(terms) / len(terms)


# ------------------------------------------------------------------ attention probabilities


def _visible(b: int, t: int, positions, segment_ids, sliding_window) -> jax.Array:
    """[B, T, T] bool: the keys each query sees (``models.attention.attention_mask``)."""
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    return attention_mask(positions, segment_ids, positions, segment_ids, sliding_window)


def _expand_kv_heads(k: jax.Array, num_heads: int) -> jax.Array:
    """[B, S, K, H] -> [B, S, N, H]: query head n reads kv head n // (N / K), as in Attention."""
    kv = k.shape[2]
    if num_heads % kv:
        raise ValueError(f"{num_heads} query heads are not a multiple of {kv} kv heads.")
    return jnp.repeat(k, num_heads // kv, axis=2)


def attention_probs(
    q: jax.Array,
    k: jax.Array,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
) -> jax.Array:
    r"""softmax(mask(softcap(q k^T * scale))) over keys, as ``models.attention.Attention`` does it.

    Rebuilds a layer's attention-probability map from the q, k it returns with
    ``output_attention_qkv=True``; for a model layer take ``scale``, ``softcap`` and
    ``sliding_window`` from the model's config (``attention_probs_from_model`` does).

    Args:
        q: [B, T, N, H] (after q-norm and RoPE).
        k: [B, T, K, H]; K divides N (grouped-query attention).
        positions, segment_ids: [B, T] int as given to the model, or None (0..T-1, one segment).
        scale: score scale; None gives H^-0.5.
        softcap: tanh logit softcap or None.
        sliding_window: as in ``attention_mask``, or None.

    Returns:
        [B, N, T, T] float32; each row sums to 1 over the visible keys.
    """
    b, t, n, h = q.shape
    k = _expand_kv_heads(k, n)  # [B, T, N, H]
    scores = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (h**-0.5 if scale is None else scale)
    if softcap:
        scores = jnp.tanh(scores / softcap) * softcap
    visible = _visible(b, t, positions, segment_ids, sliding_window)
    scores = jnp.where(visible[:, None], scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


def attention_probs_from_model(
    model, attention_qkv: Sequence[dict[str, jax.Array]], positions=None, segment_ids=None
) -> tuple[jax.Array, ...]:
    """Every layer's [B, N, T, T] probabilities from ``ModelOutput.attention_qkv`` of ``model``
    (the scale is ``config.attention_scale``, the one ``models.attention.Attention`` uses)."""
    c = model.config
    if len(attention_qkv) != c.num_layers:
        raise ValueError(f"Got q/k/v of {len(attention_qkv)} layers for {c.num_layers} blocks.")
    return tuple(
        attention_probs(
            qkv["q"],
            qkv["k"],
            positions,
            segment_ids,
            scale=c.attention_scale,
            softcap=c.attn_logit_softcapping,
            sliding_window=c.sliding_window if c.is_sliding(i) else None,
        )
        for i, qkv in enumerate(attention_qkv)
    )


# -------------------------------------------------------------------- MiniLM relations (5.2)


def _relation_heads(x: jax.Array, num_relation_heads: int) -> jax.Array:
    """Concatenate the heads and re-split them (MiniLMv2): [B, T, N, H] -> [B, T, R, N H / R]."""
    b, t, n, h = x.shape
    if (n * h) % num_relation_heads:
        raise ValueError(f"width N*H = {n * h} is not divisible by {num_relation_heads} heads.")
    return x.astype(jnp.float32).reshape(b, t, num_relation_heads, n * h // num_relation_heads)


def _relation_log_probs(x, y, num_relation_heads, visible):
    """log softmax_j(x_i . y_j / sqrt(d_r)) over visible j; [B, T, N, H] x 2 -> [B, R, T, T]."""
    xr = _relation_heads(x, num_relation_heads)
    yr = _relation_heads(y, num_relation_heads)
    logits = jnp.einsum("btrd,bsrd->brts", xr, yr) / math.sqrt(xr.shape[-1])
    return jax.nn.log_softmax(jnp.where(visible[:, None], logits, NEG_INF), axis=-1)


def _relation_kl(student, teacher, mask, num_relation_heads, positions, segment_ids, window):
    (sx, sy), (tx, ty) = student, teacher
    if num_relation_heads is None:
        if sx.shape[2] != tx.shape[2]:
            raise ValueError(
                f"student ({sx.shape[2]}) and teacher ({tx.shape[2]}) head counts differ; "
                "pass num_relation_heads (a divisor of both concatenated widths)."
            )
        num_relation_heads = sx.shape[2]
    b, t = sx.shape[:2]
    visible = _visible(b, t, positions, segment_ids, window)
    logq = _relation_log_probs(sx, sy, num_relation_heads, visible)
    logp = jax.lax.stop_gradient(_relation_log_probs(tx, ty, num_relation_heads, visible))
    return apply_mask(jnp.mean(kl_core(logq, logp), axis=1), mask)  # [B, R, T] -> [B, T]


def attention_relation_kl(
    student_q: jax.Array,
    student_k: jax.Array,
    teacher_q: jax.Array,
    teacher_k: jax.Array,
    mask: jax.Array | None = None,
    *,
    num_relation_heads: int | None = None,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    sliding_window: int | None = None,
) -> jax.Array:
    r"""MiniLM query-key relation: mean over relation heads of KL(A_T[i] || A_S[i]) per query i.

    A = softmax(Q_r K_r^T / sqrt(d_r)) with the causal/segment mask applied before each row
    softmax `[design]`; Q_r, K_r are the concatenated heads re-split into R relation heads of width
    d_r = N H / R (MiniLMv2), so student and teacher may differ in head count, head dim and width.
    Grouped kv heads are first repeated to the query heads, as the model does.

    Source: "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained
    Transformers" (Wang et al., 2020) and MiniLMv2 (Wang et al., 2021); METHODS.md 5.2.

    Args:
        student_q: [B, T, N_s, H_s]; student_k: [B, T, K_s, H_s].
        teacher_q: [B, T, N_t, H_t]; teacher_k: [B, T, K_t, H_t]; constants.
        mask: [B, T] bool or None; rows (queries) where False give 0.
        num_relation_heads: R dividing N_s H_s and N_t H_t; None: the common head count.
        positions, segment_ids: [B, T] int as given to the model, or None.
        sliding_window: hide keys at distance >= window, or None.

    Returns:
        [B, T] float32 >= 0.
    """
    student = (student_q, _expand_kv_heads(student_k, student_q.shape[2]))
    teacher = (teacher_q, _expand_kv_heads(teacher_k, teacher_q.shape[2]))
    return _relation_kl(
        student, teacher, mask, num_relation_heads, positions, segment_ids, sliding_window
    )


def value_relation_kl(
    student_v: jax.Array,
    teacher_v: jax.Array,
    mask: jax.Array | None = None,
    *,
    num_relation_heads: int | None = None,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    sliding_window: int | None = None,
) -> jax.Array:
    r"""MiniLM value relation: mean over relation heads of KL(VR_T[i] || VR_S[i]) per position i.

    VR = softmax(V_r V_r^T / sqrt(d_r)) under the causal/segment mask, relation heads as in
    ``attention_relation_kl``. Invariant to V -> V O for O orthogonal within each relation head.

    Source: MiniLM (Wang et al., 2020), MiniLMv2 (Wang et al., 2021); METHODS.md 5.2.

    Args:
        student_v: [B, T, K_s, H_s]; teacher_v: [B, T, K_t, H_t], constant.
        mask, num_relation_heads, positions, segment_ids, sliding_window: as in
            ``attention_relation_kl`` (R must divide K_s H_s and K_t H_t).

    Returns:
        [B, T] float32 >= 0.
    """
    return _relation_kl(
        (student_v, student_v),
        (teacher_v, teacher_v),
        mask,
        num_relation_heads,
        positions,
        segment_ids,
        sliding_window,
    )


# ------------------------------------------------------------------- attention transfer (5.3)


def _average_heads(x: jax.Array, n: int) -> jax.Array:
    """[B, M, T, S] -> [B, n, T, S], averaging groups of M / n consecutive heads."""
    b, m = x.shape[:2]
    return x.reshape(b, n, m // n, *x.shape[2:]).mean(axis=2)


def _match_heads(s: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Equal head counts: unchanged; one divides the other: average the larger in groups; else
    average both to a single map `[design]`."""
    ns, nt = s.shape[1], t.shape[1]
    if ns == nt:
        return s, t
    if nt % ns == 0:
        return s, _average_heads(t, ns)
    if ns % nt == 0:
        return _average_heads(s, nt), t
    return _average_heads(s, 1), _average_heads(t, 1)


def attention_transfer_mse(
    student_probs: jax.Array,
    teacher_probs: jax.Array,
    mask: jax.Array | None = None,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    sliding_window: int | None = None,
    l1_normalize: bool = False,
) -> jax.Array:
    r"""Per-query MSE between attention maps: (1 / (N S)) sum_{n, s visible} (A_S - A_T)^2.

    Head counts that differ are matched by averaging heads (``_match_heads``, `[design]`).
    Entries a query cannot see (future, other segment, outside the window) are zeroed on both
    sides first; ``l1_normalize`` then rescales each row to sum to 1. The masked token mean of
    this equals the mean over all [N, T, S] entries (EasyDeL's attention-transfer MSE).

    Source: METHODS.md 5.3; EasyDeL attention transfer; google/tunix ``AttentionTransferStrategy``.

    Args:
        student_probs: [B, N_s, T, T] float (e.g. from ``attention_probs``).
        teacher_probs: [B, N_t, T, T] float, constant.
        mask: [B, T] bool or None; rows (queries) where False give 0.
        positions, segment_ids, sliding_window: visibility, as in ``attention_probs``.
        l1_normalize: renormalise each visible row.

    Returns:
        [B, T] float32 >= 0.
    """
    s = student_probs.astype(jnp.float32)
    t = jax.lax.stop_gradient(teacher_probs.astype(jnp.float32))
    s, t = _match_heads(s, t)  # [B, N', T, S]
    b, _, tq, sk = s.shape
    visible = _visible(b, tq, positions, segment_ids, sliding_window)[:, None]  # [B, 1, T, S]
    s, t = jnp.where(visible, s, 0.0), jnp.where(visible, t, 0.0)
    if l1_normalize:
        s = s / (jnp.sum(s, axis=-1, keepdims=True) + 1e-12)
        t = t / (jnp.sum(t, axis=-1, keepdims=True) + 1e-12)
    err = jnp.sum((s - t) ** 2, axis=-1) / sk  # [B, N', T]
    return apply_mask(jnp.mean(err, axis=1), mask)


# -------------------------------------------- output relations (our stand-in for 5.4)


def _transition_log_probs(logp, cols, similarity_temperature, eps=1e-12):
    """Row log-softmax over visible j of cos(p_i, p_j) / tau_s; [B, T, V] -> [B, T, T]."""
    p = jnp.exp(logp)
    unit = p / _safe_norm(p, eps)[..., None]
    sim = jnp.einsum("btv,bsv->bts", unit, unit) / similarity_temperature
    return jax.nn.log_softmax(jnp.where(cols, sim, NEG_INF), axis=-1)


def output_relation_kl(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    mask: jax.Array | None = None,
    *,
    temperature: float = 1.0,
    similarity_temperature: float = 0.1,
) -> jax.Array:
    r"""KL between the position-to-position similarity rows of the two models' outputs [design].

    With p_i, q_i the teacher's and student's next-token distributions at response position i,
    R_P[i, j] = softmax_j(cos(p_i, p_j) / tau_s) over the response positions j (and likewise R_Q);
    the loss at i is KL(R_P[i] || R_Q[i]): a relation loss on output distributions, in the spirit
    of MiniLM's relations (5.2) applied to the outputs. It is our design, NOT Align-TI's
    token-transition (TPA) loss (arXiv 2602.09483), whose definition is unverified (METHODS.md
    5.4; lchen1019/Align-TI holds no training code). Only [T, T] similarities are compared, so the
    vocabularies may differ. Cost O(B T^2 V).

    Args:
        student_logits: [B, T, V] float.
        teacher_logits: [B, T, W] float, constant.
        mask: [B, T] bool or None: the response positions (rows and columns).
        temperature: softmax temperature of the output distributions.
        similarity_temperature: tau_s > 0.

    Returns:
        [B, T] float32 >= 0; 0 when the two models' output distributions are identical.
    """
    b, t = student_logits.shape[:2]
    valid = jnp.ones((b, t), bool) if mask is None else mask.astype(bool)
    # The diagonal keeps every row non-empty (rows of masked positions are zeroed at the end).
    cols = valid[:, None, :] | jnp.eye(t, dtype=bool)[None]  # [B, T, T]
    logq = _transition_log_probs(
        log_probs(student_logits, temperature), cols, similarity_temperature
    )
    logp = _transition_log_probs(
        jax.lax.stop_gradient(log_probs(teacher_logits, temperature)), cols, similarity_temperature
    )
    return apply_mask(kl_core(logq, logp), mask)


# ------------------------------------------------------------- UniSD contrastive hinge (5.5)


def contrastive_hinge(
    student_logprobs: jax.Array,
    positive_logprobs: jax.Array,
    negative_logprobs: jax.Array,
    mask: jax.Array | None = None,
    *,
    margin: float = 0.1,
) -> jax.Array:
    r"""UniSD token contrastive hinge relu(m + |lp_S - lp_T+| - |lp_S - lp_T-|).

    lp = log-prob of the sampled token under the student, the positive teacher (privileged
    context with a correct demonstration) and the negative teacher (a plausible wrong one): the
    student is pulled toward the positive teacher until it is m closer to it than to the negative.

    Source: Ahren09/UniSD (margin 0.1 in UniSD*); METHODS.md 5.5. Token log-probs come from
    ``preference.token_logprobs``.

    Args:
        student_logprobs: [B, T] float.
        positive_logprobs, negative_logprobs: [B, T] float, constants.
        mask: [B, T] bool or None.
        margin: m >= 0.

    Returns:
        [B, T] float32 >= 0.
    """
    s = student_logprobs.astype(jnp.float32)
    pos = jax.lax.stop_gradient(positive_logprobs.astype(jnp.float32))
    neg = jax.lax.stop_gradient(negative_logprobs.astype(jnp.float32))
    return apply_mask(jax.nn.relu(margin + jnp.abs(s - pos) - jnp.abs(s - neg)), mask)
