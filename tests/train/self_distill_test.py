"""Self-distillation with privileged contexts: zero loss when the teacher sees what the student
sees, completions aligned across contexts of different lengths, UniSD agreement weights, and a
trainer run on GSM problems with two privileged contexts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import distill_jax as dj
from distill_jax import teachers
from distill_jax.data import prompts as prompts_lib
from distill_jax.models import sampling
from distill_jax.train import objective, rollout
from distill_jax.train import state as state_lib
from distill_jax.train import step as step_lib

ARCH = dict(
    vocab_size=264,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=256,
)


def _student():
    return dj.models.Transformer(dj.models.make_config("llama", **ARCH), rngs=nnx.Rngs(0))


def _prompt_batch(tok, pairs, p=48, n=12):
    rows = []
    for prompt, completion in pairs:
        ids, comp = prompts_lib.encode_example(
            tok, prompt, completion, prompt_len=p, completion_len=n, long_completions="truncate"
        )
        rows.append(prompts_lib.pad_example(ids, comp, p, n, 0))
    return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def _one_step(student, batch, spec_terms):
    graphdef, params = teachers.split_model(student)
    spec = objective.LossSpec.from_config(spec_terms, {})
    tx = optax.sgd(0.1)
    state = state_lib.create(
        {"student": params, "loss": {}}, tx, objective.init_state(spec), seed=0
    )
    step = jax.jit(
        step_lib.make_distill_step(
            student_graphdef=graphdef, teacher=teachers.SelfTeacher(student), spec=spec, tx=tx
        )
    )
    return step(state, None, batch)


def test_same_context_and_weights_give_zero_loss_and_gradient():
    tok = dj.data.load_tokenizer("byte")
    pb = _prompt_batch(tok, [("Question: 2 + 2?", " It is 4."), ("Q: why?", " Because.")])
    batch = sampling.sequence_batch(
        pb["prompt_ids"], pb["prompt_mask"], pb["completion_ids"], pb["completion_mask"]
    )
    same = rollout.with_privileged(batch, pb["prompt_ids"][:, None], pb["prompt_mask"][:, None])
    _, metrics = _one_step(_student(), same, {"forward_kl": {}})
    assert float(metrics["loss"]) == pytest.approx(0.0, abs=1e-6)
    assert float(metrics["grad_norm"]) == pytest.approx(0.0, abs=1e-6)
    # A privileged prompt that says more gives a teacher that differs: loss and gradient > 0.
    priv = _prompt_batch(
        tok, [("Solution: 4. Question: 2 + 2?", ""), ("Known: it rains. Q: why?", "")]
    )
    other = rollout.with_privileged(
        batch, priv["prompt_ids"][:, None], priv["prompt_mask"][:, None]
    )
    _, metrics = _one_step(_student(), other, {"forward_kl": {}})
    assert float(metrics["loss"]) > 1e-4 and float(metrics["grad_norm"]) > 1e-4


def test_completions_are_aligned_across_contexts_of_different_lengths():
    """The teacher's hidden states at the completion columns equal an unpadded forward of
    privileged prompt + completion: left padding to one P aligns the two contexts."""
    tok = dj.data.load_tokenizer("byte")
    student = _student()
    pb = _prompt_batch(tok, [("Q: 3 * 3?", " 9, since 3 + 3 + 3.")])
    batch = sampling.sequence_batch(
        pb["prompt_ids"], pb["prompt_mask"], pb["completion_ids"], pb["completion_mask"]
    )
    x2 = "Reference: 3 * 3 = 9. Q: 3 * 3?"
    priv = _prompt_batch(tok, [(x2, "")])
    full = rollout.with_privileged(batch, priv["prompt_ids"][:, None], priv["prompt_mask"][:, None])
    t = teachers.SelfTeacher(student)
    graphdef, params = teachers.split_model(student)
    state = state_lib.TrainState(
        step=0, params={"student": params}, opt_state=None, loss_state={}, rng=None, ema=None
    )
    hidden = t.loss_inputs(None, full, state)["teacher_hidden"]  # [1, P + N, D]
    ids = tok.encode(x2, add_bos=True)
    comp = [int(x) for x, m in zip(pb["completion_ids"][0], pb["completion_mask"][0]) if m]
    ref = student.forward(jnp.asarray([ids + comp]), compute_logits=False).hidden[0]
    p, n = 48, len(comp)
    # Column P - 1 + i predicts completion token i in both layouts.
    np.testing.assert_allclose(
        hidden[0, p - 1 : p - 1 + n], ref[len(ids) - 1 : len(ids) - 1 + n], atol=2e-5
    )


def test_agreement_weights():
    rs = np.random.RandomState(0)
    lp = jnp.asarray(rs.randn(1, 2, 6))
    mask = jnp.asarray(np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool))
    same = jnp.concatenate([lp, lp, lp])
    w = teachers.agreement_weights(same, mask, gamma=0.5)
    np.testing.assert_array_equal(w, mask.astype(np.float32))  # identical contexts: 1
    spread = jnp.stack([lp[0], lp[0] + jnp.linspace(0, 3, 6)[None] * jnp.asarray([[1.0], [0.5]])])
    w = np.asarray(teachers.agreement_weights(spread, mask, gamma=1.0))
    assert np.all(w[mask] >= 0.01) and np.all(w[mask] <= 1.0) and np.all(w[~mask] == 0)
    d = np.var(np.asarray(spread), axis=0)
    valid = np.asarray(mask)
    order = np.argsort(d[valid])
    assert np.all(np.diff(w[valid][order]) <= 1e-7)  # more disagreement, less weight
    # A token at the 0.95 quantile gets 1 / (1 + gamma); huge gamma floors at 0.01.
    q = np.quantile(d[valid], 0.95)
    np.testing.assert_allclose(
        w[valid], np.maximum(1 / (1 + np.minimum(d[valid] / q, 10)), 0.01), rtol=1e-5
    )
    floor = teachers.agreement_weights(spread, mask, gamma=1e6)
    assert float(jnp.min(jnp.where(mask, floor, 1.0))) == pytest.approx(0.01)
    seq = np.asarray(teachers.agreement_weights(spread, mask, gamma=2.0, level="sequence"))
    s = (np.asarray(spread) * valid).sum(-1) / valid.sum(-1)
    np.testing.assert_allclose(seq[:, 0], np.exp(-2.0 * np.var(s, axis=0)), rtol=1e-5)


def test_trainer_self_distills_with_two_privileged_contexts(tmp_path):
    """GSM problems, the student's own samples, an EMA self-teacher reading the question with
    its reference solution (and a demonstration), UniSD agreement weights."""
    import importlib.util
    import json
    import os

    from distill_jax import experiment

    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    spec = importlib.util.spec_from_file_location(
        "tiny", os.path.join(root, "configs", "tiny_kd.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("steps=2,onpolicy=1.0")
    c.student.config.max_position_embeddings = 2100
    c.teacher = dict(kind="self", source="ema", decay=0.5, agreement_gamma=1.0)
    c.data.source, c.data.num_problems, c.data.privileged_contexts = "gsm", 40, 2
    c.data.held_out_fraction = 0.1
    c.onpolicy.prompt_len = 2000
    c.eval.num_batches = 1
    experiment.train(c, str(tmp_path))
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[0] > 0
