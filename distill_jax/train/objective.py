r"""A loss spec from an ml_collections config becomes one function returning (sum, count, metrics).

The spec has two parts (configs/*.py):

    c.losses = dict(                                   # label -> term; the label picks the kind
        forward_kl=dict(weight=0.9, temperature=2.0),   # a divergence on logits (fused)
        ce=dict(weight=0.1),                            # hard-label cross-entropy, tau = 1
        kl_t1=dict(divergence="forward_kl", weight=0.0),   # weight 0: a metric only
        hidden_cosine=dict(weight=0.1, layers="uniform", projector="xavier"),  # features
    )
    c.losses = dict(alm=dict(temperature=100.0, distance="binary_kl", append_space=True))

The kind of each term, its knobs (typed, with defaults and ranges) and what it needs from the
rest of the config are registry entries (``train/registry/``); ``loss_spec(config)`` checks
the whole config against them (``train/terms.py``) before anything loads and parses each term
into a typed ``terms.Term``. ``alm``, ``uld``, ``mined`` and ``dskd`` are the cross-tokenizer
terms (``train/bridge_terms.py``, need ``config.bridge``): ALM is summed over common-boundary
chunks and normalised by the global *chunk* count, ULD and MinED per position pair, DSKD per
each of its three masks; mixed with token-level terms (ALM + CE), each is normalised by its own
count (see Normalisation). ``dpo``, ``redi`` and ``distillm2`` are pair terms
(``train/pair_terms.py``, need ``config.data.source="pairs"``): they read both sides of each
(chosen, rejected) pair, the rejected one as ``LossInputs.rejected``. Options:

    c.loss_options = dict(head_chunk_tokens=None, implementation="custom_vjp",
                          semantics="renorm_both", temperature_squared=True, alpha=None,
                          total_steps=None, selection=dict(kind="none"))

Any number in a term (weight, temperature, beta, alpha, ...) or ``loss_options.alpha`` may be a
schedule ``dict(schedule="linear"|"cosine"|"constant", start=a, end=b, steps=n,
warmup_steps=0)`` evaluated at the step (MaxText's alpha/temperature/beta schedules).

**The tau^2 factor lives here and only here.** With ``temperature_squared=True`` (default) every
divergence term is multiplied by tau^2 per token (tau_i^2 for AdaKD's per-token temperatures), so
its gradient keeps its size as tau changes (Hinton et al., 2015); CE and feature terms are not.
``alpha`` (if set) scales every divergence term by alpha and ``ce`` by 1 - alpha:
L = alpha tau^2 KL(p_tau || q_tau) + (1 - alpha) CE (METHODS.md 1.12).

**Normalisation.** Every term belongs to a *normaliser group* and is divided by that group's
count. Token-level terms (logit and feature) share the group "tokens": ``sum_terms w_term sum_i
m_i s_i l_term(i)`` over ``sum_i m_i s_i`` (m the loss mask, s the selection weights). A bridge
term is its own group (e.g. ALM per common-boundary chunk, ``bridge_terms``), and so is a logit
term with a token mask of its own (TSD-KD's ``tsd_entropy_penalty``, ``listmle`` with
``entropy_threshold``: ``term_masks``, one more fused pass each) and each group of a pair term
(``pair_terms``: DPO and REDI per pair; DistiLLM-2's two per-token terms per response token of
their own side, ``distillm2/on_chosen`` and ``distillm2/on_rejected``; token-level terms read
the chosen side). ``loss_groups``
returns each group's sum and count; the step adds both over every micro-batch and data shard
of the optimizer step and divides once, L = sum_g S_g / N_g, which is what makes gradient
accumulation exact also when terms of different groups are mixed (one backward pass per
group, ``train/step.py``). Metrics are ``loss/<label>`` (sum, count) pairs, unweighted and
without tau^2.

State carried across steps (TrainState, checkpointed): TAID's interpolation (``taid`` term),
AdaKD's keep ratio (``selection.kind="adakd"``) and DistiLLM-2's anchor gaps (``distillm2``);
``update_state`` advances it once per optimizer step from that step's summed metrics.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from distill_jax.bridges import dskd
from distill_jax.losses import divergences, features, fused, selection
from distill_jax.losses.tokens import masked_sum_and_count
from distill_jax.train import feature_terms, pair_terms, selection_rules, term_masks
from distill_jax.train import terms as terms_lib
from distill_jax.train.terms import Term


@struct.dataclass
class LossInputs:
    """Everything a loss term may read; unused fields stay None.

    student_hidden [B, T, D] (final, after the norm) and student_head [D, V]; the teacher as
    teacher_hidden [B, T, D_t] + teacher_head [D_t, V] or sparse_teacher (topk.SparseTeacher);
    targets [B, T] next-token ids; mask [B, T] loss mask; *_hidden_states (L + 1 arrays) and
    *_qkv (per-layer {"q", "k", "v"}) from ``Transformer.forward`` for feature terms; positions,
    segment_ids [B, T] as given to the models; reference_hidden/head for Rho-1 and AdaSPEC;
    vocab_mask [V]; softcaps and teacher_combine (static) as the models define them; rejected:
    the rejected side of preference pairs (pair terms), else None.
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
    # Static, with *_qkv: per layer (scale, softcap, window) of each model (attention_layers).
    student_attention: Any = struct.field(pytree_node=False, default=None)
    teacher_attention: Any = struct.field(pytree_node=False, default=None)
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
    # The teacher on its own tokens for ULD / MinED / DSKD: head [D_t, W], the positions whose
    # next token is scored [B, U], its targets [B, U], and (DSKD) both sides' embeddings of their
    # input and target ids ((e(x), e(y)), [B, T, D_s] / [B, U, D_t]); the MinED map [V].
    teacher_token_head: jax.Array | None = None
    teacher_token_mask: jax.Array | None = None
    teacher_targets: jax.Array | None = None
    teacher_token_embeddings: tuple[jax.Array, jax.Array] | None = None
    student_embeddings: tuple[jax.Array, jax.Array] | None = None
    mined_map: jax.Array | None = None
    # [B, T] per-token weights from the teacher (e.g. multi-context agreement, teachers);
    # multiplied into the selection weights, so the normaliser is sum(mask * weights).
    token_weights: jax.Array | None = None
    # Pair terms (train/pair_terms.py): the rejected side of each pair as LossInputs of its own
    # (student and, when a pair term needs it, teacher on the rejected_* batch fields); the
    # fields above are the chosen side.
    rejected: Any = None
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
    """The parsed config: typed terms by family, the checked options and the selection rule.

    ``logit_terms`` (fused head), ``feature_terms``, ``bridge_terms`` and ``pair_terms`` map a
    label to its ``terms.Term``; ``options`` is ``loss_options`` with every default filled in;
    ``selection`` is the selection rule as a Term (``terms.SELECTIONS``).
    """

    logit_terms: dict[str, Term]
    feature_terms: dict[str, Term]
    options: dict
    bridge_terms: dict[str, Term] = dataclasses.field(default_factory=dict)
    selection: Term | None = None
    pair_terms: dict[str, Term] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_config(cls, losses: Mapping, options: Mapping | None = None) -> LossSpec:
        """Check a ``c.losses`` / ``c.loss_options`` pair; errors name the term and the fix."""
        options, selection_term = terms_lib.parse_options(options)
        parsed = [
            terms_lib.parse_term(label, raw) for label, raw in terms_lib.to_dict(losses).items()
        ]
        return cls.from_terms(parsed, options, selection_term)

    @classmethod
    def from_terms(cls, parsed, options: dict, selection_term: Term) -> LossSpec:
        """The spec of already parsed terms (``terms.validate``); checks how they combine."""
        family = lambda f: {t.label: t for t in parsed if t.entry.family == f}  # noqa: E731
        logit, feature, bridge = family("logit"), family("feature"), family("bridge")
        if any(t.kind == "taid" for t in parsed) and not options["total_steps"]:
            raise ValueError(
                "The taid term needs loss_options.total_steps (its linear t schedule)."
            )
        if not parsed:
            raise ValueError("The loss spec has no terms; add e.g. losses.forward_kl={}.")
        pair = family("pair")
        _check_pair_knobs(pair)
        return cls(logit, feature, options, bridge, selection_term, pair)

    def divergence_labels(self) -> list[str]:
        return [k for k, t in self.logit_terms.items() if t.kind != "ce"]

    def groups(self) -> tuple[str, ...]:
        """The normaliser groups the loss has, in order (static): "tokens" when a logit or
        feature term of the main pass is weighted, then each weighted term with its own mask
        (``masked_labels``), then each weighted bridge term's parts, then each weighted pair
        term's groups (``pair_groups``); ("tokens",) when nothing is weighted (a metrics-only
        spec)."""
        masked = self.masked_labels()
        main = {k: t for k, t in self.logit_terms.items() if k not in masked}
        tokens = any(t.weight != 0 for t in {**main, **self.feature_terms}.values())
        own = [k for k in masked if self.logit_terms[k].weight != 0]
        bridges = [
            _group(label, part)
            for label, t in self.bridge_terms.items()
            if t.weight != 0
            for part in t.entry.parts
        ]
        pairs = [g for k, t in self.pair_terms.items() if t.weight != 0 for g in pair_groups(t)]
        others = tuple(own) + tuple(bridges) + tuple(pairs)
        return (("tokens",) if tokens or not others else ()) + others

    def masked_labels(self) -> tuple[str, ...]:
        """Logit terms with a token mask of their own (``term_masks``: TSD-KD's entropy
        penalty, ListMLE with ``entropy_threshold``): each runs its own fused pass."""
        return tuple(k for k, t in self.logit_terms.items() if term_masks.has_own_mask(t))

    def pairs_need_teacher(self) -> bool:
        """Some pair term reads the teacher (the step then runs it on the rejected side too)."""
        return any("teacher" in t.entry.needs for t in self.pair_terms.values())

    def labels(self) -> list[str]:
        """Every term's label (``config.losses``' keys)."""
        families = (self.logit_terms, self.feature_terms, self.bridge_terms, self.pair_terms)
        return [label for family in families for label in family]

    def needs(self) -> frozenset:
        """What the terms need from the teacher ("hidden_states", "qkv", ...): the union."""
        every = [
            *self.logit_terms.values(),
            *self.feature_terms.values(),
            *self.bridge_terms.values(),
            *self.pair_terms.values(),
        ]
        return frozenset().union(*(t.entry.needs for t in every))


