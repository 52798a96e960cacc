"""Loss terms: ``LOSS_TERMS[name]`` for every name ``config.losses`` may pick (logit, feature,
pair and bridge families)."""

from __future__ import annotations

from distill_jax.losses import divergences, features, preference, selection, tokens, topk
from distill_jax.train import bridge_terms, pair_terms
from distill_jax.train.registry.knobs import TEMPERATURE, UNIT, WEIGHT, Entry, entry, knob

_LOGIT_COMMON = {
    "weight": WEIGHT,
    "temperature": TEMPERATURE,
    "semantics": knob(
        str,
        None,
        "top-k teacher semantics (default loss_options.semantics)",
        choices=topk.SEMANTICS,
    ),
    "temperature_squared": knob(
        bool, None, "multiply by tau^2 (default loss_options.temperature_squared)"
    ),
}
_TAID_KNOBS = {
    "t_start": knob(float, 0.4, "initial interpolation t", low=0.0, high=1.0, to_fn=False),
    "t_end": knob(float, 1.0, "final interpolation t", low=0.0, high=1.0, to_fn=False),
    "step_size": knob(float, 5e-4, "adaptive step size of t (TAID's alpha)", low=0.0, to_fn=False),
    "momentum": knob(
        float, 0.99, "momentum of the adaptive update (TAID's beta)", low=0.0, high=1.0, to_fn=False
    ),
    "adaptive": knob(bool, True, "adapt t to the loss's relative change", to_fn=False),
}
_CORE_KNOBS = {
    "jsd": {
        "beta": knob(float, 0.5, "mixture m = beta p + (1 - beta) q", **UNIT),
        "normalize": knob(
            bool, False, "divide the interior by beta (1 - beta), continuous at the ends"
        ),
    },
    "skew_kl": {"alpha": knob(float, 0.1, "skew: KL(p || alpha p + (1 - alpha) q)", **UNIT)},
    "skew_reverse_kl": {
        "alpha": knob(float, 0.1, "skew: KL(q || alpha q + (1 - alpha) p)", **UNIT)
    },
    "ab": {
        "alpha": knob(float, 1.0, "alpha of the alpha-beta divergence", schedule=True),
        "beta": knob(float, 1.0, "beta of the alpha-beta divergence", schedule=True),
    },
    "akl": {
        "mu": knob(float, 0.5, "head/tail split of the teacher's mass", **UNIT),
        "eps": knob(float, 1e-12, "floor of the gap weights", low=0.0),
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
    name: entry(
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
    "ce": entry(
        "ce",
        "logit",
        tokens.cross_entropy,
        "hard-label cross-entropy -log q(y) at tau = 1",
        {"weight": WEIGHT},
        alpha="one_minus_alpha",
    ),
    "student_entropy": entry(
        "student_entropy",
        "logit",
        tokens.entropy,
        "the student's entropy H(q_tau) (a statistic of selection rules)",
        {"weight": WEIGHT, "temperature": TEMPERATURE},
    ),
    "teacher_entropy": entry(
        "teacher_entropy",
        "logit",
        tokens.entropy,
        "the teacher's entropy H(p_tau), constant (a statistic)",
        {"weight": WEIGHT, "temperature": TEMPERATURE},
        ("teacher",),
    ),
    "sinkhorn": entry(
        "sinkhorn",
        "logit",
        divergences.sinkhorn,
        "entropic OT cost between the tokens' q and p (squared-Euclidean cost)",
        {
            **_LOGIT_COMMON,
            "epsilon": knob(float, 0.1, "entropic regulariser", low=0.0, open_low=True),
            "num_iters": knob(int, 20, "Sinkhorn iterations", low=1),
            "scope": knob(
                str, "batch", "tokens transported together", choices=("batch", "sequence")
            ),
        },
        ("teacher",),
        tau_squared=True,
    ),
    "multilevel_ot": entry(
        "multilevel_ot",
        "logit",
        divergences.multilevel_ot,
        "MultiLevelOT: z-scored top-k columns, token-level terms, sequence-level L1 Sinkhorn",
        {
            **_LOGIT_COMMON,
            "epsilon": knob(float, 0.1, "entropic regulariser", low=0.0, open_low=True),
            "num_iters": knob(int, 10, "Sinkhorn iterations", low=1),
            "top_k": knob(int, 50, "vocabulary columns kept (by batch mass)", low=1),
            "token_weight": knob(float, 1.0, "weight of the absolute token term", low=0.0),
            "log_weight": knob(float, 0.1, "weight of the logarithmic token term", low=0.0),
            "sequence_weight": knob(float, 0.1, "weight of the sequence-level Sinkhorn", low=0.0),
        },
        ("teacher",),
        tau_squared=True,
    ),
    "listmle": entry(
        "listmle",
        "logit",
        preference.listmle,
        "TSD-KD ListMLE: the student's top-k tokens ranked by the teacher's logits",
        {
            "weight": WEIGHT,
            "temperature": TEMPERATURE,
            "k": knob(int, 10, "tokens ranked (the student's top k)", low=1),
            "normalization": knob(
                str, "suffix", "ListMLE normaliser", choices=("suffix", "prefix")
            ),
            "entropy_threshold": knob(
                float,
                None,
                "TSD-KD: only each row's early positions, until the cumulative share of the "
                "student's entropy reaches this (preference.tsd_listmle_mask; its own mask and "
                "count, train/term_masks.py); None: every valid position",
                low=0.0,
                high=1.0,
                to_fn=False,
            ),
        },
        ("teacher",),
    ),
    "tsd_entropy_penalty": entry(
        "tsd_entropy_penalty",
        "logit",
        selection.tsd_entropy_penalty,
        "TSD-KD entropy penalty: mean H(q_tau) over the tokens whose student entropy is at or "
        "above its quantile (its own mask and count, train/term_masks.py)",
        {
            "weight": WEIGHT,
            "temperature": TEMPERATURE,
            "quantile": knob(
                float,
                0.1,
                "penalise the valid tokens at or above this quantile of the student's entropy",
                low=0.0,
                high=1.0,
                to_fn=False,
            ),
        },
    ),
}
_LAYERS = knob(
    str,
    "uniform",
    "layer map for different depths (features.layer_map)",
    choices=("uniform", "all", "last"),
)
_PAIRS = knob("seq", None, "explicit (student_layer, teacher_layer) pairs instead of layers")
_PROJECTOR = knob(
    str,
    None,
    "projector init when widths differ (None: no projector)",
    choices=("xavier", "kaiming", "zeros", "identity"),
)
_HIDDEN = {"weight": WEIGHT, "layers": _LAYERS, "pairs": _PAIRS, "projector": _PROJECTOR}
_RELATION = {
    "weight": WEIGHT,
    "student_layer": knob(int, -1, "the student's layer (index into its q/k/v)"),
    "teacher_layer": knob(int, -1, "the teacher's layer (index into its q/k/v)"),
    "num_relation_heads": knob(int, None, "relation heads (None: the student's heads)", low=1),
}
_FEATURE_TERMS = {
    "hidden_mse": entry(
        "hidden_mse",
        "feature",
        features.hidden_mse,
        "per-layer hidden-state MSE ||P(h_s) - h_t||^2 / D_t",
        {
            **_HIDDEN,
            "normalize": knob(
                str, None, "divide by the teacher's mean square", choices=("global", "channel")
            ),
        },
        ("teacher", "hidden_states"),
    ),
    "hidden_cosine": entry(
        "hidden_cosine",
        "feature",
        features.hidden_cosine,
        "per-layer hidden-state cosine distance",
        _HIDDEN,
        ("teacher", "hidden_states"),
    ),
    "attention_relation": entry(
        "attention_relation",
        "feature",
        features.attention_relation_kl,
        "MiniLM query-key relation KL",
        _RELATION,
        ("teacher", "qkv"),
    ),
    "value_relation": entry(
        "value_relation",
        "feature",
        features.value_relation_kl,
        "MiniLM value-value relation KL",
        _RELATION,
        ("teacher", "qkv"),
    ),
    "attention_transfer": entry(
        "attention_transfer",
        "feature",
        features.attention_transfer_mse,
        "MSE of the attention maps at one layer pair, rebuilt from q and k (heads averaged "
        "to match)",
        {
            "weight": WEIGHT,
            "student_layer": knob(int, -1, "the student's layer"),
            "teacher_layer": knob(int, -1, "the teacher's layer"),
            "l1_normalize": knob(bool, False, "renormalise each visible row to sum 1"),
        },
        ("teacher", "qkv"),
    ),
    "output_relation": entry(
        "output_relation",
        "feature",
        features.output_relation_kl,
        "KL between position-to-position similarity rows of the output distributions (our "
        "relation loss, not Align-TI's TPA; materialises [B, T, V])",
        {
            "weight": WEIGHT,
            "temperature": TEMPERATURE,
            "similarity_temperature": knob(
                float, 0.1, "tau_s of the similarity softmax", low=0.0, open_low=True
            ),
        },
        ("teacher", "final_hidden"),
    ),
}
# Pair terms (train/pair_terms.py): sequence-level objectives on (chosen, rejected) pairs of
# config.data.source="pairs", each normalised over its own groups (pairs, or one side's tokens).
_PAIR_TERMS = {
    "dpo": entry(
        "dpo",
        "pair",
        pair_terms.dpo_sums,
        "DPO with the teacher as reference (LLaVA-MoD), per pair",
        {
            "weight": WEIGHT,
            "beta": knob(
                float,
                0.1,
                "inverse temperature of the DPO margin",
                low=0.0,
                open_low=True,
                schedule=True,
            ),
        },
        ("teacher", "pairs"),
    ),
    "redi": entry(
        "redi",
        "pair",
        pair_terms.redi_sums,
        "REDI: -c_pos log pi(y+)/|y+| + c_neg log pi(y-)/|y-|, per pair (no reference)",
        {
            "weight": WEIGHT,
            "c_pos": knob(float, 1.0, "weight of the positive trace's term", low=0.0),
            "c_neg": knob(float, 0.8, "weight of the negative trace's term", low=0.0),
        },
        ("pairs",),
    ),
    "distillm2": entry(
        "distillm2",
        "pair",
        pair_terms.distillm2_sums,
        "DistiLLM-2: (2 - b) skew KL on chosen + b skew reverse KL on rejected, per token",
        {
            "weight": WEIGHT,
            "b": knob(
                float,
                1.0,
                "curriculum weight (paper: 1 -> 1.5, a schedule)",
                low=0.0,
                high=2.0,
                schedule=True,
            ),
            "base_alpha": knob(
                float,
                0.1,
                "skew a_0 (the per-pair skew's cap)",
                low=0.0,
                high=1.0,
                open_low=True,
            ),
            "min_alpha": knob(
                float, 0.01, "floor of the per-pair skew", low=0.0, high=1.0, open_low=True
            ),
            "adaptive_alpha": knob(
                bool, True, "per-pair skew from the probability gap (False: a_0 for every pair)"
            ),
        },
        ("teacher", "pairs"),
        parts=pair_terms.DISTILLM2_GROUPS,
    ),
}
_BRIDGE_TERMS = {
    "alm": entry(
        "alm",
        "bridge",
        bridge_terms.alm_sum,
        "cross-tokenizer ALM over common-boundary chunks (bridges.alm), per chunk",
        {
            "weight": WEIGHT,
            "temperature": knob(
                float, 100.0, "tau_b of the chunk likelihoods", low=0.0, open_low=True
            ),
            "distance": knob(
                str,
                "binary_kl",
                "distance of chunk likelihoods",
                choices=("binary_kl", "binary_ce", "reverse_binary_kl", "abs"),
            ),
            "append_space": knob(bool, True, "compare word-boundary probabilities too"),
            "student_logprob_chunk_tokens": knob(
                int, 128, "student positions per step of its log-prob walk", low=1
            ),
            "merge_threshold": knob(
                float,
                0.0,
                "> 0: merge chunks while the teacher's boundary prob <= it (> 1: merge all)",
                low=0.0,
            ),
            "hidden_weight": knob(float, 0.0, "> 0: add the chunk-end hidden-state loss", low=0.0),
            "hidden_kind": knob(
                str, "mse", "chunk-end hidden-state loss", choices=("mse", "cosine")
            ),
            "projector": _PROJECTOR,
        },
        ("teacher", "bridge"),
    ),
}
_BRIDGE_TERMS.update(
    uld=entry(
        "uld",
        "bridge",
        bridge_terms.uld_sum,
        "ULD: sorted-probability L1 between index-paired valid positions (bridges.uld), per pair",
        {
            "weight": WEIGHT,
            "student_temperature": knob(float, 1.0, "tau of the student", low=0.0, open_low=True),
            "teacher_temperature": knob(float, 1.0, "tau of the teacher", low=0.0, open_low=True),
        },
        ("teacher", "bridge"),
    ),
    mined=entry(
        "mined",
        "bridge",
        bridge_terms.mined_sum,
        "MinED: KL to the teacher re-indexed by the minimum-edit-distance vocabulary map "
        "(bridges.mined), at chunk-end position pairs, per pair",
        {"weight": WEIGHT, "temperature": TEMPERATURE},
        ("teacher", "bridge", "mined_map"),
    ),
    dskd=entry(
        "dskd",
        "bridge",
        bridge_terms.dskd_parts,
        "DSKD with cross-model attention (bridges.dskd): t2s CE, t2s KD and s2t KD, each a mean",
        {
            "weight": WEIGHT,
            "temperature": TEMPERATURE,
            "divergence": knob(
                str,
                "forward_kl",
                "D of the t2s KD term",
                choices=tuple(n for n in divergences.CORES if n not in ("taid", "ab")),
            ),
            "projector": knob(
                str, "xavier", "init of the projections", choices=("xavier", "kaiming", "zeros")
            ),
        },
        ("teacher", "bridge", "embeddings"),
        parts=bridge_terms.DSKD_PARTS,
    ),
)
LOSS_TERMS: dict[str, Entry] = {
    **_DIVERGENCE_TERMS,
    **_EXTRA_TERMS,
    **_FEATURE_TERMS,
    **_PAIR_TERMS,
    **_BRIDGE_TERMS,
}
