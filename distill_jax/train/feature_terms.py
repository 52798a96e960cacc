r"""Feature loss terms: per-token values [B, T] of each registered feature term, from the
intermediates the models return (``Transformer.forward(output_hidden_states=...,
output_attention_qkv=...)``) and supplied by the teacher (``teachers``).

    hidden_mse, hidden_cosine       per mapped layer pair (``layer_pairs``), with projectors
    attention_relation, value_relation   MiniLM's q-k and v-v relations at one layer pair
    attention_transfer              MSE of the two attention maps at one layer pair, rebuilt
                                    from q and k with each model's scale, softcap and window
    output_relation                 KL between the position-to-position similarity rows of the
                                    two output distributions (our relation loss, not Align-TI's
                                    TPA; materialises [B, T, V] logits of both models)

Reduced by the objective with the token mask and selection weights (``objective.loss_groups``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from distill_jax.losses import features
from distill_jax.train.terms import Term

F32 = jnp.float32


def layer_pairs(term: Term, num_layers):
    """(student_layer, teacher_layer) block pairs of a hidden-state term: its explicit ``pairs``
    or ``features.layer_map(L_s, L_t, kind=layers)``."""
    if term.knobs["pairs"] is not None:
        return tuple(tuple(p) for p in term.knobs["pairs"])
    if num_layers is None:
        raise ValueError("Layer-mapped feature terms need num_layers=(L_student, L_teacher).")
    return features.layer_map(*num_layers, kind=term.knobs["layers"])


def _hidden(inputs, label, term, projectors):
    s_hs, t_hs = inputs.student_hidden_states, inputs.teacher_hidden_states
    if s_hs is None or t_hs is None:
        raise ValueError(f"Loss term {label!r} needs student and teacher hidden_states.")
    pairs = layer_pairs(term, (len(s_hs) - 1, len(t_hs) - 1))
    k = term.knobs
    knobs = {"normalize": k["normalize"]} if k.get("normalize") is not None else {}
    return features.layerwise_hidden_loss(
        term.entry.fn,
        s_hs,
        jax.lax.stop_gradient(t_hs),
        inputs.mask,
        pairs,
        projectors=projectors,
        **knobs,
    )


def _layer_qkv(inputs, label, term):
    if inputs.student_qkv is None or inputs.teacher_qkv is None:
        raise ValueError(f"Loss term {label!r} needs student_qkv and teacher_qkv.")
    k = term.knobs
    s = inputs.student_qkv[k["student_layer"]]
    return s, jax.lax.stop_gradient(inputs.teacher_qkv[k["teacher_layer"]])


def _relation(inputs, label, term):
    s, t = _layer_qkv(inputs, label, term)
    kw = dict(
        num_relation_heads=term.knobs["num_relation_heads"],
        positions=inputs.positions,
        segment_ids=inputs.segment_ids,
    )
    if term.kind == "attention_relation":
        return term.entry.fn(s["q"], s["k"], t["q"], t["k"], inputs.mask, **kw)
    return term.entry.fn(s["v"], t["v"], inputs.mask, **kw)


def _transfer(inputs, label, term):
    """Attention-transfer MSE at (student_layer, teacher_layer): both maps rebuilt from q, k
    as each model's own layer computes them (``ModelConfig.attention_layers``)."""
    if inputs.student_attention is None or inputs.teacher_attention is None:
        raise ValueError(f"Loss term {label!r} needs both models' attention settings.")
    s, t = _layer_qkv(inputs, label, term)
    k = term.knobs
    s_scale, s_cap, s_window = inputs.student_attention[k["student_layer"]]
    t_scale, t_cap, t_window = inputs.teacher_attention[k["teacher_layer"]]
    where = dict(positions=inputs.positions, segment_ids=inputs.segment_ids)
    s_probs = features.attention_probs(
        s["q"], s["k"], **where, scale=s_scale, softcap=s_cap, sliding_window=s_window
    )
    t_probs = features.attention_probs(
        t["q"], t["k"], **where, scale=t_scale, softcap=t_cap, sliding_window=t_window
    )
    return term.entry.fn(
        s_probs,
        t_probs,
        inputs.mask,
        **where,
        sliding_window=s_window,
        l1_normalize=k["l1_normalize"],
    )


def _logits(hidden, head, softcap):
    z = jnp.einsum("btd,dv->btv", hidden, head.astype(hidden.dtype), preferred_element_type=F32)
    return jnp.tanh(z / softcap) * softcap if softcap else z


def _output_relation(inputs, label, term):
    if inputs.teacher_hidden is None or inputs.teacher_head is None:
        raise ValueError(f"Loss term {label!r} needs the teacher's final hidden states.")
    z_s = _logits(inputs.student_hidden, inputs.student_head, inputs.student_softcap)
    z_t = _logits(inputs.teacher_hidden, inputs.teacher_head, inputs.teacher_softcap)
    k = term.knobs
    return term.entry.fn(
        z_s,
        jax.lax.stop_gradient(z_t),
        inputs.mask,
        temperature=k["temperature"],
        similarity_temperature=k["similarity_temperature"],
    )


_BY_KIND = {
    "hidden_mse": None,
    "hidden_cosine": None,
    "attention_relation": _relation,
    "value_relation": _relation,
    "attention_transfer": _transfer,
    "output_relation": _output_relation,
}


def feature_values(inputs, label: str, term: Term, projectors) -> jax.Array:
    """[B, T] float32 values of feature term ``term`` (labelled ``label``); ``projectors`` are
    its trainable parameters (hidden-state terms) or None."""
    if term.kind not in _BY_KIND:
        raise ValueError(f"Loss term {label!r}: no feature computation for {term.kind!r}.")
    fn = _BY_KIND[term.kind]
    return _hidden(inputs, label, term, projectors) if fn is None else fn(inputs, label, term)