def _group(label: str, part: str) -> str:
    """The normaliser group of a bridge or pair term's part: its label, or ``<label>/<part>``."""
    return f"{label}/{part}" if part else label


def pair_groups(term: Term) -> tuple[str, ...]:
    """A pair term's normaliser groups, one per ``Entry.parts``."""
    return tuple(_group(term.label, p) for p in term.entry.parts)


def _check_pair_knobs(pair: dict[str, Term]) -> None:
    """Knob combinations of pair terms a single knob's range cannot express."""
    d = pair.get("distillm2")
    if d is not None and d.knobs["min_alpha"] > d.knobs["base_alpha"]:
        raise ValueError(
            f"Loss term 'distillm2': min_alpha={d.knobs['min_alpha']} is above base_alpha="
            f"{d.knobs['base_alpha']}; the per-pair skew lies in [min_alpha, base_alpha]."
        )


def validate(config) -> None:
    """Check ``config.losses``, ``loss_options`` and ``teacher`` against the registry
    (``terms.validate``) and how the terms combine; reads no file and builds nothing."""
    loss_spec(config)


def loss_spec(config) -> LossSpec:
    """The whole config checked (``terms.validate``), then its LossSpec. Call this before any
    model or data loads: every error names the term, the knob and the fix."""
    parsed, options, selection_term = terms_lib.validate(config)
    return LossSpec.from_terms(parsed, options, selection_term)


