r"""The chunk kernel of ``fused``: per-chunk loss maths, the scans and the custom VJP.

``fused.fused_distill_loss`` checks its inputs and builds a ``Static`` spec (hashable) and the
dynamic term values; this module runs them: ``fused_sums`` (a ``jax.custom_vjp`` whose forward
scan also computes dL/dh and dL/dW, Liger-Kernel style), ``remat_sums`` (a checkpointed scan,
autodiff does the rest), ``per_token_scan`` (per-token values for selection rules) and
``sinkhorn_values`` (Sinkhorn over vocabulary blocks). The largest live array is
[B, chunk_size, V] in the forward and the backward pass (METHODS.md 1.14).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.losses import composite, divergences, preference, topk, transport
from distill_jax.losses.tokens import cross_entropy, entropy_from_log_probs, log_probs
from distill_jax.sharding import shard

# Term kinds besides the per-position divergences: hard-label CE, the two entropies (per-token
# statistics for selection rules), TSD-KD's ListMLE, and the OT losses, which couple tokens.
EXTRA_KINDS = (
    "ce",
    "student_entropy",
    "teacher_entropy",
    "listmle",
    "sinkhorn",
    "multilevel_ot",
)
# Terms that couple tokens: computed over vocabulary blocks after the token-chunk scan.
COUPLED_KINDS = ("sinkhorn", "multilevel_ot")


# ------------------------------------------------------------------------------ term specs


@dataclasses.dataclass(frozen=True)
class ChunkTerm:
    """Static part of one loss term (hashable; the traced part lives in ``_dynamic``)."""

    label: str  # metric name: loss/<label>
    kind: str  # a divergences.CORES name or one of EXTRA_KINDS
    semantics: str  # for a sparse teacher
    static_knobs: tuple[tuple[str, Any], ...]
    per_token_temperature: bool
    temperature_squared: bool  # multiply the per-token value by tau^2 (tau_i^2 per token)
    clipped: bool  # min(l_i, clip) before the tau^2 factor (divergence clipping)


@dataclasses.dataclass(frozen=True)
class Static:
    terms: tuple[ChunkTerm, ...]
    chunk_size: int
    student_softcap: float | None
    teacher_softcap: tuple[float | None, ...]  # one per teacher
    sparse: bool
    has_teacher: bool  # False: only teacher-free terms (ce, student_entropy)
    teacher_combine: tuple[str, tuple[float, ...]] | None  # several teachers: how to combine
    vocab_block: int


def _is_array(x) -> bool:
    return isinstance(x, jax.Array | np.ndarray) or isinstance(x, jax.core.Tracer)


def parse_terms(terms: Mapping[str, Mapping], semantics: str, batch_shape) -> tuple:
    """{label: {divergence?, weight, temperature, semantics?, temperature_squared?, clip?,
    **knobs}} -> (ChunkTerm..., dynamic)."""
    static, dynamic = [], {}
    for label, spec in terms.items():
        spec = dict(spec)
        kind = spec.pop("divergence", label)
        if kind not in divergences.CORES and kind not in EXTRA_KINDS:
            raise ValueError(
                f"Loss term {label!r}: unknown divergence {kind!r}; choose one of "
                f"{list(EXTRA_KINDS)} or {sorted(divergences.CORES)} (or set 'divergence' for a "
                "custom label)."
            )
        weight = spec.pop("weight", 1.0)
        temperature = spec.pop("temperature", 1.0)
        term_semantics = spec.pop("semantics", semantics)
        squared = bool(spec.pop("temperature_squared", False))
        clip = spec.pop("clip", None)
        per_token = _is_array(temperature) and np.ndim(temperature) > 0
        if per_token and tuple(np.shape(temperature)) != tuple(batch_shape):
            raise ValueError(
                f"Loss term {label!r}: a per-token temperature must have shape {batch_shape} "
                f"([B, T]), got {np.shape(temperature)}."
            )
        knobs_static = tuple(sorted((k, v) for k, v in spec.items() if not _is_array(v)))
        knobs_dynamic = {k: v for k, v in spec.items() if _is_array(v)}
        static.append(
            ChunkTerm(
                label, kind, term_semantics, knobs_static, per_token, squared, clip is not None
            )
        )
        dynamic[label] = dict(
            weight=weight, temperature=temperature, clip=clip, knobs=knobs_dynamic
        )
    return tuple(static), dynamic


def _knobs(term: ChunkTerm, dyn: dict) -> dict:
    return {**dict(term.static_knobs), **dyn["knobs"]}


# ----------------------------------------------------------------------------- chunk maths


def _matmul(h: jax.Array, w: jax.Array) -> jax.Array:
    """[B, C, D] x [D, V] -> [B, C, V] float32 (matmul in h's dtype, float32 accumulation)."""
    z = jnp.einsum("bcd,dv->bcv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)
    return shard(z, ("batch", "length", "vocab"))


def _softcap(z: jax.Array, cap: float | None) -> jax.Array:
    return jnp.tanh(z / cap) * cap if cap else z


def _term_values(static: Static, zs, teacher, tok, dynamic, vocab_mask) -> dict:
    """{label: (value [B, C], tau^2 factor)} of every token-local term for one chunk (not
    masked; values clipped where asked, without the factor)."""
    out = {}
    for term in static.terms:
        if term.kind in COUPLED_KINDS:
            continue
        dyn = dynamic[term.label]
        if term.per_token_temperature:  # padded positions carry tau = 0: keep them finite
            tau = jnp.where(tok["valid"], tok[f"tau/{term.label}"], 1.0)
        else:
            tau = dyn["temperature"]
        if term.kind == "ce":
            value = cross_entropy(zs, tok["targets"], vocab_mask=vocab_mask)
        elif term.kind == "listmle":
            if static.sparse:
                raise ValueError("listmle needs the teacher's full logits.")
            z_s, z_t = (
                z if vocab_mask is None else jnp.where(vocab_mask, z, -jnp.inf)
                for z in (zs, teacher)
            )
            t = tau[..., None] if jnp.ndim(tau) else tau
            value = preference.listmle(z_s, z_t, temperature=t, **_knobs(term, dyn))
        elif term.kind == "student_entropy":
            value = entropy_from_log_probs(log_probs(zs, tau, vocab_mask))
        elif term.kind == "teacher_entropy":
            if static.sparse:
                raise ValueError("teacher_entropy needs the teacher's full distribution.")
            value = entropy_from_log_probs(
                jax.lax.stop_gradient(log_probs(teacher, tau, vocab_mask))
            )
        elif static.sparse:
            value = topk.topk_divergence(
                term.kind,
                zs,
                teacher,
                semantics=term.semantics,
                temperature=tau,
                vocab_mask=vocab_mask,
                **_knobs(term, dyn),
            )
        else:
            logq = log_probs(zs, tau, vocab_mask)
            logp = jax.lax.stop_gradient(log_probs(teacher, tau, vocab_mask))
            value = divergences.get_core(term.kind)(logq, logp, **_knobs(term, dyn))
        out[term.label] = (clip_values(term, dyn, value), tau_factor(term, tau))
    return out


def clip_values(term: ChunkTerm, dyn: dict, value: jax.Array) -> jax.Array:
    """min(l, c) per token; a clipped token has zero gradient (divergence clipping)."""
    if not term.clipped:
        return value
    return jnp.where(value > dyn["clip"], jax.lax.stop_gradient(dyn["clip"]), value)


def tau_factor(term: ChunkTerm, tau):
    """tau^2 (scalar or per token) for terms with ``temperature_squared``, else 1."""
    return jnp.square(jnp.asarray(tau, jnp.float32)) if term.temperature_squared else 1.0


def _zero_sums(static: Static) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The scan carry: (loss sum, metric sums) at zero; its keys follow ``_chunk_sums``."""
    keys = [f"loss/{t.label}" for t in static.terms if t.kind not in COUPLED_KINDS]
    keys += ["agreement"] if static.has_teacher else []
    keys += ["topk/teacher_mass"] if static.sparse else []
    zero = jnp.zeros((), jnp.float32)
    return zero, {k: zero for k in keys}


def _chunk_sums(static: Static, zs, teacher, tok, dynamic, vocab_mask):
    """(weighted loss sum, {metric: sum}) of one chunk; mask x weights is ``tok["weight"]``."""
    m = tok["weight"]  # [B, C] float32
    total, sums = _zero_sums(static)
    for label, (v, factor) in _term_values(static, zs, teacher, tok, dynamic, vocab_mask).items():
        sums[f"loss/{label}"] = jnp.sum(jnp.where(m != 0, v * m, 0.0))  # metric: no tau^2
        scaled = jnp.sum(jnp.where(m != 0, v * factor * m, 0.0))
        total = total + dynamic[label]["weight"] * scaled
    valid = tok["valid"]
    if not static.has_teacher:
        return total, sums
    top_s = jnp.argmax(zs, axis=-1)
    top_t = teacher.ids[..., 0] if static.sparse else jnp.argmax(teacher, axis=-1)
    sums["agreement"] = jnp.sum(jnp.where(valid, (top_s == top_t).astype(jnp.float32), 0.0))
    if static.sparse:
        mass = jnp.exp(jax.nn.logsumexp(teacher.logprobs, -1))
        sums["topk/teacher_mass"] = jnp.sum(jnp.where(valid, mass, 0.0))
    return total, sums


# ---------------------------------------------------------------------------- chunk plumbing


def _to_chunks(x: jax.Array, c: int) -> jax.Array:
    """[B, T, ...] -> [n, B, c, ...], zero-padded along T to a multiple of c."""
    b, t = x.shape[:2]
    n = -(-t // c)
    x = jnp.pad(x, [(0, 0), (0, n * c - t)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(b, n, c, *x.shape[2:]), 1, 0)


def from_chunks(x: jax.Array, t: int) -> jax.Array:
    """[n, B, c, ...] -> [B, t, ...]."""
    n, b, c = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(b, n * c, *x.shape[3:])[:, :t]


def chunked_inputs(static: Static, student_hidden, teacher, tok):
    """Scan inputs: hidden, teacher (hidden or the sparse arrays) and token arrays, chunked."""
    if static.sparse:
        teacher = (teacher.ids, teacher.logprobs, teacher.log_normalizer, teacher.log_tail)
    return jax.tree.map(lambda x: _to_chunks(x, static.chunk_size), (student_hidden, teacher, tok))


def _teacher_logits(static: Static, t_chunk, teacher_head, sparse_temperature, vocab_mask=None):
    """Teacher side of one chunk: logits [B, C, V] or a SparseTeacher [B, C, K], constant.

    Several teachers (tuples of hidden states and heads) are combined per chunk:
    ``("logits", c)``: z = sum_j c_j z_j (e.g. a composite z_a + alpha (z_b - z_c));
    ``("aligndistil", (scale, max_alpha))``: three teachers, z = z_a + alpha_t (z_b - z_c) with
    AlignDistil's per-token alpha_t (``composite.token_adaptive_alpha``);
    ``("probs", w)``: z = log sum_j w_j softmax(z_j), the log of the probability average, used
    as the teacher's logits (a temperature then tempers the averaged distribution).
    """
    if static.sparse:
        return jax.lax.stop_gradient(topk.SparseTeacher(*t_chunk, sparse_temperature))
    if not static.has_teacher:
        return None
    zs = [
        _softcap(_matmul(h, w), cap)
        for h, w, cap in zip(t_chunk, teacher_head, static.teacher_softcap)
    ]
    if static.teacher_combine is None:
        z = zs[0]
    elif static.teacher_combine[0] == "logits":
        z = sum(c * z_j for c, z_j in zip(static.teacher_combine[1], zs))
    elif static.teacher_combine[0] == composite.ADAPTIVE:
        scale, max_alpha = static.teacher_combine[1]
        alpha = composite.token_adaptive_alpha(
            zs[1], zs[2], scale=scale, max_alpha=max_alpha, vocab_mask=vocab_mask
        )
        z = composite.composite_logits(*zs, alpha)
    else:
        logp = jnp.stack([log_probs(z_j, 1.0, vocab_mask) for z_j in zs])  # [J, B, C, V]
        log_w = jnp.log(jnp.asarray(static.teacher_combine[1], jnp.float32))[:, None, None, None]
        z = jax.nn.logsumexp(logp + log_w, axis=0)
    return jax.lax.stop_gradient(z)


def remat_sums(static, inputs, student_head, teacher_head, sparse_temperature, dynamic, vm):
    """(loss sum, metric sums) by a checkpointed scan; autodiff gives every gradient."""

    @jax.checkpoint
    def body(carry, x):
        h, t, tk = x
        zs = _softcap(_matmul(h, student_head), static.student_softcap)
        zt = _teacher_logits(static, t, teacher_head, sparse_temperature, vm)
        return jax.tree.map(jnp.add, carry, _chunk_sums(static, zs, zt, tk, dynamic, vm)), None

    return jax.lax.scan(body, _zero_sums(static), inputs)[0]


def _sums_and_grads(static, inputs, student_head, teacher_head, sparse_temperature, dynamic, vm):
    """One scan: (loss sum, metric sums), dL/dh [n, B, C, D] and dL/dW [D, V] float32."""

    def body(carry, x):
        sums, dw = carry
        h, t, tk = x
        z = _matmul(h, student_head)
        zt = _teacher_logits(static, t, teacher_head, sparse_temperature, vm)
        loss = lambda z: _chunk_sums(
            static, _softcap(z, static.student_softcap), zt, tk, dynamic, vm
        )
        (total, chunk_sums), dz = jax.value_and_grad(loss, has_aux=True)(z)
        dz = dz.astype(h.dtype)  # [B, C, V]
        w = student_head.astype(h.dtype)
        dh = jnp.einsum("bcv,dv->bcd", dz, w, preferred_element_type=jnp.float32)
        dw = dw + jnp.einsum("bcd,bcv->dv", h, dz, preferred_element_type=jnp.float32)
        sums = jax.tree.map(jnp.add, sums, (total, chunk_sums))
        return (sums, dw), dh.astype(h.dtype)

    init = (_zero_sums(static), jnp.zeros(student_head.shape, jnp.float32))
    (sums, dw), dh = jax.lax.scan(body, init, inputs)
    return sums, dh, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def fused_sums(static, student_hidden, student_head, teacher, teacher_head, tok, dynamic, vm):
    sparse_temperature = teacher.temperature if static.sparse else None
    inputs = chunked_inputs(static, student_hidden, teacher, tok)
    return remat_sums(static, inputs, student_head, teacher_head, sparse_temperature, dynamic, vm)


def _fused_sums_fwd(static, student_hidden, student_head, teacher, teacher_head, tok, dynamic, vm):
    sparse_temperature = teacher.temperature if static.sparse else None
    inputs = chunked_inputs(static, student_hidden, teacher, tok)
    sums, dh, dw = _sums_and_grads(
        static, inputs, student_head, teacher_head, sparse_temperature, dynamic, vm
    )
    dh = from_chunks(dh, student_hidden.shape[1])
    return sums, (dh, dw.astype(student_head.dtype))


def _fused_sums_bwd(static, residuals, cotangents):
    dh, dw = residuals
    g = cotangents[0]  # only the loss sum is differentiated; metric sums carry no gradient
    return ((g * dh).astype(dh.dtype), (g * dw).astype(dw.dtype), None, None, None, None, None)


fused_sums.defvjp(_fused_sums_fwd, _fused_sums_bwd)


def per_token_scan(static, inputs, student_head, teacher_head, sparse_temperature, dynamic, vm):
    """Per-token values of every token-local term, [n, B, C] each (checkpointed scan)."""

    @jax.checkpoint
    def body(_, x):
        h, t, tk = x
        zs = _softcap(_matmul(h, student_head), static.student_softcap)
        zt = _teacher_logits(static, t, teacher_head, sparse_temperature, vm)
        values = _term_values(static, zs, zt, tk, dynamic, vm)
        return None, {k: jnp.where(tk["valid"], v, 0.0) for k, (v, _) in values.items()}

    return jax.lax.scan(body, None, inputs)[1]


# --------------------------------------------------------------------------------- Sinkhorn


def sinkhorn_values(
    static, term, dyn, student_hidden, student_head, teacher_hidden, teacher_head, valid, vm
):
    """Per-token Sinkhorn values [B, T] over vocabulary blocks (no [B, T, V] array).

    Pass 1 takes each side's log-normaliser per token (token chunks); pass 2 accumulates
    ||q_i||^2, ||p_j||^2 and q_i . p_j one vocabulary block at a time.
    """
    knobs = _knobs(term, dyn)
    scope = knobs.get("scope", "batch")
    if scope not in ("batch", "sequence"):
        raise ValueError(f"sinkhorn: scope={scope!r} must be 'batch' or 'sequence'.")
    tau = dyn["temperature"]
    tau = jnp.asarray(tau, jnp.float32)
    tau_v = tau[..., None] if tau.ndim else tau
    b, t = valid.shape

    def scaled(h, w, cap, mask_b):
        z = (
            _softcap(
                jnp.einsum("btd,dv->btv", h, w.astype(h.dtype), preferred_element_type=jnp.float32),
                cap,
            )
            / tau_v
        )
        return jnp.where(mask_b, z, -jnp.inf)

    s_blocks, mask_blocks = transport.vocab_blocks(student_head, vm, static.vocab_block)
    blocks = (
        s_blocks,
        transport.vocab_blocks(teacher_head, vm, static.vocab_block)[0],
        mask_blocks,
    )
    vb = mask_blocks.shape[1]

    @jax.checkpoint
    def lse_body(carry, x):
        ws, wt, mb = x
        ls = jax.nn.logsumexp(scaled(student_hidden, ws, static.student_softcap, mb), -1)
        lt = jax.nn.logsumexp(scaled(teacher_hidden, wt, static.teacher_softcap[0], mb), -1)
        return (jnp.logaddexp(carry[0], ls), jnp.logaddexp(carry[1], lt)), None

    neg = jnp.full((b, t), -jnp.inf, jnp.float32)
    (lse_s, lse_t), _ = jax.lax.scan(lse_body, (neg, neg), blocks)
    lse_t = jax.lax.stop_gradient(lse_t)
    group = b * t if scope == "batch" else t

    @jax.checkpoint
    def gram_body(carry, x):
        ws, wt, mb = x
        q = jnp.exp(scaled(student_hidden, ws, static.student_softcap, mb) - lse_s[..., None])
        p = jnp.exp(scaled(teacher_hidden, wt, static.teacher_softcap[0], mb) - lse_t[..., None])
        p = jax.lax.stop_gradient(p)
        q, p = q.reshape(-1, group, vb), p.reshape(-1, group, vb)
        qq, pp, qp = carry
        return (
            qq + jnp.sum(q * q, -1),
            pp + jnp.sum(p * p, -1),
            qp + jnp.einsum("gnv,gmv->gnm", q, p),
        ), None

    g = b * t // group
    init = (jnp.zeros((g, group)), jnp.zeros((g, group)), jnp.zeros((g, group, group)))
    (qq, pp, qp), _ = jax.lax.scan(gram_body, init, blocks)
    values = divergences.sinkhorn_from_gram(
        qq,
        pp,
        qp,
        valid.reshape(g, group),
        epsilon=knobs.get("epsilon", 0.1),
        num_iters=knobs.get("num_iters", 20),
    )
    return values.reshape(b, t)


def multilevel_ot_values(
    static, term, dyn, student_hidden, student_head, teacher_hidden, teacher_head, valid, vm
):
    """Per-token ``multilevel_ot`` values [B, T] over vocabulary blocks (``transport.py``)."""
    return transport.multilevel_ot_from_hidden(
        student_hidden,
        student_head,
        teacher_hidden,
        teacher_head,
        valid,
        temperature=dyn["temperature"],
        vocab_mask=vm,
        student_softcap=static.student_softcap,
        teacher_softcap=static.teacher_softcap[0],
        vocab_block=static.vocab_block,
        **_knobs(term, dyn),
    )
