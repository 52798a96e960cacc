r"""The registry: every name a config can pick, with its function and typed knobs.

One plain dict per family, name -> ``Entry`` (a small frozen dataclass); nothing registers itself
on import, so what exists is what this file lists. To add a term, add an entry here (and its
function where its family lives); ``terms.py`` checks configs against these dicts.

    LOSS_TERMS[name]   a loss term: a divergence (``divergences.CORES``), ``ce``, ``sinkhorn``,
                       the entropies, a feature term, or a bridge term (``alm``); ``family`` says
                       which path computes it ("logit": the fused head, "feature", "bridge").
                       The label of ``config.losses`` picks the name unless the term sets
                       ``divergence=<name>`` (logit terms only).
    SELECTIONS[kind]   a token-selection rule (``loss_options.selection.kind``); ``fn`` is the
                       rule (``train/selection_rules.py``).
    TEACHERS[kind]     a teacher kind (``config.teacher.kind``); ``fn`` is its class in
                       ``teachers``, ``supplies`` what it can give the terms.
    OPTIONS            the knobs of ``config.loss_options`` (a dict of ``Knob``).
    MODEL_KNOBS        the model block a model-backed teacher reads (``init``, ``config``, ...).
    RENAMED            old knob name -> new name, per scope (an old name fails with the hint).

``Entry(name, family, fn, doc, knobs, needs, supplies, tau_squared, alpha)``: ``knobs`` maps a
knob name to a ``Knob(kind, default, doc, low, high, open_low, choices, schedule, to_fn)``: its
type, default, range or choices and a one-line doc; ``needs`` is what the term requires from the
rest of the config: "teacher" (a teacher distribution), "hidden_states" / "qkv" (a teacher that
supplies them), "bridge" (``config.bridge``), "reference" (``config.reference``), "pairs" (a
preference-pairs data source, ``config.data.source="pairs"``), "total_steps".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from distill_jax import teachers
from distill_jax.losses import divergences, features, preference, tokens, topk
from distill_jax.train import bridge_terms, selection_rules


@dataclasses.dataclass(frozen=True)
class Knob:
    """One typed knob: ``kind`` in float | int | bool | str | "seq" | "any"; ``default`` (None:
    optional); a range ``low``/``high`` (``open_low``: strictly above ``low``) or ``choices``;
    ``schedule``: a number that may be a schedule dict; ``to_fn``: passed to the term's function."""

    kind: Any
    default: Any
    doc: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    choices: tuple | None = None
    schedule: bool = False
    to_fn: bool = True

    def describe(self) -> str:
        if self.choices is not None:
            return f"one of {list(self.choices)}"
        name = {
            float: "a number",
            int: "an integer",
            bool: "True or False",
            str: "a string",
            "seq": "a list",
            "any": "anything",
        }[self.kind]
        if self.low is not None and self.high is not None:
            return f"{name} in {'(' if self.open_low else '['}{self.low}, {self.high}]"
        if self.low is not None:
            return f"{name} {'>' if self.open_low else '>='} {self.low}"
        return name + ("" if self.high is None else f" <= {self.high}")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One registered name: its function, typed knobs and what it needs from the config."""

    name: str
    family: str  # "logit" | "feature" | "bridge" | "selection" | "teacher"
    fn: Callable | None
    doc: str
    knobs: Mapping[str, Knob]
    needs: frozenset = frozenset()
    supplies: frozenset = frozenset()  # teachers: what the terms may read from them
    tau_squared: bool = False  # logit terms: multiplied by tau^2 (loss_options.temperature_squared)
    alpha: str = "alpha"  # logit terms: scaled by loss_options.alpha or by 1 - alpha ("ce")


def _k(kind, default, doc, **kw) -> Knob:
    return Knob(kind, default, doc, **kw)


def _entry(name, family, fn, doc, knobs, needs=(), **kw) -> Entry:
    return Entry(name, family, fn, doc, MappingProxyType(knobs), frozenset(needs), **kw)


# ------------------------------------------------------------------------------ loss terms

WEIGHT = _k(
    float, 1.0, "the term's weight in the loss; 0 keeps it as a metric", low=0.0, schedule=True
)
_TEMPERATURE = _k(
    float, 1.0, "softmax temperature tau of both sides", low=0.0, open_low=True, schedule=True
)
_UNIT = dict(low=0.0, high=1.0, schedule=True)  # a term knob in [0, 1], may be a schedule
_PROB = dict(low=0.0, high=1.0)
_LOGIT_COMMON = {
    "weight": WEIGHT,
    "temperature": _TEMPERATURE,
    "semantics": _k(
        str,
        None,
        "top-k teacher semantics (default loss_options.semantics)",
        choices=topk.SEMANTICS,
    ),
    "temperature_squared": _k(
        bool, None, "multiply by tau^2 (default loss_options.temperature_squared)"
    ),
}
_TAID_KNOBS = {
    "t_start": _k(float, 0.4, "initial interpolation t", low=0.0, high=1.0, to_fn=False),
    "t_end": _k(float, 1.0, "final interpolation t", low=0.0, high=1.0, to_fn=False),
    "step_size": _k(float, 5e-4, "adaptive step size of t (TAID's alpha)", low=0.0, to_fn=False),
    "momentum": _k(
        float, 0.99, "momentum of the adaptive update (TAID's beta)", low=0.0, high=1.0, to_fn=False
    ),
    "adaptive": _k(bool, True, "adapt t to the loss's relative change", to_fn=False),
}
_CORE_KNOBS = {
    "jsd": {
        "beta": _k(float, 0.5, "mixture m = beta p + (1 - beta) q", **_UNIT),
        "normalize": _k(
            bool, False, "divide the interior by beta (1 - beta), continuous at the ends"
        ),
    },
    "skew_kl": {"alpha": _k(float, 0.1, "skew: KL(p || alpha p + (1 - alpha) q)", **_UNIT)},
    "skew_reverse_kl": {"alpha": _k(float, 0.1, "skew: KL(q || alpha q + (1 - alpha) p)", **_UNIT)},
    "ab": {
        "alpha": _k(float, 1.0, "alpha of the alpha-beta divergence", schedule=True),
        "beta": _k(float, 1.0, "beta of the alpha-beta divergence", schedule=True),
    },
    "akl": {
        "mu": _k(float, 0.5, "head/tail split of the teacher's mass", **_UNIT),
        "eps": _k(float, 1e-12, "floor of the gap weights", low=0.0),
    },
    "taid": _TAID_KNOBS,
}
_CORE_DOCS = {
    "forward_kl": "KL(p || q), mode covering (Hinton et al., 2015)",
    "reverse_kl": "KL(q || p), mode seeking (MiniLLM)",
    "jsd": "generalized JSD of TRL's GKD trainer",
    "skew_kl": "skew forward KL (DistiLLM)",
    "skew_reverse_kl": "skew reverse KL (DistiLLM)",
    "tvd": "total variation 1/2 sum |p - q|",
    "hellinger": "Hellinger distance",
    "ab": "alpha-beta divergence (AB-KD)",
    "akl": "adaptive KL, head/tail mix of forward and reverse KL",
    "todi": "ToDi: per-entry mix of forward and reverse KL",
    "taid": "TAID: CE to a student-teacher interpolation with adaptive t (needs total_steps)",
}
_DIVERGENCE_TERMS = {
    name: _entry(
        name,
        "logit",
        core,
        _CORE_DOCS.get(name, name),
        {**_LOGIT_COMMON, **_CORE_KNOBS.get(name, {})},
        ("teacher", "total_steps") if name == "taid" else ("teacher",),
        tau_squared=True,
    )
    for name, core in divergences.CORES.items()
}
_EXTRA_TERMS = {
    "ce": _entry(
        "ce",
        "logit",
        tokens.cross_entropy,
        "hard-label cross-entropy -log q(y) at tau = 1",
        {"weight": WEIGHT},
        alpha="one_minus_alpha",
    ),
    "student_entropy": _entry(
        "student_entropy",
        "logit",
        tokens.entropy,
        "the student's entropy H(q_tau) (a statistic of selection rules)",
        {"weight": WEIGHT, "temperature": _TEMPERATURE},
    ),
    "teacher_entropy": _entry(
        "teacher_entropy",
        "logit",
        tokens.entropy,
        "the teacher's entropy H(p_tau), constant (a statistic)",
        {"weight": WEIGHT, "temperature": _TEMPERATURE},
        ("teacher",),
    ),
    "sinkhorn": _entry(
        "sinkhorn",
        "logit",
        divergences.sinkhorn,
        "entropic OT cost between the tokens' q and p (squared-Euclidean cost)",
        {
            **_LOGIT_COMMON,
            "epsilon": _k(float, 0.1, "entropic regulariser", low=0.0, open_low=True),
            "num_iters": _k(int, 20, "Sinkhorn iterations", low=1),
            "scope": _k(str, "batch", "tokens transported together", choices=("batch", "sequence")),
        },
        ("teacher",),
        tau_squared=True,
    ),
    "multilevel_ot": _entry(
        "multilevel_ot",
        "logit",
        divergences.multilevel_ot,
        "MultiLevelOT: z-scored top-k columns, token-level terms, sequence-level L1 Sinkhorn",
        {
            **_LOGIT_COMMON,
            "epsilon": _k(float, 0.1, "entropic regulariser", low=0.0, open_low=True),
            "num_iters": _k(int, 10, "Sinkhorn iterations", low=1),
            "top_k": _k(int, 50, "vocabulary columns kept (by batch mass)", low=1),
            "token_weight": _k(float, 1.0, "weight of the absolute token term", low=0.0),
            "log_weight": _k(float, 0.1, "weight of the logarithmic token term", low=0.0),
            "sequence_weight": _k(float, 0.1, "weight of the sequence-level Sinkhorn", low=0.0),
        },
        ("teacher",),
        tau_squared=True,
    ),
    "listmle": _entry(
        "listmle",
        "logit",
        preference.listmle,
        "TSD-KD ListMLE: the student's top-k tokens ranked by the teacher's logits",
        {
            "weight": WEIGHT,
            "temperature": _TEMPERATURE,
            "k": _k(int, 10, "tokens ranked (the student's top k)", low=1),
            "normalization": _k(str, "suffix", "ListMLE normaliser", choices=("suffix", "prefix")),
        },
        ("teacher",),
    ),
}
_LAYERS = _k(
    str,
    "uniform",
    "layer map for different depths (features.layer_map)",
    choices=("uniform", "all", "last"),
)
_PAIRS = _k("seq", None, "explicit (student_layer, teacher_layer) pairs instead of layers")
_PROJECTOR = _k(
    str,
    None,
    "projector init when widths differ (None: no projector)",
    choices=("xavier", "kaiming", "zeros", "identity"),
)
_HIDDEN = {"weight": WEIGHT, "layers": _LAYERS, "pairs": _PAIRS, "projector": _PROJECTOR}
_RELATION = {
    "weight": WEIGHT,
    "student_layer": _k(int, -1, "the student's layer (index into its q/k/v)"),
    "teacher_layer": _k(int, -1, "the teacher's layer (index into its q/k/v)"),
    "num_relation_heads": _k(int, None, "relation heads (None: the student's heads)", low=1),
}
_FEATURE_TERMS = {
    "hidden_mse": _entry(
        "hidden_mse",
        "feature",
        features.hidden_mse,
        "per-layer hidden-state MSE ||P(h_s) - h_t||^2 / D_t",
        {
            **_HIDDEN,
            "normalize": _k(
                str, None, "divide by the teacher's mean square", choices=("global", "channel")
            ),
        },
        ("teacher", "hidden_states"),
    ),
    "hidden_cosine": _entry(
        "hidden_cosine",
        "feature",
        features.hidden_cosine,
        "per-layer hidden-state cosine distance",
        _HIDDEN,
        ("teacher", "hidden_states"),
    ),
    "attention_relation": _entry(
        "attention_relation",
        "feature",
        features.attention_relation_kl,
        "MiniLM query-key relation KL",
        _RELATION,
        ("teacher", "qkv"),
    ),
    "value_relation": _entry(
        "value_relation",
        "feature",
        features.value_relation_kl,
        "MiniLM value-value relation KL",
        _RELATION,
        ("teacher", "qkv"),
    ),
}
_BRIDGE_TERMS = {
    "alm": _entry(
        "alm",
        "bridge",
        bridge_terms.alm_sum,
        "cross-tokenizer ALM over common-boundary chunks (bridges.alm), per chunk",
        {
            "weight": WEIGHT,
            "temperature": _k(
                float, 100.0, "tau_b of the chunk likelihoods", low=0.0, open_low=True
            ),
            "distance": _k(
                str,
                "binary_kl",
                "distance of chunk likelihoods",
                choices=("binary_kl", "binary_ce", "reverse_binary_kl", "abs"),
            ),
            "append_space": _k(bool, True, "compare word-boundary probabilities too"),
            "student_logprob_chunk_tokens": _k(
                int, 128, "student positions per step of its log-prob walk", low=1
            ),
            "merge_threshold": _k(
                float,
                0.0,
                "> 0: merge chunks while the teacher's boundary prob <= it (> 1: merge all)",
                low=0.0,
            ),
            "hidden_weight": _k(float, 0.0, "> 0: add the chunk-end hidden-state loss", low=0.0),
            "hidden_kind": _k(str, "mse", "chunk-end hidden-state loss", choices=("mse", "cosine")),
            "projector": _PROJECTOR,
        },
        ("teacher", "bridge"),
    ),
}
LOSS_TERMS: dict[str, Entry] = {
    **_DIVERGENCE_TERMS,
    **_EXTRA_TERMS,
    **_FEATURE_TERMS,
    **_BRIDGE_TERMS,
}

# -------------------------------------------------------------------------- selection rules

_TERM = _k(str, None, "the term it acts on (default: the first divergence)")
_RATIO = _k(float, 0.6, "fraction of valid tokens kept", **_PROB)
_SCORE = _k(
    str, None, "per-token score (a divergence name)", choices=tuple(sorted(divergences.CORES))
)
_SELECTION_LIST = [
    _entry("none", "selection", selection_rules.none, "every valid token, weight 1", {}),
    _entry(
        "adakd",
        "selection",
        selection_rules.adakd,
        "AdaKD: hard tokens kept, per-token tau (IDTS)",
        {
            "term": _TERM,
            "score": _k(
                str, "hellinger", "difficulty score", choices=tuple(sorted(divergences.CORES))
            ),
            "kappa": _k(float, 0.6, "IDTS temperature spread", low=0.0),
            "initial_ratio": _k(float, 1.0, "keep ratio at step 0", **_PROB),
            "ema_decay": _k(float, 0.99, "loss EMA decay", **_PROB),
            "eps_loss": _k(float, 0.1, "relative loss change that counts as progress", low=0.0),
            "eps_ratio": _k(float, 0.1, "ratio step", low=0.0),
            "warmup_steps": _k(int, 0, "steps before the ratio adapts", low=0),
            "update_every_steps": _k(int, 1, "steps between ratio updates", low=1),
            "min_ratio": _k(float, 0.1, "smallest keep ratio", **_PROB),
        },
        ("teacher",),
    ),
    _entry(
        "tsd",
        "selection",
        selection_rules.tsd,
        "TSD-KD: confidence weights from both entropies",
        {"term": _TERM},
        ("teacher",),
    ),
    _entry(
        "tip",
        "selection",
        selection_rules.tip,
        "TIP: the top fraction of tokens by student entropy, or entropy x divergence quadrants",
        {
            "term": _TERM,
            "rule": _k(
                str,
                "quadrants",
                "'entropy': keep the top fraction by student entropy; 'quadrants': by keep",
                choices=("entropy", "quadrants"),
            ),
            "fraction": _k(float, 0.5, "share of valid tokens kept (rule='entropy')", **_PROB),
            "per_row": _k(bool, False, "rank within each row (rule='entropy')"),
            "score": _k(
                str,
                "reverse_kl",
                "divergence of the quadrants",
                choices=tuple(sorted(divergences.CORES)),
            ),
            "keep": _k("seq", ("high_entropy", "low_entropy_high_divergence"), "quadrants kept"),
        },
        ("teacher",),
    ),
    _entry(
        "clip",
        "selection",
        selection_rules.clip,
        "divergence clipping min(l, cap)",
        {
            "term": _TERM,
            "cap": _k(float, None, "fixed cap (None: the batch quantile)", low=0.0),
            "quantile": _k(float, 0.99, "cap = this quantile of the term's values", **_PROB),
        },
        ("teacher",),
    ),
    _entry(
        "rho1",
        "selection",
        selection_rules.rho1,
        "Rho-1: top excess CE over a reference model",
        {"term": _TERM, "keep_ratio": _RATIO},
        ("reference",),
    ),
    _entry(
        "adaspec",
        "selection",
        selection_rules.adaspec,
        "AdaSPEC: tokens the reference learns well",
        {"term": _TERM, "keep_ratio": _RATIO},
        ("teacher", "reference"),
    ),
]
SELECTIONS: dict[str, Entry] = {e.name: e for e in _SELECTION_LIST}

# ------------------------------------------------------------------------------- teachers

# The model block every model-backed teacher (and the student) reads (train.loop.build_model).
MODEL_KNOBS = {
    "init": _k(str, "random", "weights: 'random', 'asset:<name>', an HF dir or a .gguf"),
    "config": _k("any", None, "architecture dict (family and sizes) for random or compile"),
    "family": _k(str, None, "model family"),
    "dtype": _k(str, None, "activation dtype"),
    "param_dtype": _k(str, None, "parameter dtype"),
    "attention_impl": _k(str, None, "attention kernel"),
    "moe_impl": _k(str, None, "MoE implementation"),
    "moe_capacity_factor": _k(float, None, "MoE capacity factor", low=0.0),
    "scan_layers": _k(bool, None, "scan over stacked layers"),
    "keep_layers": _k("any", None, "layers kept at load"),
    "rules": _k("seq", None, "the teacher's own logical-axis rules"),
}
_DECAY = _k(float, 0.999, "EMA decay", **_PROB)
_EVERY = _k(int, 1, "update the EMA after every N-th optimizer step (UniSD: N=10)", low=1)
_MODELS = _k("seq", None, "model blocks, one per teacher")
_ALL = ("teacher", "hidden_states", "qkv")
_TEACHER_LIST = [
    _entry(
        "online",
        "teacher",
        teachers.OnlineTeacher,
        "a model run inside the step",
        {
            **MODEL_KNOBS,
            "logprob_chunk_tokens": _k(
                int,
                32,
                "with config.bridge: teacher positions per step of its log-prob walk",
                low=1,
            ),
        },
        supplies=frozenset(_ALL),
    ),
    _entry(
        "cached",
        "teacher",
        teachers.CachedTeacher,
        "top-k logits read from a cache directory",
        {
            **MODEL_KNOBS,
            "cache_dir": _k(str, None, "the cache written by --mode=cache"),
            "k": _k(int, 64, "top-k kept per position", low=1),
            "cache_temperature": _k(
                float, 1.0, "temperature of the cached log-probs", low=0.0, open_low=True
            ),
            "cache_dtype": _k(
                str,
                "bfloat16",
                "dtype of the cached log-probs",
                choices=("bfloat16", "float16", "float32"),
            ),
        },
        supplies=frozenset({"teacher"}),
    ),
    _entry(
        "ensemble",
        "teacher",
        teachers.EnsembleTeacher,
        "probability average of several models",
        {
            "models": _MODELS,
            "weights": _k("seq", None, "mixture weights (None: uniform)"),
            "rules": MODEL_KNOBS["rules"],
        },
        supplies=frozenset({"teacher"}),
    ),
    _entry(
        "composite",
        "teacher",
        teachers.CompositeTeacher,
        "z_a + alpha (z_b - z_c) of three models",
        {
            "models": _MODELS,
            "alpha": _k(float, 1.0, "scale of the logit difference (alpha_rule='constant')"),
            "alpha_rule": _k(
                str,
                "constant",
                "constant alpha, or AlignDistil's per-token alpha_t",
                choices=("constant", "token_adaptive"),
            ),
            "alpha_scale": _k(float, 0.1, "alpha_t = min(scale / TV(p_b, p_c), max)", low=0.0),
            "alpha_max": _k(float, 5.0, "the cap of alpha_t", low=0.0),
            "rules": MODEL_KNOBS["rules"],
        },
        supplies=frozenset({"teacher"}),
    ),
    _entry(
        "ema",
        "teacher",
        teachers.EMATeacher,
        "an EMA of the student",
        {**MODEL_KNOBS, "decay": _DECAY, "every_steps": _EVERY},
        supplies=frozenset(_ALL),
    ),
    _entry(
        "self",
        "teacher",
        teachers.SelfTeacher,
        "the student reading a privileged context",
        {
            **MODEL_KNOBS,
            "decay": _DECAY,
            "every_steps": _EVERY,
            "source": _k(
                str, "student", "weights of the teacher side", choices=("student", "ema", "initial")
            ),
            "agreement_gamma": _k(float, None, "multi-context agreement sharpness", low=0.0),
            "agreement_level": _k(
                str, "token", "agreement per token or sequence", choices=("token", "sequence")
            ),
        },
        supplies=frozenset({"teacher"}),
    ),
    _entry(
        "none",
        "teacher",
        None,
        "no teacher: teacher-free terms only (ce, student_entropy)",
        {**MODEL_KNOBS},
    ),
]
TEACHERS: dict[str, Entry] = {e.name: e for e in _TEACHER_LIST}


# --------------------------------------------------------------------------- loss_options

OPTIONS: dict[str, Knob] = {
    "head_chunk_tokens": _k(
        int, None, "tokens per chunk of the fused head+loss (None: fused.auto_chunk_size)", low=1
    ),
    "implementation": _k(
        str, "custom_vjp", "gradient of the fused loss", choices=("custom_vjp", "remat")
    ),
    "semantics": _k(str, "renorm_both", "top-k teacher semantics", choices=topk.SEMANTICS),
    "temperature_squared": _k(bool, True, "multiply divergence terms by tau^2"),
    "alpha": _k(float, None, "divergences x alpha, ce x (1 - alpha)", **_UNIT),
    "total_steps": _k(int, None, "optimizer steps of the run (set from train.steps)", low=1),
    "selection": _k("any", None, "dict(kind=..., **knobs): a SELECTIONS entry"),
}
# Old knob names -> new ones, per scope: a config with an old name fails with this hint.
RENAMED = {
    "loss_options": {"chunk_size": "head_chunk_tokens"},
    "alm": {"chunk_size": "student_logprob_chunk_tokens"},
    "teacher": {"logprob_chunk_size": "logprob_chunk_tokens", "chunk_size": "logprob_chunk_tokens"},
}
