"""Token-selection rules: ``SELECTIONS[kind]`` for ``loss_options.selection.kind``."""

from __future__ import annotations

from distill_jax.losses import divergences
from distill_jax.train import selection_rules
from distill_jax.train.registry.knobs import PROB, Entry, entry, knob

_TERM = knob(str, None, "the term it acts on (default: the first divergence)")
_RATIO = knob(float, 0.6, "fraction of valid tokens kept", **PROB)
_SCORE = knob(
    str, None, "per-token score (a divergence name)", choices=tuple(sorted(divergences.CORES))
)
_SELECTION_LIST = [
    entry("none", "selection", selection_rules.none, "every valid token, weight 1", {}),
    entry(
        "adakd",
        "selection",
        selection_rules.adakd,
        "AdaKD: hard tokens kept, per-token tau (IDTS)",
        {
            "term": _TERM,
            "score": knob(
                str, "hellinger", "difficulty score", choices=tuple(sorted(divergences.CORES))
            ),
            "kappa": knob(float, 0.6, "IDTS temperature spread", low=0.0),
            "initial_ratio": knob(float, 1.0, "keep ratio at step 0", **PROB),
            "ema_decay": knob(float, 0.99, "loss EMA decay", **PROB),
            "eps_loss": knob(float, 0.1, "relative loss change that counts as progress", low=0.0),
            "eps_ratio": knob(float, 0.1, "ratio step", low=0.0),
            "warmup_steps": knob(int, 0, "steps before the ratio adapts", low=0),
            "update_every_steps": knob(int, 1, "steps between ratio updates", low=1),
            "min_ratio": knob(float, 0.1, "smallest keep ratio", **PROB),
        },
        ("teacher",),
    ),
    entry(
        "tsd",
        "selection",
        selection_rules.tsd,
        "TSD-KD: confidence weights from both entropies",
        {"term": _TERM},
        ("teacher",),
    ),
    entry(
        "tip",
        "selection",
        selection_rules.tip,
        "TIP: the top fraction of tokens by student entropy, or entropy x divergence quadrants",
        {
            "term": _TERM,
            "rule": knob(
                str,
                "quadrants",
                "'entropy': keep the top fraction by student entropy; 'quadrants': by keep",
                choices=("entropy", "quadrants"),
            ),
            "fraction": knob(float, 0.5, "share of valid tokens kept (rule='entropy')", **PROB),
            "per_row": knob(bool, False, "rank within each row (rule='entropy')"),
            "score": knob(
                str,
                "reverse_kl",
                "divergence of the quadrants",
                choices=tuple(sorted(divergences.CORES)),
            ),
            "keep": knob("seq", ("high_entropy", "low_entropy_high_divergence"), "quadrants kept"),
        },
        ("teacher",),
    ),
    entry(
        "clip",
        "selection",
        selection_rules.clip,
        "divergence clipping min(l, cap)",
        {
            "term": _TERM,
            "cap": knob(float, None, "fixed cap (None: the batch quantile)", low=0.0),
            "quantile": knob(float, 0.99, "cap = this quantile of the term's values", **PROB),
        },
        ("teacher",),
    ),
    entry(
        "rho1",
        "selection",
        selection_rules.rho1,
        "Rho-1: top excess CE over a reference model",
        {"term": _TERM, "keep_ratio": _RATIO},
        ("reference",),
    ),
    entry(
        "adaspec",
        "selection",
        selection_rules.adaspec,
        "AdaSPEC: tokens the reference learns well",
        {"term": _TERM, "keep_ratio": _RATIO},
        ("teacher", "reference"),
    ),
]
SELECTIONS: dict[str, Entry] = {e.name: e for e in _SELECTION_LIST}
