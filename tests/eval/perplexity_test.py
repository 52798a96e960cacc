"""Perplexity against a NumPy float64 computation of the next-token NLL."""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx

import distill_jax as dj
from distill_jax.eval import chunk_documents, next_token_nll, perplexity


def _np_nll(logits, ids, seg):
    logits = logits.astype(np.float64)
    total, count = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if seg[b, t + 1] != 0 and seg[b, t + 1] == seg[b, t]:
                row = logits[b, t]
                logz = row.max() + np.log(np.exp(row - row.max()).sum())
                total += logz - row[ids[b, t + 1]]
                count += 1
    return total, count


def test_next_token_nll_matches_numpy_on_packed_rows():
    rng = np.random.RandomState(0)
    logits = rng.randn(2, 7, 11).astype(np.float32)
    ids = rng.randint(0, 11, (2, 7))
    seg = np.array([[1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    s, c = jax.jit(next_token_nll)(logits, ids, seg)
    want_s, want_c = _np_nll(logits, ids, seg)
    assert float(c) == want_c == 3 + 6
    np.testing.assert_allclose(float(s), want_s, rtol=1e-5)


def test_chunk_documents_keeps_every_token_once():
    docs = [list(range(1, 11)), [5, 6, 7], [9]]
    ids, seg = chunk_documents(docs, 4)
    assert ids.shape == (4, 4)  # 10 -> 4+4+2, 3 -> 3; the lone token is dropped
    assert [int(x) for x in ids[seg == 1]] == list(range(1, 11)) + [5, 6, 7]


def test_perplexity_of_a_model_equals_numpy_over_all_batches():
    config = dj.models.make_config(
        "llama",
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
    )
    model = dj.models.Transformer(config, rngs=nnx.Rngs(0))
    rng = np.random.RandomState(1)
    docs = [rng.randint(0, 50, n).tolist() for n in (9, 20, 3)]
    got = perplexity(model, docs, seq_len=8, batch_size=2, progress=False)
    ids, seg = chunk_documents(docs, 8)
    logits = np.asarray(model(ids, segment_ids=seg))
    total, count = _np_nll(logits, ids, seg)
    assert got["tokens"] == count
    np.testing.assert_allclose(got["perplexity"], math.exp(total / count), rtol=1e-5)
