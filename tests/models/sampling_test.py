"""KV-cache decoding against full forward passes; sampling filters against NumPy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import distill_jax as dj
from distill_jax.models import sampling

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=64,
)
FAMILY_KW = {
    "llama": dict(tie_word_embeddings=True),
    "qwen2": dict(),
    "gemma3": dict(layer_types=("sliding", "full"), sliding_window=3, query_pre_attn_scalar=8),
    "qwen2_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
    ),
    "qwen3": dict(),
    "mixtral": dict(num_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
}


def _model(family):
    config = dj.models.make_config(family, **TINY, **FAMILY_KW[family])
    model = dj.models.Transformer(config, rngs=nnx.Rngs(1))
    # Randomise norms and biases too, so every parameter matters.
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return model


@jax.jit
def _full_logits(graphdef, state, ids, positions, segments):
    model = nnx.merge(graphdef, state)
    return model(ids, positions=positions, segment_ids=segments)


def _reference_logits(model, prompt, mask, tokens):
    """Logits that predict each generated token, from one full forward over prompt + tokens."""
    ids = jnp.concatenate([prompt, tokens], axis=1)
    full_mask = jnp.concatenate([mask, jnp.ones(tokens.shape, bool)], axis=1)
    positions, segments = sampling.prompt_layout(full_mask)
    logits = _full_logits(*nnx.split(model), ids, positions, segments)
    p = prompt.shape[1]
    return logits[:, p - 1 : -1]


@pytest.mark.parametrize("family", sorted(FAMILY_KW))
def test_cached_greedy_logits_equal_full_forward(family):
    model = _model(family)
    rng = np.random.RandomState(0)
    prompt = jnp.asarray(rng.randint(0, 97, (3, 7)))
    # Left padding: row 1 has 3 real tokens, row 2 has 5; their results must ignore the pads.
    mask = jnp.asarray(np.arange(7)[None, :] >= np.array([[0], [4], [2]]))
    out = dj.models.generate(model, prompt, prompt_mask=mask, max_new_tokens=6, return_logits=True)
    ref = _reference_logits(model, prompt, mask, out.tokens)
    np.testing.assert_allclose(out.logits, ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(out.tokens, jnp.argmax(ref, axis=-1))
    # A padded row equals the same prompt without padding.
    alone = dj.models.generate(model, prompt[1:2, 4:], max_new_tokens=6, return_logits=True)
    np.testing.assert_array_equal(alone.tokens[0], out.tokens[1])
    np.testing.assert_allclose(alone.logits[0], out.logits[1], atol=1e-4, rtol=1e-4)


def _uncached_sample(model, prompt, n, rng, **kw):
    """Sampling by repeated full forwards with the keys generate() uses."""
    ids = prompt
    for i in range(n):
        logits = model(ids)[:, -1]
        tok = sampling.sample_logits(logits, jax.random.fold_in(rng, i), **kw)
        ids = jnp.concatenate([ids, tok[:, None]], axis=1)
    return ids[:, prompt.shape[1] :]


@pytest.mark.parametrize(
    "kw", [dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8)]
)
def test_cached_sampling_equals_uncached_sampling(kw):
    model = _model("qwen2")
    prompt = jnp.asarray(np.random.RandomState(1).randint(0, 97, (2, 5)))
    rng = jax.random.key(3)
    out = dj.models.generate(model, prompt, max_new_tokens=5, rng=rng, **kw)
    np.testing.assert_array_equal(out.tokens, _uncached_sample(model, prompt, 5, rng, **kw))


def test_eos_stops_a_row():
    model = _model("llama")
    prompt = jnp.asarray(np.random.RandomState(2).randint(0, 97, (2, 4)))
    free = dj.models.generate(model, prompt, max_new_tokens=6)
    eos = int(free.tokens[0, 2])  # make the third greedy token of row 0 the end token
    out = dj.models.generate(model, prompt, max_new_tokens=6, eos_id=eos)
    first = int(np.argmax(np.asarray(out.tokens[0]) == eos))
    assert np.all(np.asarray(out.tokens[0, first:]) == eos)
    assert int(out.lengths[0]) == first + 1
    np.testing.assert_array_equal(out.tokens[0, : first + 1], free.tokens[0, : first + 1])


def _np_filter(logits, temperature, top_k, top_p):
    x = logits.astype(np.float64) / temperature
    out = np.full_like(x, -np.inf)
    for b in range(x.shape[0]):
        order = np.argsort(-x[b], kind="stable")
        keep = order[:top_k] if top_k else order
        p = np.exp(x[b, keep] - x[b, keep].max())
        p /= p.sum()
        kept, mass = [], 0.0
        for idx, prob in zip(keep, p):
            if mass >= top_p:
                break
            kept.append(idx)
            mass += prob
        out[b, kept] = x[b, kept]
    return out


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 1.0), (0, 0.5), (4, 0.9), (1, 1.0)])
def test_filter_logits_matches_numpy(top_k, top_p):
    logits = np.random.RandomState(4).randn(3, 11).astype(np.float32) * 2
    got = np.asarray(
        jax.jit(lambda x: sampling.filter_logits(x, temperature=0.8, top_k=top_k, top_p=top_p))(
            logits
        )
    )
    want = _np_filter(logits, 0.8, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-6)


def test_sampling_frequencies_follow_filtered_distribution():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 20000)
    draw = jax.vmap(lambda k: sampling.sample_logits(logits, k, temperature=1.0, top_p=0.7)[0])
    counts = np.bincount(np.asarray(draw(keys)), minlength=4) / 20000
    # top_p=0.7 keeps {0.5, 0.3} (mass before 0.3 is 0.5 < 0.7; before 0.15 is 0.8).
    np.testing.assert_allclose(counts, [0.625, 0.375, 0, 0], atol=0.015)


def test_too_long_generation_is_refused_before_compiling():
    model = _model("llama")
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        dj.models.generate(model, jnp.zeros((1, 60), jnp.int32), max_new_tokens=10)