# ------------------------------------------------------------------------- params and state


def init_params(spec: LossSpec, key, student_dim: int, teacher_dim: int, num_layers=None):
    """Trainable loss parameters (projectors of feature terms, ALM's chunk-end projector,
    DSKD's projections), trained with the student, never exported.

    Args:
        spec: the LossSpec; key: PRNG key; student_dim, teacher_dim: model widths D_s, D_t;
        num_layers: (L_s, L_t), needed for layer-mapped feature terms.

    Returns:
        {label: [projector per layer pair]} (a pytree, possibly empty).
    """
    params = {}
    for label, term in spec.bridge_terms.items():
        if term.kind == "dskd":  # DSKD's projections between the two spaces
            key, sub = jax.random.split(key)
            params[label] = dskd.init_dskd(
                sub, student_dim, teacher_dim, cross_tokenizer=True, init=term.knobs["projector"]
            )
        elif term.kind == "alm" and term.knobs["hidden_weight"] and student_dim != teacher_dim:
            key, sub = jax.random.split(key)
            init = term.knobs["projector"] or "xavier"
            params[label] = features.init_projector(sub, student_dim, teacher_dim, init=init)
    for label, term in spec.feature_terms.items():
        init = term.knobs.get("projector")
        if "hidden_states" not in term.entry.needs or not init:
            continue
        pairs = feature_terms.layer_pairs(term, num_layers)
        keys = jax.random.split(key, len(pairs) + 1)
        key = keys[0]
        params[label] = [
            features.init_projector(k, student_dim, teacher_dim, init=init) for k in keys[1:]
        ]
    return params


