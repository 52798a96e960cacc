"""Rollouts: cached sampling against repeated full forwards with the same per-example keys, the
sequence-batch layout against a NumPy construction, prompt batches, the GKD coin and replay."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import distill_jax as dj
from distill_jax import teachers
from distill_jax.data import prompts as prompts_lib
from distill_jax.models import sampling
from distill_jax.train import rollout

TINY = dict(
    vocab_size=50,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=32,
)


def _model(seed=0):
    model = dj.models.Transformer(dj.models.make_config("qwen2", **TINY), rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    nnx.update(
        model,
        jax.tree.unflatten(
            treedef, [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
        ),
    )
    return model


def _prompts(b=3, p=5):
    rs = np.random.RandomState(0)
    ids = rs.randint(1, 50, (b, p)).astype(np.int32)
    mask = np.arange(p)[None] >= np.array([[0], [2], [3]])[:b]
    return jnp.asarray(np.where(mask, ids, 0)), jnp.asarray(mask)


def _full_forward_samples(model, ids, mask, keys, n, settings):
    """Sampling by a full forward over the whole sequence for every new token."""
    seq, real = ids, mask
    out, done = [], jnp.zeros(ids.shape[0], bool)
    for i in range(n):
        pos = jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0)
        logits = model(seq, positions=pos, segment_ids=real.astype(jnp.int32))[:, -1]
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, i)
        tok = sampling.sample_logits(
            logits,
            step_keys,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
        )
        if settings.eos_id is not None:
            tok = jnp.where(done, settings.eos_id, tok)
            done = done | (tok == settings.eos_id)
        out.append(tok)
        seq = jnp.concatenate([seq, tok[:, None]], axis=1)
        real = jnp.concatenate([real, jnp.ones_like(real[:, :1])], axis=1)
    return jnp.stack(out, axis=1)


@pytest.mark.parametrize(
    "settings",
    [
        sampling.RolloutSettings(6, temperature=1.0),
        sampling.RolloutSettings(6, temperature=0.8, top_k=7),
        sampling.RolloutSettings(6, temperature=1.2, top_p=0.7),
    ],
)
def test_cached_rollout_equals_full_forward_sampling(settings):
    model = _model()
    graphdef, params = teachers.split_model(model)
    ids, mask = _prompts()
    keys = sampling.example_keys(jax.random.key(3), jnp.arange(3), 11)
    tokens, tmask = jax.jit(sampling.sample, static_argnums=(0, 5))(
        graphdef, params, ids, mask, keys, settings
    )
    np.testing.assert_array_equal(
        tokens, _full_forward_samples(model, ids, mask, keys, 6, settings)
    )
    assert bool(jnp.all(tmask))


def test_a_rows_sample_does_not_depend_on_its_batch():
    model = _model()
    graphdef, params = teachers.split_model(model)
    ids, mask = _prompts()
    s = sampling.RolloutSettings(5, temperature=1.0)
    keys = sampling.example_keys(jax.random.key(0), jnp.asarray([7, 8, 9]), 2)
    all_rows, _ = sampling.sample(graphdef, params, ids, mask, keys, s)
    last_only, _ = sampling.sample(graphdef, params, ids[2:], mask[2:], keys[2:], s)
    np.testing.assert_array_equal(all_rows[2:], last_only)
    other_step = sampling.example_keys(jax.random.key(0), jnp.asarray([7, 8, 9]), 3)
    assert not np.array_equal(
        sampling.sample(graphdef, params, ids, mask, other_step, s)[0], all_rows
    )


def test_eos_masks_the_rest_of_a_rollout():
    model = _model()
    graphdef, params = teachers.split_model(model)
    ids, mask = _prompts()
    keys = sampling.example_keys(jax.random.key(1), jnp.arange(3), 0)
    free, _ = sampling.sample(graphdef, params, ids, mask, keys, sampling.RolloutSettings(8, 0.0))
    eos = int(free[0, 2])
    tokens, tmask = sampling.sample(
        graphdef, params, ids, mask, keys, sampling.RolloutSettings(8, 0.0, eos_id=eos)
    )
    first = int(np.argmax(np.asarray(tokens[0]) == eos))
    np.testing.assert_array_equal(tmask[0], np.arange(8) <= first)
    np.testing.assert_array_equal(
        _full_forward_samples(
            model, ids, mask, keys, 8, sampling.RolloutSettings(8, 0.0, eos_id=eos)
        ),
        tokens,
    )


def test_sequence_batch_layout():
    prompt = np.array([[0, 0, 5, 6], [1, 2, 3, 4]], np.int32)
    pmask = prompt > 0
    comp = np.array([[7, 8, 9], [10, 11, 11]], np.int32)
    cmask = np.array([[True, True, True], [True, True, False]])
    b = {k: np.asarray(v) for k, v in sampling.sequence_batch(prompt, pmask, comp, cmask).items()}
    np.testing.assert_array_equal(b["input_ids"], [[0, 0, 5, 6, 7, 8, 9], [1, 2, 3, 4, 10, 11, 11]])
    np.testing.assert_array_equal(b["targets"][:, :-1], b["input_ids"][:, 1:])
    np.testing.assert_array_equal(b["positions"][0, 2:], np.arange(5))
    np.testing.assert_array_equal(b["positions"][1, :6], np.arange(6))
    np.testing.assert_array_equal(b["segment_ids"], [[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]])
    # The loss predicts exactly the valid completion tokens.
    for r in range(2):
        predicted = b["targets"][r][b["loss_mask"][r]]
        np.testing.assert_array_equal(predicted, comp[r][cmask[r]])


def test_prompt_batches_are_static_resumable_and_refuse_long_prompts():
    tok = dj.data.load_tokenizer("byte")
    examples = [(f"question {i}?", f"answer {i}") for i in range(10)]
    make = lambda **kw: prompts_lib.PromptBatches(
        examples, tok, prompt_len=16, completion_len=12, global_batch_size=4, seed=3, **kw
    )
    a = make()
    first = [next(a) for _ in range(2)]
    state = a.get_state()
    nxt = next(a)
    b = make()
    b.set_state(state)
    resumed = next(b)
    for k in prompts_lib.FIELDS:
        np.testing.assert_array_equal(resumed[k], nxt[k])
    batch = first[0]
    assert batch["prompt_ids"].shape == (4, 16) and batch["completion_ids"].shape == (4, 12)
    i = int(batch["example_ids"][0])
    text = tok.decode(batch["prompt_ids"][0][batch["prompt_mask"][0]])
    assert text.endswith(examples[i][0])
    assert batch["prompt_mask"][:, -1].all()  # left padding: every prompt ends at column P - 1
    assert tok.decode(batch["completion_ids"][0][batch["completion_mask"][0]]).startswith(
        examples[i][1]
    )
    # Two processes get the two halves of the same global batch.
    halves = [
        next(
            prompts_lib.PromptBatches(
                examples,
                tok,
                prompt_len=16,
                completion_len=12,
                global_batch_size=4,
                seed=3,
                process_index=p,
                process_count=2,
            )
        )["example_ids"]
        for p in range(2)
    ]
    np.testing.assert_array_equal(np.concatenate(halves), first[0]["example_ids"])
    with pytest.raises(
        ValueError, match=r"data\[0\]: the prompt has 1[0-9] tokens, more than prompt_len=10"
    ):
        prompts_lib.PromptBatches(
            examples, tok, prompt_len=10, completion_len=12, global_batch_size=4
        )
    with pytest.raises(ValueError, match="long_completions='truncate'"):
        prompts_lib.PromptBatches(
            examples, tok, prompt_len=16, completion_len=4, global_batch_size=4
        )
    cut = prompts_lib.PromptBatches(
        examples,
        tok,
        prompt_len=16,
        completion_len=4,
        global_batch_size=4,
        long_completions="truncate",
    )
    assert next(cut)["completion_mask"].all()


def test_rollout_settings_that_cannot_fit_are_refused():
    config = dj.models.make_config("qwen2", **TINY)
    with pytest.raises(
        ValueError, match="cache of 40 positions, more than the model's max_position_embeddings=32"
    ):
        sampling.check_settings(sampling.RolloutSettings(20), config, prompt_len=20)
    with pytest.raises(ValueError, match="at least one token"):
        sampling.check_settings(sampling.RolloutSettings(0), config, prompt_len=4)


def test_gkd_coin_has_frequency_lambda_and_is_fixed_by_seed_and_step():
    draws = [rollout.use_student_samples(0, s, 0.3) for s in range(4000)]
    assert np.mean(draws) == pytest.approx(0.3, abs=0.03)
    assert draws == [rollout.use_student_samples(0, s, 0.3) for s in range(4000)]
    assert not any(rollout.use_student_samples(0, s, 0.0) for s in range(100))
    assert all(rollout.use_student_samples(0, s, 1.0) for s in range(100))
    with pytest.raises(ValueError, match="lmbda=1.5 must be in"):
        rollout.use_student_samples(0, 0, 1.5)


def test_replay_buffer_is_a_ring_and_the_threshold_rises_on_loss_increases():
    example = {"input_ids": jnp.zeros((2, 3), jnp.int32)}
    buf = rollout.replay_init(example, capacity=2)
    for v in (1, 2, 3):
        buf = rollout.replay_add(buf, {"input_ids": jnp.full((2, 3), v, jnp.int32)})
    assert int(buf.filled) == 2
    assert sorted(int(rollout.replay_get(buf, s)["input_ids"][0, 0]) for s in range(2)) == [2, 3]
    # DistiLLM: +0.1 whenever the validation loss rose by more than eps (here 0.01), capped at 1.
    losses = [2.0, 1.9, 1.95, 1.955, 1.8, 2.5, 2.6, 2.7]
    t, prev, trace = 0.2, None, []
    for loss in losses:
        t = rollout.replay_threshold(t, prev, loss, eps=0.01)
        prev = loss
        trace.append(round(t, 6))
    assert trace == [0.2, 0.2, 0.3, 0.3, 0.3, 0.4, 0.5, 0.6]


def test_long_prompts_can_be_dropped_and_are_counted():
    tok = dj.data.load_tokenizer("byte")
    examples = [("short?", "yes"), ("a much longer question than fits?", "no"), ("ok?", "fine")]
    batches = prompts_lib.PromptBatches(
        examples, tok, prompt_len=10, completion_len=8, global_batch_size=2, long_prompts="drop"
    )
    assert batches.dropped == 1 and batches.config["dropped"] == 1
    seen = {tok.decode(r["prompt_ids"][r["prompt_mask"]]) for r in batches.rows}
    assert {s.lstrip(tok.decode([tok.bos_id]) if tok.bos_id is not None else "") for s in seen} == {
        "short?",
        "ok?",
    }
