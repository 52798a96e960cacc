"""Teacher kinds: ``TEACHERS[kind]`` for ``config.teacher.kind``, and ``MODEL_KNOBS``, the model
block every model-backed teacher (and the student) reads."""

from __future__ import annotations

from distill_jax import teachers
from distill_jax.train.registry.knobs import PROB, Entry, entry, knob

# The model block every model-backed teacher (and the student) reads (train.loop.build_model).
MODEL_KNOBS = {
    "init": knob(str, "random", "weights: 'random', 'asset:<name>', an HF dir or a .gguf"),
    "config": knob("any", None, "architecture dict (family and sizes) for random or compile"),
    "family": knob(str, None, "model family"),
    "dtype": knob(str, None, "activation dtype"),
    "param_dtype": knob(str, None, "parameter dtype"),
    "attention_impl": knob(str, None, "attention kernel"),
    "moe_impl": knob(str, None, "MoE implementation"),
    "moe_capacity_factor": knob(float, None, "MoE capacity factor", low=0.0),
    "scan_layers": knob(bool, None, "scan over stacked layers"),
    "keep_layers": knob("any", None, "layers kept at load"),
    "rules": knob("seq", None, "the teacher's own logical-axis rules"),
}
_DECAY = knob(float, 0.999, "EMA decay", **PROB)
_EVERY = knob(int, 1, "update the EMA after every N-th optimizer step (UniSD: N=10)", low=1)
_MODELS = knob("seq", None, "model blocks, one per teacher")
_ALL = ("teacher", "final_hidden", "hidden_states", "qkv")
_TEACHER_LIST = [
    entry(
        "online",
        "teacher",
        teachers.OnlineTeacher,
        "a model run inside the step",
        {
            **MODEL_KNOBS,
            "logprob_chunk_tokens": knob(
                int,
                32,
                "with config.bridge: teacher positions per step of its log-prob walk",
                low=1,
            ),
        },
        supplies=frozenset(_ALL),
    ),
    entry(
        "cached",
        "teacher",
        teachers.CachedTeacher,
        "top-k logits read from a cache directory",
        {
            **MODEL_KNOBS,
            "cache_dir": knob(str, None, "the cache written by --mode=cache"),
            "k": knob(int, 64, "top-k kept per position", low=1),
            "cache_temperature": knob(
                float, 1.0, "temperature of the cached log-probs", low=0.0, open_low=True
            ),
            "cache_dtype": knob(
                str,
                "bfloat16",
                "dtype of the cached log-probs",
                choices=("bfloat16", "float16", "float32"),
            ),
        },
        supplies=frozenset({"teacher"}),
    ),
    entry(
        "ensemble",
        "teacher",
        teachers.EnsembleTeacher,
        "probability average of several models",
        {
            "models": _MODELS,
            "weights": knob("seq", None, "mixture weights (None: uniform)"),
            "rules": MODEL_KNOBS["rules"],
        },
        supplies=frozenset({"teacher"}),
    ),
    entry(
        "composite",
        "teacher",
        teachers.CompositeTeacher,
        "z_a + alpha (z_b - z_c) of three models",
        {
            "models": _MODELS,
            "alpha": knob(float, 1.0, "scale of the logit difference (alpha_rule='constant')"),
            "alpha_rule": knob(
                str,
                "constant",
                "constant alpha, or AlignDistil's per-token alpha_t",
                choices=("constant", "token_adaptive"),
            ),
            "alpha_scale": knob(float, 0.1, "alpha_t = min(scale / TV(p_b, p_c), max)", low=0.0),
            "alpha_max": knob(float, 5.0, "the cap of alpha_t", low=0.0),
            "rules": MODEL_KNOBS["rules"],
        },
        supplies=frozenset({"teacher"}),
    ),
    entry(
        "ema",
        "teacher",
        teachers.EMATeacher,
        "an EMA of the student",
        {**MODEL_KNOBS, "decay": _DECAY, "every_steps": _EVERY},
        supplies=frozenset(_ALL),
    ),
    entry(
        "self",
        "teacher",
        teachers.SelfTeacher,
        "the student reading a privileged context",
        {
            **MODEL_KNOBS,
            "decay": _DECAY,
            "every_steps": _EVERY,
            "source": knob(
                str, "student", "weights of the teacher side", choices=("student", "ema", "initial")
            ),
            "agreement_gamma": knob(float, None, "multi-context agreement sharpness", low=0.0),
            "agreement_level": knob(
                str, "token", "agreement per token or sequence", choices=("token", "sequence")
            ),
        },
        supplies=frozenset({"teacher"}),
    ),
    entry(
        "none",
        "teacher",
        None,
        "no teacher: teacher-free terms only (ce, student_entropy)",
        {**MODEL_KNOBS},
    ),
]
TEACHERS: dict[str, Entry] = {e.name: e for e in _TEACHER_LIST}