def init_state(spec: LossSpec) -> dict:
    """Controller state carried across steps: {"taid": TAIDState, "adakd": AdaKDState,
    "distillm2": anchor gaps}."""
    state = {}
    for term in spec.logit_terms.values():
        if term.kind == "taid":
            state["taid"] = divergences.taid_init(term.knobs["t_start"])
    if spec.selection.kind == "adakd":
        state["adakd"] = selection.adakd_init(spec.selection.knobs["initial_ratio"])
    if "distillm2" in spec.pair_terms:
        state["distillm2"] = pair_terms.distillm2_init()
    return state


def update_state(spec: LossSpec, state: dict, metrics: dict, step) -> dict:
    """Advance the controllers once per optimizer step from the step's summed metrics."""
    state = dict(state)
    mean = lambda key: metrics[key][0] / jnp.maximum(metrics[key][1], 1.0)  # noqa: E731
    for label, term in spec.logit_terms.items():
        if term.kind == "taid":
            k = term.knobs
            state["taid"] = divergences.taid_update(
                state["taid"],
                mean(f"loss/{label}"),
                step,
                spec.options["total_steps"],
                t_start=k["t_start"],
                t_end=k["t_end"],
                alpha=k["step_size"],
                beta=k["momentum"],
                adaptive=k["adaptive"],
            )
    if spec.selection.kind == "adakd":
        k = spec.selection.knobs
        label = k["term"] or spec.divergence_labels()[0]
        state["adakd"] = selection.adakd_update(
            state["adakd"],
            mean(f"loss/{label}"),
            ema_decay=k["ema_decay"],
            eps_loss=k["eps_loss"],
            eps_ratio=k["eps_ratio"],
            warmup_steps=k["warmup_steps"],
            update_every_steps=k["update_every_steps"],
            min_ratio=k["min_ratio"],
        )
    if "distillm2" in spec.pair_terms:
        state["distillm2"] = pair_terms.distillm2_update(state["distillm2"], mean)
    return state


# ------------------------------------------------------------------------------- the loss


def _fused_terms(spec: LossSpec, state: dict, step) -> dict:
    """Logit terms as ``fused`` term dicts: schedules evaluated, alpha and tau^2 set by the
    registry entry's ``alpha`` and ``tau_squared``, TAID's t filled in from its state."""
    opts = spec.options
    alpha = schedule_value(opts["alpha"], step) if opts["alpha"] is not None else None
    out = {}
    for label, term in spec.logit_terms.items():
        d = {k: schedule_value(v, step) for k, v in term.fn_knobs().items()}
        d["divergence"] = term.kind
        if alpha is not None:
            d["weight"] = d["weight"] * (alpha if term.entry.alpha == "alpha" else 1.0 - alpha)
        if term.entry.tau_squared and "temperature_squared" not in d:
            d["temperature_squared"] = opts["temperature_squared"]
        if term.kind == "taid":
            d["t"] = state["taid"].t
        out[label] = d
    return out


def _select(inputs, spec, state, terms) -> tuple[jax.Array | None, dict, dict]:
    """Token weights [B, T] (or None), the terms (maybe with per-token tau or caps), metrics:
    the registered rule of ``loss_options.selection.kind`` (``selection_rules``)."""
    rule = spec.selection
    weights, terms, metrics = rule.entry.fn(inputs, spec, state, terms, rule.knobs)
    if weights is None:
        return None, terms, metrics
    w = weights.astype(jnp.float32)
    kept = (jnp.sum(w * inputs.mask), jnp.sum(inputs.mask.astype(jnp.float32)))
    return w, terms, {**metrics, "selection/kept": kept}


