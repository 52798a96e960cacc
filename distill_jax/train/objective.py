r"""A loss spec from an ml_collections config becomes one function returning (sum, count, metrics).

The spec has two parts (configs/*.py):

    c.losses = dict(                                   # label -> term; the label picks the kind
        forward_kl=dict(weight=0.9, temperature=2.0),   # a divergence on logits (fused)
        ce=dict(weight=0.1),                            # hard-label cross-entropy, tau = 1
        kl_t1=dict(divergence="forward_kl", weight=0.0),   # weight 0: a metric only
        hidden_cosine=dict(weight=0.1, layers="uniform", projector="xavier"),  # features
    )
    c.losses = dict(alm=dict(temperature=100.0, distance="binary_kl", append_space=True))

``alm`` is the cross-tokenizer term (``bridges.alm``, needs ``config.bridge``): it is summed
over common-boundary chunks and normalised by the global *chunk* count, so it cannot be mixed
with token-normalised terms; those may stay as metrics with ``weight=0`` (or alm itself may,
for a baseline trained on the others). Its knobs:
``temperature`` (tau_b), ``distance``, ``append_space``, ``chunk_size`` (positions per step of
the student's chunked log-prob walk) and ``merge_threshold`` (> 0: minimal chunks are merged on
device while the teacher's word-boundary probability after them is <= the threshold),
``hidden_weight`` (> 0: adds the hidden-state loss at chunk ends, ``bridges.alm.
chunk_hidden_loss``, ``hidden_kind`` "mse" or "cosine", with a ``projector`` init when the widths
differ).
    c.loss_options = dict(chunk_size=None, implementation="custom_vjp", semantics="renorm_both",
                          temperature_squared=True, alpha=None, total_steps=None,
                          selection=dict(kind="none"))

Any number in a term (weight, temperature, beta, alpha, ...) or ``loss_options.alpha`` may be a
schedule ``dict(schedule="linear"|"cosine"|"constant", start=a, end=b, steps=n,
warmup_steps=0)`` evaluated at the step (MaxText's alpha/temperature/beta schedules).

**The tau^2 factor lives here and only here.** With ``temperature_squared=True`` (default) every
divergence term is multiplied by tau^2 per token (tau_i^2 for AdaKD's per-token temperatures), so
its gradient keeps its size as tau changes (Hinton et al., 2015); CE and feature terms are not.
``alpha`` (if set) scales every divergence term by alpha and ``ce`` by 1 - alpha:
L = alpha tau^2 KL(p_tau || q_tau) + (1 - alpha) CE (METHODS.md 1.12).

**Normalisation.** ``loss_fn`` returns sums: ``loss_sum = sum_terms w_term sum_i m_i s_i
l_term(i)`` and ``count = sum_i m_i s_i`` (m the loss mask, s the selection weights). The mean is
``loss_sum / N`` with N the count summed over every micro-batch and data shard of the optimizer
step (``normalize``), which is what makes gradient accumulation exact. Metrics are
``loss/<label>`` (sum, count) pairs, unweighted and without tau^2.

State carried across steps (TrainState, checkpointed): TAID's interpolation (``taid`` term) and
AdaKD's keep ratio (``selection.kind="adakd"``); ``update_state`` advances it once per optimizer
step from that step's summed metrics.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from distill_jax.bridges import alm
from distill_jax.losses import divergences, features, fused, selection
from distill_jax.losses.tokens import masked_sum_and_count

# Feature terms: label -> per-token loss on (student, teacher) hidden states or attention q/k/v.
FEATURE_LOSSES: dict[str, Callable[..., jax.Array]] = {
    "hidden_mse": features.hidden_mse,
    "hidden_cosine": features.hidden_cosine,
    "attention_relation": features.attention_relation_kl,
    "value_relation": features.value_relation_kl,
}
LOGIT_KINDS = tuple(sorted(divergences.CORES)) + fused.EXTRA_KINDS
SELECTIONS = ("none", "adakd", "tsd", "tip", "clip", "rho1", "adaspec")
_TAID_KNOBS = ("t_start", "t_end", "step_size", "momentum", "adaptive")
_ALM_KNOBS = (
    "weight",
    "temperature",
    "distance",
    "append_space",
    "chunk_size",
    "merge_threshold",
    "hidden_weight",
    "hidden_kind",
    "projector",
)
_FEATURE_KNOBS = ("weight", "layers", "pairs", "projector", "student_layer", "teacher_layer")


@struct.dataclass
class LossInputs:
    """Everything a loss term may read; unused fields stay None.

    student_hidden [B, T, D] (final, after the norm) and student_head [D, V]; the teacher as
    teacher_hidden [B, T, D_t] + teacher_head [D_t, V] or sparse_teacher (topk.SparseTeacher);
    targets [B, T] next-token ids; mask [B, T] loss mask; *_hidden_states (L + 1 arrays) and
    *_qkv (per-layer {"q", "k", "v"}) from ``Transformer.forward`` for feature terms; positions,
    segment_ids [B, T] as given to the models; reference_hidden/head for Rho-1 and AdaSPEC;
    vocab_mask [V]; softcaps and teacher_combine (static) as the models define them.
    """

    student_hidden: jax.Array
    student_head: jax.Array
    targets: jax.Array
    mask: jax.Array
    teacher_hidden: jax.Array | None = None
    teacher_head: jax.Array | None = None
    sparse_teacher: Any = None
    student_hidden_states: tuple[jax.Array, ...] | None = None
    teacher_hidden_states: tuple[jax.Array, ...] | None = None
    student_qkv: tuple[dict[str, jax.Array], ...] | None = None
    teacher_qkv: tuple[dict[str, jax.Array], ...] | None = None
    positions: jax.Array | None = None
    segment_ids: jax.Array | None = None
    reference_hidden: jax.Array | None = None
    reference_head: jax.Array | None = None
    vocab_mask: jax.Array | None = None
    # Cross-tokenizer (bridges.alm): per-token next-token and boundary log-probs of the teacher on
    # its own tokens [B, U], both sides' chunk ids [B, U] / [B, T], the student's boundary set [V].
    teacher_token_logprobs: jax.Array | None = None
    teacher_boundary_logprobs: jax.Array | None = None
    teacher_chunk: jax.Array | None = None
    student_chunk: jax.Array | None = None
    student_boundary_mask: jax.Array | None = None
    teacher_token_hidden: jax.Array | None = None  # [B, U, D_t]: the teacher's, on its tokens
    # [B, T] per-token weights from the teacher (e.g. multi-context agreement, teachers.py);
    # multiplied into the selection weights, so the normaliser is sum(mask * weights).
    token_weights: jax.Array | None = None
    # Static: the models' final-logit soft-caps and, for several teachers, how to combine them
    # (see fused.fused_distill_loss).
    student_softcap: float | None = struct.field(pytree_node=False, default=None)
    teacher_softcap: Any = struct.field(pytree_node=False, default=None)
    teacher_combine: Any = struct.field(pytree_node=False, default=None)


# -------------------------------------------------------------------------------- schedules


def schedule_value(spec, step):
    """A number, or ``dict(schedule, start, end, steps, warmup_steps=0)`` at ``step``.

    constant: start; linear: start -> end over ``steps`` after the warm-up; cosine:
    end + (start - end) (1 + cos(pi f)) / 2 with f the same fraction. Clamped at ``end``.
    """
    if not isinstance(spec, Mapping):
        return spec
    spec = dict(spec)
    kind = spec.get("schedule", "constant")
    start = float(spec["start"])
    if kind == "constant":
        return jnp.asarray(start, jnp.float32)
    if kind not in ("linear", "cosine"):
        raise ValueError(f"Unknown schedule {kind!r}; use 'constant', 'linear' or 'cosine'.")
    end, steps = float(spec["end"]), max(int(spec["steps"]), 1)
    f = (jnp.asarray(step, jnp.float32) - spec.get("warmup_steps", 0)) / steps
    f = jnp.clip(f, 0.0, 1.0)
    if kind == "linear":
        return start + (end - start) * f
    return end + (start - end) * 0.5 * (1.0 + jnp.cos(math.pi * f))


# ------------------------------------------------------------------------------ the spec


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """The parsed config: logit terms (fused), feature terms, options; see ``from_config``."""

    logit_terms: dict[str, dict]
    feature_terms: dict[str, dict]
    options: dict
    bridge_terms: dict[str, dict] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_config(cls, losses: Mapping, options: Mapping | None = None) -> LossSpec:
        """Check a ``c.losses`` / ``c.loss_options`` pair; errors name the term and the fix."""
        options = {
            "chunk_size": None,
            "implementation": "custom_vjp",
            "semantics": "renorm_both",
            "temperature_squared": True,
            "alpha": None,
            "total_steps": None,
            "selection": dict(kind="none"),
            **_to_dict(options or {}),
        }
        options["selection"] = _to_dict(options["selection"])
        kind = options["selection"].get("kind", "none")
        if kind not in SELECTIONS:
            raise ValueError(f"loss_options.selection.kind={kind!r}: choose one of {SELECTIONS}.")
        logit, feature, bridge = {}, {}, {}
        for label, term in _to_dict(losses).items():
            term = _to_dict(term)
            name = term.get("divergence", label)
            if name == "alm":
                unknown = set(term) - set(_ALM_KNOBS) - {"divergence"}
                if unknown:
                    raise ValueError(f"Loss term {label!r}: unknown keys {sorted(unknown)}.")
                bridge[label] = term
            elif label in FEATURE_LOSSES:
                unknown = set(term) - set(_FEATURE_KNOBS) - {"num_relation_heads", "normalize"}
                if unknown:
                    raise ValueError(f"Loss term {label!r}: unknown keys {sorted(unknown)}.")
                feature[label] = term
            elif name in LOGIT_KINDS:
                logit[label] = term
            else:
                raise ValueError(
                    f"Loss term {label!r}: unknown kind {name!r}; choose a divergence "
                    f"{sorted(divergences.CORES)}, one of {list(fused.EXTRA_KINDS)}, a feature "
                    f"loss {sorted(FEATURE_LOSSES)}, or set 'divergence' for a custom label."
                )
            if name == "taid" and not options["total_steps"]:
                raise ValueError(
                    "The taid term needs loss_options.total_steps (its linear t schedule)."
                )
        if not logit and not feature and not bridge:
            raise ValueError("The loss spec has no terms; add e.g. losses.forward_kl={}.")
        weighted = [k for k, t in {**logit, **feature}.items() if t.get("weight", 1.0) != 0]
        if any(t.get("weight", 1.0) != 0 for t in bridge.values()) and weighted:
            raise ValueError(
                f"Loss terms {weighted} are normalised per token but 'alm' per chunk; give them "
                "weight=0 (kept as metrics), drop them, or give alm weight=0 (a metric)."
            )
        if bridge and len(bridge) > 1:
            raise ValueError(f"One alm term at most; got {sorted(bridge)}.")
        return cls(logit, feature, options, bridge)

    def divergence_labels(self) -> list[str]:
        return [k for k, t in self.logit_terms.items() if t.get("divergence", k) not in ("ce",)]


def _to_dict(x) -> dict:
    return x.to_dict() if hasattr(x, "to_dict") else dict(x)


# ------------------------------------------------------------------------- params and state


def init_params(spec: LossSpec, key, student_dim: int, teacher_dim: int, num_layers=None):
    """Trainable loss parameters (projectors of feature terms), trained with the student.

    Args:
        spec: the LossSpec; key: PRNG key; student_dim, teacher_dim: model widths D_s, D_t;
        num_layers: (L_s, L_t), needed for layer-mapped feature terms.

    Returns:
        {label: [projector per layer pair]} (a pytree, possibly empty).
    """
    params = {}
    for label, term in spec.bridge_terms.items():  # ALM's chunk-end hidden-state projector
        if term.get("hidden_weight", 0.0) and student_dim != teacher_dim:
            key, sub = jax.random.split(key)
            init = term.get("projector") or "xavier"
            params[label] = features.init_projector(sub, student_dim, teacher_dim, init=init)
    for label, term in spec.feature_terms.items():
        init = term.get("projector")
        if label not in ("hidden_mse", "hidden_cosine") or not init:
            continue
        pairs = _pairs(term, num_layers)
        keys = jax.random.split(key, len(pairs) + 1)
        key = keys[0]
        params[label] = [
            features.init_projector(k, student_dim, teacher_dim, init=init) for k in keys[1:]
        ]
    return params


def _pairs(term: dict, num_layers):
    if term.get("pairs") is not None:
        return tuple(tuple(p) for p in term["pairs"])
    if num_layers is None:
        raise ValueError("Layer-mapped feature terms need num_layers=(L_student, L_teacher).")
    return features.layer_map(*num_layers, kind=term.get("layers", "uniform"))


def init_state(spec: LossSpec) -> dict:
    """Controller state carried across steps: {"taid": TAIDState, "adakd": AdaKDState}."""
    state = {}
    for label, term in spec.logit_terms.items():
        if term.get("divergence", label) == "taid":
            state["taid"] = divergences.taid_init(term.get("t_start", 0.4))
    sel = spec.options["selection"]
    if sel.get("kind") == "adakd":
        state["adakd"] = selection.adakd_init(sel.get("initial_ratio", 1.0))
    return state


def update_state(spec: LossSpec, state: dict, metrics: dict, step) -> dict:
    """Advance the controllers once per optimizer step from the step's summed metrics."""
    state = dict(state)
    mean = lambda key: metrics[key][0] / jnp.maximum(metrics[key][1], 1.0)
    for label, term in spec.logit_terms.items():
        if term.get("divergence", label) == "taid":
            state["taid"] = divergences.taid_update(
                state["taid"],
                mean(f"loss/{label}"),
                step,
                spec.options["total_steps"],
                t_start=term.get("t_start", 0.4),
                t_end=term.get("t_end", 1.0),
                alpha=term.get("step_size", 5e-4),
                beta=term.get("momentum", 0.99),
                adaptive=term.get("adaptive", True),
            )
    sel = spec.options["selection"]
    if sel.get("kind") == "adakd":
        label = sel.get("term") or spec.divergence_labels()[0]
        state["adakd"] = selection.adakd_update(
            state["adakd"],
            mean(f"loss/{label}"),
            ema_decay=sel.get("ema_decay", 0.99),
            eps_loss=sel.get("eps_loss", 0.1),
            eps_ratio=sel.get("eps_ratio", 0.1),
            warmup_steps=sel.get("warmup_steps", 0),
            update_every_steps=sel.get("update_every_steps", 1),
            min_ratio=sel.get("min_ratio", 0.1),
        )
    return state


