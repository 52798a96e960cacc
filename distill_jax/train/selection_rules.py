r"""Token-selection rules (``loss_options.selection.kind``), one function per rule.

Each rule is ``rule(inputs, spec, state, terms, knobs) -> (weights [B, T] or None, terms,
metrics)``: ``inputs`` the ``objective.LossInputs``, ``spec`` the ``objective.LossSpec``,
``state`` the controllers (AdaKD's ratio), ``terms`` the fused term dicts of this step (a rule may
return them changed: AdaKD's per-token temperature, clipping's cap), ``knobs`` the rule's checked
knobs (``terms.SELECTIONS``). The per-token statistics are computed through the same chunked
head as the loss (``fused.fused_per_token``), under ``stop_gradient``. Sources: METHODS.md 3.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from distill_jax.losses import fused, selection


def teacher_kwargs(inputs) -> dict:
    """The fused loss's teacher and soft-cap arguments from the inputs."""
    kw = dict(student_softcap=inputs.student_softcap)
    if inputs.sparse_teacher is not None:
        return dict(kw, sparse_teacher=inputs.sparse_teacher)
    return dict(
        kw,
        teacher_hidden=inputs.teacher_hidden,
        teacher_head=inputs.teacher_head,
        teacher_softcap=inputs.teacher_softcap,
        teacher_combine=inputs.teacher_combine,
    )


def head_kwargs(inputs, spec) -> dict:
    """The fused head's token arguments (mask, targets, vocab_mask) and the spec's chunking
    and top-k semantics."""
    return dict(
        mask=inputs.mask,
        targets=inputs.targets,
        vocab_mask=inputs.vocab_mask,
        chunk_size=spec.options["head_chunk_tokens"],
        semantics=spec.options["semantics"],
    )


def token_stats(inputs, spec, terms: dict) -> dict:
    """Per-token statistics (no gradient) for a selection rule, chunked like the loss."""
    kw = dict(head_kwargs(inputs, spec), **teacher_kwargs(inputs))
    values = fused.fused_per_token(inputs.student_hidden, inputs.student_head, terms=terms, **kw)
    return jax.lax.stop_gradient(values)


def _reference_stats(inputs, spec, kind: str) -> jax.Array:
    """The reference model's per-token CE (Rho-1) or FKL to the teacher (AdaSPEC)."""
    if inputs.reference_hidden is None:
        raise ValueError(f"selection kind {kind!r} needs reference_hidden and reference_head.")
    ref = inputs.replace(student_hidden=inputs.reference_hidden, student_head=inputs.reference_head)
    if kind == "rho1":  # CE needs no teacher; the reference stands in for it
        ref = ref.replace(
            teacher_hidden=inputs.reference_hidden,
            teacher_head=inputs.reference_head,
            sparse_teacher=None,
            teacher_combine=None,
            teacher_softcap=None,
        )
        return token_stats(ref, spec, {"ce": {}})["ce"]
    return token_stats(ref, spec, {"forward_kl": {}})["forward_kl"]


def _label(spec, knobs) -> str:
    return knobs.get("term") or spec.divergence_labels()[0]


def none(inputs, spec, state, terms, knobs):
    """Every valid token with weight 1."""
    return None, terms, {}


def adakd(inputs, spec, state, terms, knobs):
    """AdaKD: keep the hardest ``ratio`` of tokens by ``score``, each with its IDTS temperature."""
    label = _label(spec, knobs)
    s = token_stats(inputs, spec, {"score": {"divergence": knobs["score"]}})["score"]
    keep = selection.adakd_token_mask(s, inputs.mask, state["adakd"].ratio)
    base = terms[label].get("temperature", 1.0)
    tau = selection.idts_temperatures(s, keep, base_temperature=base, kappa=knobs["kappa"])
    terms = {**terms, label: {**terms[label], "temperature": tau}}
    return keep, terms, {"selection/ratio": (state["adakd"].ratio, jnp.ones(()))}


def _entropies(inputs, spec, score: str) -> dict:
    return token_stats(
        inputs,
        spec,
        {
            "hs": {"divergence": "student_entropy"},
            "ht": {"divergence": "teacher_entropy"},
            "d": {"divergence": score},
        },
    )


def tsd(inputs, spec, state, terms, knobs):
    """TSD-KD: confidence weights from the student's and the teacher's entropies."""
    stats = _entropies(inputs, spec, "reverse_kl")
    return selection.tsd_confidence_weights(stats["hs"], stats["ht"], inputs.mask), terms, {}


def tip(inputs, spec, state, terms, knobs):
    """TIP: ``rule="entropy"``: the top ``fraction`` (50 %) of tokens by the student's entropy
    (``selection.tip_entropy_mask``); ``rule="quadrants"``: the entropy x divergence quadrants
    named in ``keep``."""
    stats = _entropies(inputs, spec, knobs["score"])
    if knobs["rule"] == "entropy":
        keep = selection.tip_entropy_mask(
            stats["hs"], inputs.mask, knobs["fraction"], per_row=knobs["per_row"]
        )
        return keep, terms, {}
    quads = selection.tip_quadrants(stats["hs"], stats["d"], inputs.mask)
    weights = jnp.zeros(inputs.mask.shape, bool)
    if "high_entropy" in knobs["keep"]:
        weights |= quads.high_entropy_high_divergence | quads.high_entropy_low_divergence
    if "low_entropy_high_divergence" in knobs["keep"]:
        weights |= quads.low_entropy_high_divergence
    return weights, terms, {}


def clip(inputs, spec, state, terms, knobs):
    """Divergence clipping: min(l_i, cap), the cap fixed or the batch's ``quantile``."""
    label, cap = _label(spec, knobs), knobs["cap"]
    if cap is None:
        plain = {**terms[label], "temperature_squared": False}  # clip the divergence itself
        values = token_stats(inputs, spec, {label: plain})[label]
        cap = selection.masked_quantile(values, inputs.mask, knobs["quantile"])
    cap = jnp.asarray(cap, jnp.float32)
    terms = {**terms, label: {**terms[label], "clip": cap}}
    return None, terms, {"selection/clip": (cap, jnp.ones(()))}


def rho1(inputs, spec, state, terms, knobs):
    """Rho-1: the tokens with the largest excess CE over the reference model."""
    ref = _reference_stats(inputs, spec, "rho1")
    own = token_stats(inputs, spec, {"ce": {}})["ce"]
    return selection.rho1_token_mask(own, ref, inputs.mask, knobs["keep_ratio"]), terms, {}


def adaspec(inputs, spec, state, terms, knobs):
    """AdaSPEC: the tokens the reference fits well, by FKL to the teacher."""
    ref = _reference_stats(inputs, spec, "adaspec")
    own = token_stats(inputs, spec, {"forward_kl": {}})["forward_kl"]
    return selection.adaspec_token_mask(own, ref, inputs.mask, knobs["keep_ratio"]), terms, {}
