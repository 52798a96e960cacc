"""Speculative sampling against the target's own distribution (exact), greedy decoding and the
closed-form acceptance / block-efficiency values of METHODS.md 8.1-8.3."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx

import distill_jax as dj
from distill_jax.eval import speculative

R_P, R_Q = np.array([0.7, 0.2, 0.1]), np.array([0.5, 0.3, 0.2])


def _model(family="llama", seed=0, vocab=8, layers=2, max_pos=64, **kw):
    extra = {
        "llama": {},
        "gemma3": dict(
            layer_types=tuple(("sliding", "full")[i % 2] for i in range(layers)),
            sliding_window=3,
            query_pre_attn_scalar=8,
        ),
        "qwen2_moe": dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
        ),
    }[family]
    config = dj.models.make_config(
        family,
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_layers=layers,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        max_position_embeddings=max_pos,
        **extra,
        **kw,
    )
    model = dj.models.Transformer(config, rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    leaves = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return model


def _chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """p-value of observed counts against probabilities, cells with expectation < 5 merged."""
    expected = probs * counts.sum()
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    return float(
        scipy.stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue
    )


def test_acceptance_and_residual_on_the_reference_pair():
    p = jnp.asarray(np.stack([R_P, [1 / 3] * 3]))[None]  # [1, 2, V]
    q = jnp.asarray(R_Q)[None, None]
    assert float(speculative.acceptance_rate(p[:, 0], q[:, 0])) == pytest.approx(0.8, abs=1e-7)
    # Draft token 1 (q=0.3 > p=0.2): accepted with probability 2/3; else the residual
    # norm(max(0, p - q)) = [1, 0, 0] gives token 0.
    n = 30000
    keys = jax.random.split(jax.random.key(0), n)
    acc, nxt = speculative.verify(
        jnp.broadcast_to(p, (n, 2, 3)),
        jnp.broadcast_to(q, (n, 1, 3)),
        jnp.ones((n, 1), jnp.int32),
        keys,
    )
    acc, nxt = np.asarray(acc), np.asarray(nxt)
    assert np.all(nxt[acc == 0] == 0)
    assert acc.mean() == pytest.approx(2 / 3, abs=0.01)


def test_verify_reproduces_the_target_distribution_monte_carlo():
    """Random p, q (V=5), 1e5 trials: the first emitted token follows p (chi-square)."""
    rs = np.random.RandomState(0)
    p1, p2, q = rs.dirichlet(np.ones(5)), rs.dirichlet(np.ones(5)), rs.dirichlet(np.ones(5))
    n = 100_000
    draft = rs.choice(5, size=n, p=q)
    acc, nxt = speculative.verify(
        jnp.broadcast_to(jnp.asarray(np.stack([p1, p2])), (n, 2, 5)).astype(jnp.float32),
        jnp.broadcast_to(jnp.asarray(q)[None, None], (n, 1, 5)).astype(jnp.float32),
        jnp.asarray(draft[:, None], jnp.int32),
        jax.random.key(1),
    )
    first = np.where(np.asarray(acc) == 1, draft, np.asarray(nxt))
    assert _chi_square_p(np.bincount(first, minlength=5), p1) > 0.001
    # The empirical acceptance equals sum min(p, q).
    assert np.mean(np.asarray(acc)) == pytest.approx(np.minimum(p1, q).sum(), abs=0.01)


def _target_pair_probs(target, prompt, temperature):
    """Exact P(t1, t2 | prompt) of the target's sampling distribution [V, V]."""
    v = target.config.vocab_size
    logits = target(prompt)[0, -1] / temperature
    p1 = np.asarray(jax.nn.softmax(logits.astype(jnp.float32)), np.float64)
    seqs = jnp.concatenate([jnp.repeat(prompt, v, axis=0), jnp.arange(v)[:, None]], axis=1)
    p2 = np.asarray(jax.nn.softmax(target(seqs)[:, -1] / temperature, axis=-1), np.float64)
    return p1[:, None] * p2


