"""Held-out perplexity: exp(sum of next-token NLL / number of predicted tokens)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm


def next_token_nll(logits: jax.Array, ids: jax.Array, segment_ids: jax.Array):
    """Sum and count of -log q(x_{t+1} | x_<=t) over positions whose next token is in the segment.

    Args:
        logits: [B, T, V] float.
        ids: [B, T] int.
        segment_ids: [B, T] int, 0 = padding.

    Returns:
        (nll_sum [], count []) float32.
    """
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    target = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]  # [B, T-1]
    valid = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
    return -jnp.sum(jnp.where(valid, target, 0.0)), jnp.sum(valid).astype(jnp.float32)


def chunk_documents(docs: Sequence[Sequence[int]], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut each document into rows of ``seq_len`` tokens; the last row of a doc is padded.

    Returns:
        ids [R, seq_len] int32 and segment_ids [R, seq_len] int32 (1 = token, 0 = padding).
    """
    rows = [doc[i : i + seq_len] for doc in docs for i in range(0, len(doc), seq_len)]
    rows = [r for r in rows if len(r) > 1]  # a lone token predicts nothing
    ids = np.zeros((len(rows), seq_len), np.int32)
    seg = np.zeros((len(rows), seq_len), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        seg[i, : len(r)] = 1
    return ids, seg


@jax.jit
def _batch_nll(graphdef, state, ids, seg):
    logits = nnx.merge(graphdef, state)(ids, segment_ids=seg)
    return next_token_nll(logits, ids, seg)


def perplexity(
    model: nnx.Module,
    docs: Sequence[Sequence[int]],
    *,
    seq_len: int = 256,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "perplexity",
) -> dict[str, float]:
    """Perplexity of ``model`` on tokenized documents, batch by batch with a progress bar.

    Returns:
        {"nll": mean NLL per predicted token, "tokens": count, "perplexity": exp(nll)}.
    """
    ids, seg = chunk_documents(docs, seq_len)
    pad = -len(ids) % batch_size  # fixed batch shape: compile once
    ids = np.concatenate([ids, np.zeros((pad, seq_len), np.int32)])
    seg = np.concatenate([seg, np.zeros((pad, seq_len), np.int32)])
    graphdef, state = nnx.split(model)
    total, count = 0.0, 0.0
    batches = range(0, len(ids), batch_size)
    for start in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
        s, c = _batch_nll(
            graphdef, state, ids[start : start + batch_size], seg[start : start + batch_size]
        )
        total, count = total + float(s), count + float(c)
    nll = total / max(count, 1.0)
    return {"nll": nll, "tokens": count, "perplexity": math.exp(nll)}