# ------------------------------------------------------------------------------- the loss


def _teacher_kwargs(inputs: LossInputs) -> dict:
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


def _fused_terms(spec: LossSpec, state: dict, step) -> dict:
    """Logit terms with schedules evaluated, alpha and tau^2 applied, TAID's t filled in."""
    opts = spec.options
    alpha = schedule_value(opts["alpha"], step) if opts["alpha"] is not None else None
    out = {}
    for label, term in spec.logit_terms.items():
        term = {k: schedule_value(v, step) for k, v in term.items() if k not in _TAID_KNOBS}
        kind = term.get("divergence", label)
        if alpha is not None and kind != "ce":
            term["weight"] = term.get("weight", 1.0) * alpha
        elif alpha is not None:
            term["weight"] = term.get("weight", 1.0) * (1.0 - alpha)
        if kind in divergences.CORES or kind == "sinkhorn":
            term.setdefault("temperature_squared", opts["temperature_squared"])
        if kind == "taid":
            term["t"] = state["taid"].t
        out[label] = term
    return out


def _token_stats(inputs: LossInputs, spec: LossSpec, terms: dict) -> dict:
    """Per-token statistics (no gradient) for a selection rule, chunked like the loss."""
    kw = dict(
        mask=inputs.mask,
        targets=inputs.targets,
        vocab_mask=inputs.vocab_mask,
        chunk_size=spec.options["chunk_size"],
        semantics=spec.options["semantics"],
    )
    values = fused.fused_per_token(
        inputs.student_hidden, inputs.student_head, terms=terms, **_teacher_kwargs(inputs), **kw
    )
    return jax.lax.stop_gradient(values)