@pytest.mark.parametrize("gamma", [1, 3])
def test_speculative_sampling_preserves_the_target_distribution(gamma):
    """Two tokens sampled with a real draft model, 20,000 rows: the joint law of (t1, t2) is the
    target's (chi-square at a fixed seed), while the draft alone follows another law."""
    target, draft = _model(seed=0), _model(seed=1, layers=1)
    prompt = jnp.asarray([[3, 1, 4, 1]], jnp.int32)
    n = 20_000
    keys = jax.random.split(jax.random.key(5), n)
    out = speculative.speculative_generate(
        target,
        draft,
        jnp.repeat(prompt, n, axis=0),
        gamma=gamma,
        max_new_tokens=3,
        rng=keys,
        temperature=0.9,
    )
    toks = np.asarray(out.tokens)
    counts = np.bincount(toks[:, 0] * 8 + toks[:, 1], minlength=64)
    probs = _target_pair_probs(target, prompt, 0.9).ravel()
    assert _chi_square_p(counts, probs) > 0.001
    assert _chi_square_p(counts, _target_pair_probs(draft, prompt, 0.9).ravel()) < 1e-6
    # Some drafts were accepted and some rejected: both branches of the test were exercised.
    rate = np.asarray(out.accepted).sum() / np.asarray(out.drafted).sum()
    assert 0.05 < rate < 0.95


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2_moe"])
def test_greedy_speculative_equals_greedy_target(family):
    target, draft = _model(family, seed=2, vocab=61), _model(family, seed=3, vocab=61, layers=1)
    rs = np.random.RandomState(4)
    prompt = jnp.asarray(rs.randint(0, 61, (3, 6)), jnp.int32)
    mask = jnp.asarray(np.arange(6)[None] >= np.array([[0], [2], [4]]))  # left padding
    ref = dj.models.generate(target, prompt, prompt_mask=mask, max_new_tokens=12)
    for gamma in (1, 4):
        out = speculative.speculative_generate(
            target, draft, prompt, prompt_mask=mask, gamma=gamma, max_new_tokens=12, temperature=0.0
        )
        np.testing.assert_array_equal(out.tokens, ref.tokens)
        assert np.all(np.asarray(out.target_calls) <= 12)
    same = speculative.speculative_generate(
        target, target, prompt, prompt_mask=mask, gamma=3, max_new_tokens=12, temperature=0.0
    )
    np.testing.assert_array_equal(same.tokens, ref.tokens)
    # A draft equal to the target is always accepted: 1 + 4 tokens per round, 3 rounds + prefill.
    np.testing.assert_array_equal(same.accepted, same.drafted)


def test_eos_ends_a_speculative_row():
    target, draft = _model(seed=2, vocab=61), _model(seed=3, vocab=61, layers=1)
    prompt = jnp.asarray(np.random.RandomState(5).randint(0, 61, (2, 5)), jnp.int32)
    free = dj.models.generate(target, prompt, max_new_tokens=10)
    eos = int(free.tokens[0, 3])
    ref = dj.models.generate(target, prompt, max_new_tokens=10, eos_id=eos)
    out = speculative.speculative_generate(
        target, draft, prompt, gamma=3, max_new_tokens=10, temperature=0.0, eos_id=eos
    )
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.lengths, ref.lengths)


def test_block_efficiency_and_speedup_closed_forms():
    assert float(speculative.block_efficiency(0.0, 4)) == pytest.approx(1.0)
    assert float(speculative.block_efficiency(1.0, 4)) == pytest.approx(5.0)
    assert float(speculative.block_efficiency(0.8, 4)) == pytest.approx(3.3616)
    assert float(speculative.speedup(0.8, 4, 0.05)) == pytest.approx(2.8013, abs=1e-4)
    same = jnp.asarray(R_P)
    assert float(speculative.acceptance_rate(same, same)) == pytest.approx(1.0)
    assert float(speculative.acceptance_rate(jnp.eye(3)[0], jnp.eye(3)[1])) == 0.0
    # 1 - acceptance is the tvd divergence of the loss library.
    tvd = dj.losses.divergence("tvd", jnp.log(jnp.asarray(R_Q)), jnp.log(jnp.asarray(R_P)))
    assert float(tvd) == pytest.approx(1 - 0.8, abs=1e-6)


def test_acceptance_of_the_target_itself_is_one():
    target = _model(seed=2, vocab=61)
    batch = dict(
        prompt_ids=np.random.RandomState(6).randint(0, 61, (2, 5)).astype(np.int32),
        prompt_mask=np.ones((2, 5), bool),
        example_ids=np.arange(2, dtype=np.int32),
    )
    out = speculative.acceptance(target, target, [batch], max_new_tokens=6)
    assert out["alpha"] == pytest.approx(1.0, abs=1e-5)
    assert out["greedy_match"] == 1.0 and out["positions"] == 12
    other = speculative.acceptance(target, _model(seed=9, vocab=61), [batch], max_new_tokens=6)
    assert 0.0 < other["alpha"] < 0.95


def test_bad_pairs_fail_before_compiling():
    target = _model(seed=0)
    prompt = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="gamma >= 1"):
        speculative.speculative_generate(target, target, prompt, gamma=0, max_new_tokens=2)
    with pytest.raises(ValueError, match="vocabulary .* differs"):
        speculative.speculative_generate(target, _model(vocab=9), prompt, gamma=2, max_new_tokens=2)
    with pytest.raises(ValueError, match="exceed the target's max_position_embeddings=64"):
        speculative.speculative_generate(
            target, _model(seed=1, max_pos=128), prompt, gamma=2, max_new_tokens=60
        )
