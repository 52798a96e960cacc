"""Offline teachers: a model run once, before training, writing what the data pipeline reads
back (``data.teacher_cache``: top-k per batch; ``data.seqkd``: verified traces)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import jax
import numpy as np
from flax import nnx

from distill_jax.data import answers, seqkd, teacher_cache
from distill_jax.eval import gsm
from distill_jax.losses import topk


def model_fingerprint(model) -> str:
    """sha256 (hex) of a model's config and every parameter's bytes: which teacher wrote a cache."""
    digest = hashlib.sha256(repr(model.config).encode())
    for path, value in sorted(
        jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)), key=lambda x: str(x[0])
    ):
        digest.update(str(path).encode())
        digest.update(np.ascontiguousarray(jax.device_get(value)).tobytes())
    return digest.hexdigest()


def build_teacher_cache(
    directory: str,
    model,
    batches: Iterable[dict[str, np.ndarray]],
    *,
    num_batches: int,
    k: int,
    tokenizer_fingerprint: str,
    temperature: float = 1.0,
    dtype: str = "bfloat16",
    data_settings: dict | None = None,
    batches_per_shard: int = 64,
    chunk_size: int = 128,
    vocab_mask=None,
) -> teacher_cache.TeacherCache:
    """Run ``model`` (the teacher) over ``num_batches`` packed batches and cache its top-k.

    The forward uses each batch's positions and segment ids, so packed documents stay apart;
    the top-k is taken chunk by chunk from the final hidden states
    (``topk.sparse_teacher_from_hidden``), so no [B, L, V] array is formed. ``vocab_mask`` [V]
    keeps padded vocabulary rows (ids the tokenizer never produces) out of the top-k.

    Returns:
        The written cache, opened for reading.
    """
    c = model.config
    settings = dict(
        teacher=model_fingerprint(model),
        tokenizer=tokenizer_fingerprint,
        k=k,
        temperature=float(temperature),
        vocab_size=c.vocab_size,
        data=data_settings or {},
    )
    writer = teacher_cache.TeacherCacheWriter(
        directory, settings, dtype=dtype, batches_per_shard=batches_per_shard
    )

    @nnx.jit
    def top_k(model, input_ids, positions, segment_ids):
        out = model.forward(
            input_ids, positions=positions, segment_ids=segment_ids, compute_logits=False
        )
        return topk.sparse_teacher_from_hidden(
            out.hidden,
            model.head_weights(),
            k,
            temperature=temperature,
            softcap=c.final_logit_softcapping,
            vocab_mask=vocab_mask,
            chunk_size=chunk_size,
        )

    for i, batch in enumerate(batches):
        if i == num_batches:
            break
        sparse = top_k(model, batch["input_ids"], batch["positions"], batch["segment_ids"])
        writer.add(batch, jax.device_get(sparse))
    writer.close()
    return teacher_cache.TeacherCache(directory, writer.process_index)


def build_seqkd_dataset(
    model,
    tokenizer,
    problems: Sequence[dict],
    out_dir: str,
    *,
    teacher: str,
    n: int = 4,
    mode: str = "flexible",
    **sampling,
) -> dict:
    """Sequence-level KD data (``data.seqkd``): sample ``n`` traces per problem from ``model``
    (``eval.gsm.sample_answers`` settings in ``sampling``), verify them and write the dataset.
    Returns the manifest."""
    completions = gsm.sample_answers(
        model, tokenizer, [p["question"] for p in problems], n=n, **sampling
    )
    positives, negatives = seqkd.split_traces(problems, completions, mode=mode)
    manifest = dict(
        teacher=teacher,
        teacher_config=repr(model.config),
        tokenizer=tokenizer.fingerprint,
        prompt_format=answers.PROMPT_FORMAT,
        verifier=f"data.answers.extract_answer(mode={mode!r}) == final number of the reference",
        sampling=dict(sampling, n=n),
        problems=len(problems),
        samples=len(problems) * n,
    )
    return seqkd.write_dataset(out_dir, positives, negatives, manifest)