def _reference_stats(inputs: LossInputs, spec: LossSpec, kind: str) -> jax.Array:
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
        return _token_stats(ref, spec, {"ce": {}})["ce"]
    return _token_stats(ref, spec, {"forward_kl": {}})["forward_kl"]


def _select(inputs, spec, state, terms) -> tuple[jax.Array | None, dict, dict]:
    """Token weights [B, T] (or None), the terms (maybe with per-token tau or caps), metrics."""
    sel = spec.options["selection"]
    kind, mask = sel.get("kind", "none"), inputs.mask
    metrics = {}
    if kind == "none":
        return None, terms, metrics
    label = sel.get("term") or spec.divergence_labels()[0]
    if kind == "adakd":
        score = sel.get("score", "hellinger")
        s = _token_stats(inputs, spec, {"score": {"divergence": score}})["score"]
        keep = selection.adakd_token_mask(s, mask, state["adakd"].ratio)
        base = terms[label].get("temperature", 1.0)
        tau = selection.idts_temperatures(
            s, keep, base_temperature=base, kappa=sel.get("kappa", 0.6)
        )
        terms = {**terms, label: {**terms[label], "temperature": tau}}
        metrics["selection/ratio"] = (state["adakd"].ratio, jnp.ones(()))
        weights = keep
    elif kind in ("tsd", "tip"):
        stats = _token_stats(
            inputs,
            spec,
            {
                "hs": {"divergence": "student_entropy"},
                "ht": {"divergence": "teacher_entropy"},
                "d": {"divergence": sel.get("score", "reverse_kl")},
            },
        )
        if kind == "tsd":
            weights = selection.tsd_confidence_weights(stats["hs"], stats["ht"], mask)
        else:
            quads = selection.tip_quadrants(stats["hs"], stats["d"], mask)
            keep = sel.get("keep", ("high_entropy", "low_entropy_high_divergence"))
            weights = jnp.zeros(mask.shape, bool)
            if "high_entropy" in keep:
                weights |= quads.high_entropy_high_divergence | quads.high_entropy_low_divergence
            if "low_entropy_high_divergence" in keep:
                weights |= quads.low_entropy_high_divergence
    elif kind == "clip":
        cap = sel.get("cap")
        if cap is None:
            plain = {**terms[label], "temperature_squared": False}  # clip the divergence itself
            values = _token_stats(inputs, spec, {label: plain})[label]
            cap = selection.masked_quantile(values, mask, sel.get("quantile", 0.99))
        terms = {**terms, label: {**terms[label], "clip": jnp.asarray(cap, jnp.float32)}}
        metrics["selection/clip"] = (jnp.asarray(cap, jnp.float32), jnp.ones(()))
        return None, terms, metrics
    else:  # rho1 / adaspec: against a reference model
        stat = "ce" if kind == "rho1" else "forward_kl"
        ref = _reference_stats(inputs, spec, kind)
        own = _token_stats(inputs, spec, {stat: {}})[stat]
        ratio = sel.get("keep_ratio", 0.6)
        if kind == "rho1":
            weights = selection.rho1_token_mask(own, ref, mask, ratio)
        else:
            weights = selection.adaspec_token_mask(own, ref, mask, ratio)
    w = weights.astype(jnp.float32)
    metrics["selection/kept"] = (jnp.sum(w * mask), jnp.sum(mask.astype(jnp.float32)))
    return w, terms, metrics


