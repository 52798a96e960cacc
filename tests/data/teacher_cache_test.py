"""Teacher cache: exact round trip, a real SmolLM2 teacher's top-k read back aligned with the
batches, refusals that name the difference, atomic/incomplete writes, bytes per token."""

from __future__ import annotations

import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import distill_jax as dj
from distill_jax import assets, teachers
from distill_jax.data import pipeline, sources, teacher_cache
from distill_jax.data.tokenizers import load_tokenizer
from distill_jax.losses import fused, topk


def _random_sparse(seed, b=2, t=8, v=50, k=5):
    logits = np.random.default_rng(seed).standard_normal((b, t, v)).astype(np.float32) * 3
    return topk.sparse_teacher(jnp.asarray(logits), k, temperature=2.0)


def _batch(seed, b=2, t=8):
    ids = np.random.default_rng(seed).integers(0, 50, (b, t)).astype(np.int32)
    return {"input_ids": ids}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_round_trip_is_exact(tmp_path, dtype):
    writer = teacher_cache.TeacherCacheWriter(
        str(tmp_path),
        dict(k=5, temperature=2.0),
        dtype=dtype,
        batches_per_shard=2,
        process_index=0,
        process_count=1,
    )
    written = [(_batch(i), _random_sparse(i)) for i in range(5)]  # 3 shards: 2 + 2 + 1
    for batch, sparse in written:
        writer.add(batch, sparse)
    writer.close()
    cache = teacher_cache.TeacherCache(str(tmp_path), process_index=0)
    assert cache.num_batches == 5 and len(os.listdir(tmp_path)) == 4  # 3 shards + manifest
    for i, (batch, sparse) in enumerate(written):
        got = cache.get(i, batch)
        np.testing.assert_array_equal(got.ids, sparse.ids)
        stored = np.asarray(sparse.logprobs).astype(teacher_cache.DTYPES[dtype]).astype(np.float32)
        np.testing.assert_array_equal(got.logprobs, stored)
        np.testing.assert_array_equal(got.log_normalizer, sparse.log_normalizer)
        np.testing.assert_array_equal(got.log_tail, sparse.log_tail)
        assert float(got.temperature) == 2.0
    if dtype == "bfloat16":  # really 16 bits on disk
        with np.load(tmp_path / "p000-00000.npz") as data:
            assert data["logprobs"].dtype == np.uint16
        assert ml_dtypes.bfloat16 is teacher_cache.DTYPES["bfloat16"]


def test_misaligned_batch_and_settings_are_refused_by_name(tmp_path):
    writer = teacher_cache.TeacherCacheWriter(
        str(tmp_path), dict(k=5, temperature=2.0, tokenizer="abc"), process_index=0, process_count=1
    )
    writer.add(_batch(0), _random_sparse(0))
    other_tau = topk.sparse_teacher(jnp.zeros((2, 8, 50)), 5, temperature=1.0)
    with pytest.raises(ValueError, match="temperature 2.0; this batch's is at 1.0"):
        writer.add(_batch(1), other_tau)
    writer.close()
    cache = teacher_cache.TeacherCache(str(tmp_path), process_index=0)
    with pytest.raises(ValueError, match="Batch 0 is not the batch"):
        cache.get(0, _batch(1))
    with pytest.raises(
        ValueError, match=r"tokenizer: cache has 'abc', this run has 'xyz'; k: cache has 5"
    ):
        cache.check(tokenizer="xyz", k=8, temperature=2.0)
    cache.check(tokenizer="abc", k=5)  # matching settings pass
    with pytest.raises(IndexError, match="Batch 3 is not in the cache"):
        cache.get(3)
    with pytest.raises(ValueError, match="dtype='int8'"):
        teacher_cache.TeacherCacheWriter(str(tmp_path), {}, dtype="int8")


def test_an_interrupted_write_is_not_a_cache(tmp_path):
    writer = teacher_cache.TeacherCacheWriter(
        str(tmp_path), {}, batches_per_shard=1, process_index=0, process_count=1
    )
    writer.add(_batch(0), _random_sparse(0))  # a shard is on disk, the manifest is not
    assert os.listdir(tmp_path) == ["p000-00000.npz"]
    with pytest.raises(FileNotFoundError, match="No complete teacher cache"):
        teacher_cache.TeacherCache(str(tmp_path), process_index=0)


@pytest.fixture(scope="module")
def smollm2():
    path = assets.smollm2_gguf_path()
    return dj.models.from_pretrained(path), load_tokenizer(path)


def test_real_teacher_cache_matches_the_online_teacher(tmp_path, smollm2):
    model, tok = smollm2
    texts = [t for _, t in sources.kjv_chapters()[:20]]
    make = lambda: pipeline.TokenBatches(
        texts,
        pipeline.text_encoder(tok),
        seq_len=128,
        global_batch_size=2,
        seed=1,
        long_documents="split",
        process_index=0,
        process_count=1,
    )
    it = make()
    cache = teachers.build_teacher_cache(
        str(tmp_path),
        model,
        it,
        num_batches=3,
        k=16,
        temperature=2.0,
        tokenizer_fingerprint=tok.fingerprint,
        dtype="float32",
        data_settings=it.config,
    )
    cache.check(
        teacher=teachers.model_fingerprint(model),
        tokenizer=tok.fingerprint,
        k=16,
        data=make().config,
    )
    with pytest.raises(ValueError, match="tokenizer: cache has"):
        cache.check(tokenizer=load_tokenizer("byte").fingerprint)
    for i, batch in enumerate(make()):
        if i == 3:
            break
        logits = model.forward(
            jnp.asarray(batch["input_ids"]),
            positions=jnp.asarray(batch["positions"]),
            segment_ids=jnp.asarray(batch["segment_ids"]),
        ).logits
        online = topk.sparse_teacher(logits, 16, temperature=2.0)
        cached = cache.get(i, batch)
        # Same ids, except where two candidates tie to float32 rounding (jit vs eager matmuls):
        # there the order may swap, and the values at the swapped slots are equal. The 16th
        # slot can also swap with the 17th candidate, which is why the gaps look one further.
        differ = np.asarray(cached.ids) != np.asarray(online.ids)
        assert differ.mean() < 1e-3
        lp = np.asarray(topk.sparse_teacher(logits, 17, temperature=2.0).logprobs)
        gaps = np.minimum(np.abs(np.diff(lp, prepend=np.inf)), np.abs(np.diff(lp, append=-np.inf)))
        assert np.all(gaps[..., :16][differ] < 1e-4)
        np.testing.assert_allclose(cached.logprobs, online.logprobs, rtol=2e-5, atol=1e-5)
        np.testing.assert_allclose(cached.log_tail, online.log_tail, atol=2e-4)
        # A loss from the cache equals the loss from the online teacher (for a student that
        # differs from the teacher: its hidden states scaled by 0.8).
        out = model.forward(jnp.asarray(batch["input_ids"]), compute_logits=False)
        out = out.replace(hidden=0.8 * out.hidden)
        mask = jnp.asarray(batch["loss_mask"])
        loss = lambda s, h=out.hidden, m=mask: fused.fused_distill_loss(
            h, model.head_weights(), sparse_teacher=s, mask=m, temperature=2.0
        )[0]
        np.testing.assert_allclose(loss(cached), loss(online), rtol=1e-5)
    # ids int32 + float32 log-probs: 8 bytes per entry, plus the two per-position floats.
    assert 16 * 8 + 8 <= cache.bytes_per_token <= 16 * 8 + 8 + 8
