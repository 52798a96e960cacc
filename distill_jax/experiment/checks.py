"""Checks of a config that run before anything is loaded or compiled, and the config's step
shape and loss spec."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from distill_jax import bridges, sharding
from distill_jax.data import teacher_cache
from distill_jax.experiment import depths
from distill_jax.train import objective, registry, rollout, terms
from distill_jax.train.settings import RunSettings

ONPOLICY_TEACHERS = ("online", "ema", "ensemble", "composite", "self")


def check_run(c) -> None:
    """``config.train``, ``optimizer``, ``eval`` and ``data`` checked before anything is built:
    every knob against ``registry.RUN_BLOCKS`` (names, types, ranges, NaN / inf;
    ``terms.check_blocks``), the knobs a run needs (``registry.REQUIRED``) and ``data.seq_len``
    unless ``config.onpolicy`` gives the row length."""
    terms.check_blocks(c)
    for block, names in registry.REQUIRED.items():
        have = terms.to_dict(c.get(block))
        for name in names:
            if have.get(name) is None:
                knob = registry.RUN_BLOCKS[block][name]
                raise ValueError(
                    f"config.{block}.{name} is not set: {knob.doc}, {knob.describe()}; set it "
                    f"in the config file or with --config.{block}.{name}=..."
                )
    if not c.get("onpolicy") and c.data.get("seq_len") is None:
        raise ValueError(
            "config.data.seq_len is not set: tokens per row, an integer >= 1 (only on-policy "
            "runs take the row length from onpolicy.prompt_len + max_new_tokens)."
        )


def check_batch(c, mesh, mesh_rules, shape: tuple[int, int]) -> None:
    """The step's [B, L] batch against the mesh and ``train.micro_batches``: B rows split over
    the data-parallel devices (the mesh axes ``batch`` maps to) and into micro-batches."""
    b, (dp, axes) = shape[0], sharding.data_parallel_size(mesh, mesh_rules)
    if b % dp:
        raise ValueError(
            f"data.global_batch_size={b} is split over {dp} devices (mesh axes {axes}, which the "
            f"rules map 'batch' to), which does not divide it; use a multiple of {dp} or change "
            "config.mesh."
        )
    a = int(c.train.get("micro_batches", 1))
    if b % a:
        raise ValueError(
            f"data.global_batch_size={b} is not divisible by train.micro_batches={a} (each "
            f"micro-batch takes B / {a} rows); use a batch that is a multiple of {a} or another "
            "micro_batches."
        )
    sharding.batch_sharding(mesh, mesh_rules, shape=shape)  # any other sharded dimension


def check_cache(c) -> teacher_cache.TeacherCache | None:
    """A cached teacher's cache (``teacher.kind='cached'``) against the run, before anything
    loads: its manifest exists, it holds a batch for each of ``train.steps``, the K, temperature
    and dtype the config sets (if any) are the cache's, and every shard's arrays have the
    manifest's shapes. Tokenizer and data settings are checked when they are known
    (``experiment.models``). Returns the opened cache (None for other teachers)."""
    t = c.get("teacher") or {}
    if t.get("kind") != "cached":
        return None
    cache = teacher_cache.TeacherCache(t.cache_dir)
    cache.check_run(
        steps=int(c.train.steps),
        k=t.get("k"),
        temperature=t.get("cache_temperature"),
        dtype=t.get("cache_dtype"),
    )
    cache.check_arrays()
    return cache


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
    terms.check_knobs("config.onpolicy", o, registry.ONPOLICY_KNOBS)  # names, types, ranges
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


PAIR_TEACHERS = ("online", "ema")  # one model run in the step, on both sides of each pair


def check_pairs(c, spec: objective.LossSpec) -> None:
    """``data.source="pairs"`` (preference pairs, ``data.pairs``) checked with the loss spec
    before anything is loaded: fixed data of ``data.seq_len`` rows from ``data.path``, no
    on-policy generation, bridge or pruning, and a teacher model in the step when a pair term
    reads the teacher. (A pair term without pairs fails in ``loss_spec``: its "pairs" need.)"""
    if c.data.get("source") != "pairs":
        return
    if not c.data.get("path"):
        raise ValueError(
            "data.source='pairs' needs data.path: the directory --mode=seqkd wrote "
            "(config.seqkd.out_dir) or a pairs.jsonl file."
        )
    if not c.data.get("seq_len"):
        raise ValueError("data.source='pairs' needs data.seq_len (the length of every row).")
    for key, what in (("onpolicy", "on-policy generation"), ("bridge", "a cross-tokenizer bridge")):
        if c.get(key):
            raise ValueError(
                f"data.source='pairs' with config.{key}: preference pairs are fixed data and "
                f"are not combined with {what}; drop config.{key}."
            )
    if c.get("prune_schedule") or c.student.get("prune"):
        raise ValueError(
            "data.source='pairs' with pruning: calibration reads documents; prune in a run on "
            "documents first, then train the pruned student on pairs."
        )
    kind = c.teacher.get("kind", "online")
    if kind in ("cached", "self"):
        raise ValueError(
            f"data.source='pairs' with teacher.kind={kind!r}: the teacher must score both sides "
            f"of each pair in the step; use one of {PAIR_TEACHERS} (or 'none' for redi / ce)."
        )
    if spec.pairs_need_teacher() and kind not in PAIR_TEACHERS:
        labels = sorted(k for k, t in spec.pair_terms.items() if "teacher" in t.entry.needs)
        raise ValueError(
            f"Loss terms {labels} read one teacher model's log-probs on both sides of each "
            f"pair; teacher.kind={kind!r} has none: use one of {PAIR_TEACHERS}."
        )


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


def run_settings(c, spec: objective.LossSpec) -> RunSettings:
    """``config.seed``, ``optimizer``, ``train``, ``eval``, ``teacher.rules``, ``data.source``
    and ``bridge`` as the ``train.settings.RunSettings`` the step builder and the loop read."""
    t, e = c.train, c.get("eval") or {}
    rules = (c.get("teacher") or {}).get("rules")
    return RunSettings(
        seed=int(c.get("seed", 0)),
        steps=int(t.steps),
        optimizer=dict(c.optimizer),
        micro_batches=int(t.get("micro_batches", 1)),
        remat=t.get("remat", False),
        log_every=int(t.get("log_every_steps", 1)),
        checkpoint_every=int(t.get("checkpoint_every_steps", 100)),
        keep_checkpoints=int(t.get("keep_checkpoints", 3)),
        export=bool(t.get("export", False)),
        eval_every=e.get("every_steps"),
        eval_at_start=bool(e.get("at_start", True)),
        teacher_rules=None if rules is None else tuple(tuple(r) for r in rules),
        batch=dict(bridge=bool(c.get("bridge")), pairs=c.data.get("source") == "pairs"),
        loss_labels=tuple(spec.labels()),
        nonfinite=str(t.get("nonfinite", "stop")),
        max_skipped_steps=int(t.get("max_skipped_steps", 10)),
    )