def _feature_values(inputs: LossInputs, label: str, term: dict, params: dict) -> jax.Array:
    fn = FEATURE_LOSSES[label]
    if label in ("hidden_mse", "hidden_cosine"):
        s_hs, t_hs = inputs.student_hidden_states, inputs.teacher_hidden_states
        if s_hs is None or t_hs is None:
            raise ValueError(f"Loss term {label!r} needs student and teacher hidden_states.")
        pairs = _pairs(term, (len(s_hs) - 1, len(t_hs) - 1))
        knobs = {"normalize": term["normalize"]} if "normalize" in term else {}
        return features.layerwise_hidden_loss(
            fn,
            s_hs,
            jax.lax.stop_gradient(t_hs),
            inputs.mask,
            pairs,
            projectors=params.get(label),
            **knobs,
        )
    if inputs.student_qkv is None or inputs.teacher_qkv is None:
        raise ValueError(f"Loss term {label!r} needs student_qkv and teacher_qkv.")
    s = inputs.student_qkv[term.get("student_layer", -1)]
    t = jax.lax.stop_gradient(inputs.teacher_qkv[term.get("teacher_layer", -1)])
    kw = dict(
        num_relation_heads=term.get("num_relation_heads"),
        positions=inputs.positions,
        segment_ids=inputs.segment_ids,
    )
    if label == "attention_relation":
        return fn(s["q"], s["k"], t["q"], t["k"], inputs.mask, **kw)
    return fn(s["v"], t["v"], inputs.mask, **kw)


