"""Training regimes: ``REGIMES[name]`` for each kind of batch source (``train/batch_sources.py``;
``fn`` is None because the sources import the step, which imports this registry: the entry's
doc names the source and ``experiment.Experiment.make_source`` builds it), with the knobs of
``config.onpolicy``, and ``regime_of(config)``, the one place that says which regime a config
selects."""

from __future__ import annotations

from typing import Any

from distill_jax.train.registry.knobs import PROB, Entry, entry, knob

_REPLAY = knob(
    "any",
    None,
    "DistiLLM's adaptive off-policy replay: dict(capacity, init_threshold=0.2, loss_eps=0.1)",
)
ONPOLICY_KNOBS = {
    "lmbda": knob(float, None, "probability of a step on the student's own samples", **PROB),
    "prompt_len": knob(int, None, "prompt tokens per row", low=1),
    "max_new_tokens": knob(int, None, "sampled tokens per row", low=1),
    "temperature": knob(float, 1.0, "sampling temperature", low=0.0),
    "top_k": knob(int, 0, "sampling top-k (0: off)", low=0),
    "top_p": knob(float, 1.0, "sampling top-p", low=0.0, high=1.0, open_low=True),
    "seq_kd": knob(bool, False, "non-student steps train on the teacher's samples"),
    "replay": _REPLAY,
}
_REGIME_LIST = [
    entry(
        "fixed",
        "regime",
        None,
        "FixedSource: packed documents of config.data (the default)",
        {},
    ),
    entry(
        "cached",
        "regime",
        None,
        "CachedTeacherSource: fixed data with the offline teacher's top-k (teacher.kind='cached')",
        {},
        ("cache",),
    ),
    entry(
        "onpolicy",
        "regime",
        None,
        "OnPolicySource: GKD, the student's samples with probability lmbda, else the data's "
        "completions or the teacher's samples, with DistiLLM's replay (config.onpolicy)",
        ONPOLICY_KNOBS,
        ("onpolicy",),
    ),
    entry(
        "bridge",
        "regime",
        None,
        "FixedSource of text pieces collated for both tokenizers (config.bridge)",
        {},
        ("bridge",),
    ),
    entry(
        "bridge_onpolicy",
        "regime",
        None,
        "BridgeSource: cross-tokenizer on-policy, the student's samples re-tokenized for the "
        "teacher (config.bridge and config.onpolicy)",
        ONPOLICY_KNOBS,
        ("bridge", "onpolicy"),
    ),
    entry(
        "pairs",
        "regime",
        None,
        "PairsSource: (chosen, rejected) pairs of one prompt, the pairs.jsonl of --mode=seqkd "
        "(data.source='pairs'; the pair terms dpo, redi, distillm2)",
        {},
        ("pairs",),
    ),
]
REGIMES: dict[str, Entry] = {e.name: e for e in _REGIME_LIST}


def regime_of(c: Any) -> str:
    """The REGIMES name a config selects: config.onpolicy and config.bridge, the teacher kind
    and data.source decide it (nothing else does)."""
    get = c.get if hasattr(c, "get") else lambda k, d=None: getattr(c, k, d)
    onpolicy, bridge = bool(get("onpolicy")), bool(get("bridge"))
    if bridge:
        return "bridge_onpolicy" if onpolicy else "bridge"
    if onpolicy:
        return "onpolicy"
    if (get("data") or {}).get("source") == "pairs":
        return "pairs"
    teacher = get("teacher") or {}
    return "cached" if teacher.get("kind") == "cached" else "fixed"
