"""``OPTIONS``: the knobs of ``config.loss_options``; ``RENAMED``: old knob names per scope."""

from __future__ import annotations

from distill_jax.losses import topk
from distill_jax.train.registry.knobs import UNIT, Knob, knob

OPTIONS: dict[str, Knob] = {
    "head_chunk_tokens": knob(
        int, None, "tokens per chunk of the fused head+loss (None: fused.auto_chunk_size)", low=1
    ),
    "implementation": knob(
        str, "custom_vjp", "gradient of the fused loss", choices=("custom_vjp", "remat")
    ),
    "semantics": knob(str, "renorm_both", "top-k teacher semantics", choices=topk.SEMANTICS),
    "temperature_squared": knob(bool, True, "multiply divergence terms by tau^2"),
    "alpha": knob(float, None, "divergences x alpha, ce x (1 - alpha)", **UNIT),
    "total_steps": knob(int, None, "optimizer steps of the run (set from train.steps)", low=1),
    "selection": knob("any", None, "dict(kind=..., **knobs): a SELECTIONS entry"),
}
# Old knob names -> new ones, per scope: a config with an old name fails with this hint.
RENAMED = {
    "loss_options": {"chunk_size": "head_chunk_tokens"},
    "alm": {"chunk_size": "student_logprob_chunk_tokens"},
    "teacher": {"logprob_chunk_size": "logprob_chunk_tokens", "chunk_size": "logprob_chunk_tokens"},
}