def loss_fn(spec: LossSpec, inputs: LossInputs, params: dict, state: dict, step):
    """Total loss sum, token count and metrics of one (micro-)batch.

    Args:
        spec: LossSpec.from_config(c.losses, c.loss_options).
        inputs: LossInputs.
        params: ``init_params`` output (projectors), differentiated with the student.
        state: ``init_state`` output (controllers), read only.
        step: the optimizer step (schedules), int scalar.

    Returns:
        (loss_sum [], count [], metrics {name: (sum, count)}); divide with ``normalize``.
    """
    terms = _fused_terms(spec, state, step)
    weights, terms, metrics = _select(inputs, spec, state, terms)
    if inputs.token_weights is not None:
        tw = jax.lax.stop_gradient(inputs.token_weights.astype(jnp.float32))
        weights = tw if weights is None else weights * tw
    total = jnp.zeros((), jnp.float32)
    if spec.logit_terms:
        total, count, fused_metrics = fused.fused_distill_loss(
            inputs.student_hidden,
            inputs.student_head,
            mask=inputs.mask,
            weights=weights,
            targets=inputs.targets,
            terms=terms,
            vocab_mask=inputs.vocab_mask,
            chunk_size=spec.options["chunk_size"],
            semantics=spec.options["semantics"],
            implementation=spec.options["implementation"],
            **_teacher_kwargs(inputs),
        )
        metrics.update(fused_metrics)
    for label, term in spec.feature_terms.items():
        values = _feature_values(inputs, label, term, params)
        s, count = masked_sum_and_count(values, inputs.mask, weights)
        metrics[f"loss/{label}"] = (s, count)
        total = total + schedule_value(term.get("weight", 1.0), step) * s
    if not spec.logit_terms:
        count = masked_sum_and_count(jnp.zeros(inputs.mask.shape), inputs.mask, weights)[1]
    for label, term in spec.bridge_terms.items():
        s, chunks, alm_metrics = _alm_sum(inputs, term, params.get(label))
        metrics.update(alm_metrics, **{f"loss/{label}": (s, chunks)})
        if term.get("weight", 1.0) != 0:  # the chunk count replaces the token count
            total, count = schedule_value(term.get("weight", 1.0), step) * s, chunks
    return total, count, metrics