def _pair_groups(spec: LossSpec, inputs: LossInputs, state: dict, step):
    """The pair terms' group sums, counts and metrics (``pair_terms``), weights applied."""
    sums, counts, metrics = {}, {}, {}
    if spec.pair_terms and inputs.rejected is None:
        raise ValueError(
            f"Loss terms {sorted(spec.pair_terms)} need the rejected side of preference pairs: "
            "set config.data.source='pairs'."
        )
    for label, term in spec.pair_terms.items():
        knobs = {k: schedule_value(v, step) for k, v in term.knobs.items()}
        s, n, m = term.entry.fn(inputs, knobs, state.get(label), spec.options)
        metrics.update(m)
        for g in pair_groups(term):
            sums[g], counts[g] = knobs["weight"] * s[g], n[g]
    return sums, counts, metrics


def loss_groups(spec: LossSpec, inputs: LossInputs, params: dict, state: dict, step):
    """Each normaliser group's loss sum and count, and the metrics, of one (micro-)batch.

    Args:
        spec: ``loss_spec(config)`` or ``LossSpec.from_config(c.losses, c.loss_options)``.
        inputs: LossInputs.
        params: ``init_params`` output (projectors), differentiated with the student.
        state: ``init_state`` output (controllers), read only.
        step: the optimizer step (schedules), int scalar.

    Returns:
        (sums {group: []}, counts {group: []}, metrics {name: (sum, count)}), the groups of
        ``spec.groups()``; the loss is sum_g sums[g] / counts[g] with both summed globally.
    """
    terms = _fused_terms(spec, state, step)
    weights, terms, metrics = _select(inputs, spec, state, terms)
    if inputs.token_weights is not None:
        tw = jax.lax.stop_gradient(inputs.token_weights.astype(jnp.float32))
        weights = tw if weights is None else weights * tw
    own = {k: terms[k] for k in spec.masked_labels()}  # each in a pass of its own, below
    terms = {k: v for k, v in terms.items() if k not in own}
    total = jnp.zeros((), jnp.float32)
    if terms:
        total, count, fused_metrics = fused.fused_distill_loss(
            inputs.student_hidden,
            inputs.student_head,
            weights=weights,
            terms=terms,
            implementation=spec.options["implementation"],
            **selection_rules.head_kwargs(inputs, spec),
            **selection_rules.teacher_kwargs(inputs),
        )
        metrics.update(fused_metrics)
    for label, term in spec.feature_terms.items():
        values = feature_terms.feature_values(inputs, label, term, params.get(label))
        s, count = masked_sum_and_count(values, inputs.mask, weights)
        metrics[f"loss/{label}"] = (s, count)
        total = total + schedule_value(term.weight, step) * s
    if not terms:
        count = masked_sum_and_count(jnp.zeros(inputs.mask.shape), inputs.mask, weights)[1]
    sums, counts = {"tokens": total}, {"tokens": count}
    for label, fused_term in own.items():
        term = spec.logit_terms[label]
        s, n, own_metrics = term_masks.masked_term_sums(inputs, spec, term, fused_term)
        metrics.update(own_metrics)
        sums[label], counts[label] = s, n
    for label, term in spec.bridge_terms.items():
        parts, bridge_metrics = term.entry.fn(inputs, term.knobs, params.get(label))
        metrics.update(bridge_metrics)
        for part, (s, n) in parts.items():
            group = _group(label, part)
            metrics[f"loss/{group}"] = (s, n)
            sums[group], counts[group] = schedule_value(term.weight, step) * s, n
    pair_sums, pair_counts, pair_metrics = _pair_groups(spec, inputs, state, step)
    sums.update(pair_sums)
    counts.update(pair_counts)
    metrics.update(pair_metrics)
    groups = spec.groups()
    return {g: sums[g] for g in groups}, {g: counts[g] for g in groups}, metrics


def loss_fn(spec: LossSpec, inputs: LossInputs, params: dict, state: dict, step):
    """``loss_groups`` of a spec with one normaliser group, as (loss_sum, count, metrics);
    divide with ``normalize``. A spec that mixes groups (ALM + CE) needs ``loss_groups``."""
    sums, counts, metrics = loss_groups(spec, inputs, params, state, step)
    if len(sums) != 1:
        raise ValueError(f"The spec mixes normaliser groups {list(sums)}; use loss_groups.")
    (group,) = sums
    return sums[group], counts[group], metrics


def normalize(loss_sum: jax.Array, num_tokens: jax.Array) -> jax.Array:
    """loss_sum / N, N the global token count of the optimizer step (>= 1 to stay finite)."""
    return loss_sum / jnp.maximum(num_tokens, 1.0)
