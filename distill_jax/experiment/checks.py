"""Checks of a config that run before anything is loaded or compiled, and the config's step
shape and loss spec."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from distill_jax import bridges
from distill_jax.experiment import depths
from distill_jax.train import objective, rollout, terms

ONPOLICY_TEACHERS = ("online", "ema", "ensemble", "composite", "self")


def loss_spec(c) -> objective.LossSpec:
    """The whole config checked against the term registry (losses, loss_options, teacher, and
    what the terms need) and ``config.losses`` as a LossSpec, before anything is loaded; feature
    terms' layer indices against the depths the config gives (``depths.model_depths``)."""
    spec = objective.loss_spec(c)
    if spec.feature_terms:
        terms.check_layers(spec.feature_terms.values(), *depths.model_depths(c))
    return spec


def step_shape(c) -> tuple[int, int]:
    """[B, L] of a step's token batch: prompt + completion on-policy, else data.seq_len."""
    onpolicy = check_onpolicy(c)
    if onpolicy is not None:
        return (c.data.global_batch_size, onpolicy.prompt_len + onpolicy.max_new_tokens)
    return (c.data.global_batch_size, c.data.seq_len)


def check_onpolicy(c) -> Any:
    """``config.onpolicy`` checked before anything is loaded (None when absent).

    Fields: lmbda (probability of student samples per step), prompt_len, max_new_tokens,
    temperature / top_k / top_p (sampling only; the loss has its own temperature), seq_kd
    (fixed-data steps train on teacher samples), replay (capacity, init_threshold, loss_eps).
    """
    o = c.get("onpolicy")
    if not o:
        return None
    for key in ("lmbda", "prompt_len", "max_new_tokens"):
        if key not in o:
            raise ValueError(f"config.onpolicy needs {key!r} (see train/rollout.py).")
    rollout.use_student_samples(0, 0, float(o.lmbda))  # checks the range
    if int(o.prompt_len) < 1 or int(o.max_new_tokens) < 1:
        raise ValueError("onpolicy.prompt_len and onpolicy.max_new_tokens must be >= 1.")
    kind = c.teacher.get("kind", "online")
    if c.get("bridge") and (
        o.get("seq_kd") or o.get("replay", {}).get("capacity") or c.data.get("privileged_contexts")
    ):
        raise ValueError(
            "config.onpolicy with config.bridge (cross-tokenizer on-policy) supports student "
            "samples and dataset completions; drop seq_kd, replay and privileged_contexts."
        )
    sft = kind == "none" and float(o.lmbda) == 0.0 and not o.get("seq_kd")
    if kind not in ONPOLICY_TEACHERS and not sft:
        raise ValueError(
            f"config.onpolicy with teacher.kind={kind!r}: student samples need a teacher that "
            f"scores new text in the step; use one of {ONPOLICY_TEACHERS} (or 'none' with "
            "lmbda=0: supervised training on the completions, e.g. sequence-level KD data)."
        )
    if c.data.get("privileged_contexts") and o.get("replay", {}).get("capacity"):
        raise ValueError(
            "onpolicy.replay with data.privileged_contexts: a replayed batch would meet another "
            "batch's privileged prompts; drop one of the two."
        )
    if o.get("seq_kd") and kind != "online":
        raise ValueError("onpolicy.seq_kd samples from the teacher: use teacher.kind='online'.")
    if c.get("prune_schedule") or c.student.get("prune"):
        raise ValueError("config.onpolicy cannot be combined with pruning in one run yet.")
    if "seq_len" in c.data and c.data.seq_len != o.prompt_len + o.max_new_tokens:
        raise ValueError(
            f"data.seq_len={c.data.seq_len} but on-policy rows hold prompt_len + max_new_tokens "
            f"= {o.prompt_len + o.max_new_tokens} tokens; remove data.seq_len or make them equal."
        )
    return o


def check_vocab(student, teacher, tokenizer) -> jax.Array | None:
    """The [V] mask of the student's vocabulary rows the tokenizer uses (None: all of them);
    ``tokenizer`` None (``--mode=compile``) checks the teacher's vocabulary only."""
    v = student.config.vocab_size
    v_t = v if teacher is None else teacher.vocab_size
    if tokenizer is None:  # compile mode: the smaller model's rows are the real ids
        return np.arange(v) < v_t if v_t < v else None
    if tokenizer.vocab_size > v:
        raise ValueError(
            f"The tokenizer has {tokenizer.vocab_size} ids but the student's vocabulary only {v}."
        )
    if tokenizer.vocab_size > v_t:
        raise ValueError(
            f"The teacher's vocabulary ({v_t}) differs from the student's ({v}) and is smaller "
            f"than the tokenizer's {tokenizer.vocab_size} ids, so the two models do not share "
            "this tokenizer; use a teacher with the student's tokenizer or a cross-tokenizer "
            "bridge (config.bridge, distill_jax.bridges)."
        )
    # One tokenizer, maybe padded to different sizes: ids past the tokenizer's are masked.
    # A host array: a jax.Array closed over by the step would be read back when it compiles.
    return bridges.padded_vocab_mask(tokenizer.vocab_size, v) if tokenizer.vocab_size < v else None