def _alm_sum(inputs: LossInputs, term: dict, projector=None):
    """ALM (bridges.alm) of the student's tokens against the teacher's chunk log-likelihoods,
    plus ``hidden_weight`` x the chunk-end hidden-state loss when that weight is not 0."""
    if inputs.teacher_token_logprobs is None or inputs.student_chunk is None:
        raise ValueError("The alm term needs a cross-tokenizer teacher: set config.bridge.")
    append_space = term.get("append_space", True)
    s_lp, s_lpb = alm.token_and_boundary_logprobs(
        inputs.student_hidden,
        inputs.student_head,
        inputs.targets,
        inputs.student_boundary_mask if append_space else None,
        softcap=inputs.student_softcap,
        chunk_size=term.get("chunk_size", 128),
    )
    t_chunk, s_chunk, c = inputs.teacher_chunk, inputs.student_chunk, inputs.student_chunk.shape[1]
    threshold = term.get("merge_threshold", 0.0)
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
        temperature=term.get("temperature", 100.0),
        distance=term.get("distance", "binary_kl"),
    )
    hidden_weight = term.get("hidden_weight", 0.0)
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
            kind=term.get("hidden_kind", "mse"),
        )
        metrics["alm/chunk_hidden"] = (h_sum, h_count)
        total = total + hidden_weight * h_sum  # the same chunks: one chunk count for both
    return total, count, metrics


def normalize(loss_sum: jax.Array, num_tokens: jax.Array) -> jax.Array:
    """loss_sum / N, N the global token count of the optimizer step (>= 1 to stay finite)."""
    return loss_sum / jnp.maximum(num_tokens, 1.0)
