"""Bridge loss terms (ULD, MinED, DSKD, ALM) as config terms: each against a NumPy reference or
the library function it wraps, their normaliser groups, exact micro-batching when they are mixed
with CE, and 3 trainer steps of each from the tiny cross-tokenizer config."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from trainer_runs import ALM_CONFIG, checkpoint_params, tiny

import distill_jax as dj
from distill_jax import experiment, teachers
from distill_jax.bridges import dskd
from distill_jax.train import objective
from distill_jax.train import state as state_lib
from distill_jax.train import step as step_lib

B, T, U, C, V, W, D = 4, 16, 12, 5, 48, 40, 16


def _chunks(rng, length, used):
    """[length] chunk ids: C chunks of >= 1 token over the first ``used`` positions, -1 after."""
    cuts = np.sort(rng.choice(np.arange(1, used), C - 1, replace=False))
    ids = np.full(length, -1, np.int32)
    ids[:used] = np.searchsorted(cuts, np.arange(used), side="right")
    return ids


def _bridge_batch(seed=0, b=B):
    rng = np.random.default_rng(seed)
    s_chunk = np.stack([_chunks(rng, T, int(rng.integers(10, T + 1))) for _ in range(b)])
    t_chunk = np.stack([_chunks(rng, U, int(rng.integers(8, U + 1))) for _ in range(b)])
    s_seg, t_seg = (s_chunk >= 0).astype(np.int32), (t_chunk >= 0).astype(np.int32)
    pos = lambda seg: np.where(seg > 0, np.cumsum(seg, 1) - 1, 0).astype(np.int32)  # noqa: E731
    ids = rng.integers(0, V, (b, T)).astype(np.int32)
    t_ids = rng.integers(0, W, (b, U)).astype(np.int32)
    mask = (s_seg > 0) & np.concatenate([s_seg[:, 1:] > 0, np.zeros((b, 1), bool)], 1)
    return dict(
        input_ids=ids,
        targets=np.concatenate([ids[:, 1:], np.zeros((b, 1), np.int32)], 1),
        segment_ids=s_seg,
        positions=pos(s_seg),
        loss_mask=mask,
        teacher_ids=t_ids,
        teacher_positions=pos(t_seg),
        teacher_segment_ids=t_seg,
        teacher_chunk=t_chunk,
        student_chunk=s_chunk,
    )


def _model(vocab, layers, seed):
    arch = dict(hidden_size=D, intermediate_size=32, num_heads=2, num_kv_heads=1, head_dim=8)
    cfg = dj.models.make_config("llama", vocab_size=vocab, num_layers=layers, **arch)
    return dj.models.Transformer(cfg, rngs=nnx.Rngs(seed))


MINED_MAP = np.random.default_rng(7).integers(0, W, V).astype(np.int32)


def _teacher():
    rng = np.random.default_rng(3)
    return teachers.CrossTokenizerTeacher(
        _model(W, 2, 1),
        teacher_boundary_mask=rng.random(W) < 0.4,
        student_boundary_mask=rng.random(V) < 0.4,
        chunk_size=8,
        mined_map=MINED_MAP,
        embeddings=True,
    )


def _inputs(student, teacher, batch):
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    out = student.forward(
        batch["input_ids"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        compute_logits=False,
    )
    return objective.LossInputs(
        student_hidden=out.hidden,
        student_head=student.head_weights(),
        targets=batch["targets"],
        mask=batch["loss_mask"],
        student_embeddings=(
            student.embed_tokens(batch["input_ids"]),
            student.embed_tokens(batch["targets"]),
        ),
        **teacher.loss_inputs(teacher.params(), batch),
    )


@pytest.fixture(scope="module")
def setup():
    student, teacher = _model(V, 1, 2), _teacher()
    batch = _bridge_batch()
    inputs = _inputs(student, teacher, batch)
    z_s = np.asarray(inputs.student_hidden @ inputs.student_head, np.float64)
    z_t = np.asarray(inputs.teacher_token_hidden @ inputs.teacher_token_head, np.float64)
    return batch, inputs, z_s, z_t


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _teacher_mask(batch):
    seg = batch["teacher_segment_ids"]
    return (seg > 0) & np.concatenate([seg[:, 1:] > 0, np.zeros((len(seg), 1), bool)], 1)


def _groups(losses, inputs, params=None):
    spec = objective.LossSpec.from_config(losses)
    return spec, objective.loss_groups(spec, inputs, params or {}, {}, 0)


def test_uld_term_is_the_sorted_l1_of_index_paired_positions(setup):
    batch, inputs, z_s, z_t = setup
    t_mask = _teacher_mask(batch)
    want_sum, want_n = 0.0, 0
    for r in range(B):
        s_pos = np.flatnonzero(batch["loss_mask"][r])
        t_pos = np.flatnonzero(t_mask[r])
        for i, j in zip(s_pos, t_pos):  # the k-th valid position of each side
            q = np.sort(_softmax(z_s[r, i] / 2.0))
            p = np.sort(_softmax(z_t[r, j]))
            p = np.concatenate([np.zeros(V - W), p])  # the smaller vocabulary padded with zeros
            want_sum += np.abs(q - p).sum()
            want_n += 1
    spec, (sums, counts, metrics) = _groups(
        dict(uld=dict(weight=1.5, student_temperature=2.0)), inputs
    )
    assert spec.groups() == ("uld",)
    np.testing.assert_allclose(float(counts["uld"]), want_n)
    np.testing.assert_allclose(float(sums["uld"]), 1.5 * want_sum, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss/uld"][0]), want_sum, rtol=1e-5)


def test_mined_term_is_the_mapped_kl_at_chunk_end_pairs(setup):
    batch, inputs, z_s, z_t = setup
    t_mask = _teacher_mask(batch)
    want_sum, want_n = 0.0, 0
    for r in range(B):
        s_ch, t_ch = batch["student_chunk"][r], batch["teacher_chunk"][r]
        for c in range(C - 1):
            present = [np.any(x == k) for x in (s_ch, t_ch) for k in (c, c + 1)]
            if not all(present):
                continue
            i, j = np.flatnonzero(s_ch == c).max(), np.flatnonzero(t_ch == c).max()
            if not (batch["loss_mask"][r, i] and t_mask[r, j]):
                continue
            p = _softmax(z_t[r, j][MINED_MAP] / 0.5)  # teacher logits re-indexed: z_t[map[v]]
            q = _softmax(z_s[r, i] / 0.5)
            want_sum += np.sum(p * (np.log(p) - np.log(q)))
            want_n += 1
    assert want_n > 0
    _, (sums, counts, _) = _groups(dict(mined=dict(temperature=0.5)), inputs)
    np.testing.assert_allclose(float(counts["mined"]), want_n)
    np.testing.assert_allclose(float(sums["mined"]), want_sum, rtol=1e-4)


def test_dskd_term_gives_its_three_parts_as_groups(setup):
    batch, inputs, _, _ = setup
    params = dskd.init_dskd(jax.random.key(0), D, D, cross_tokenizer=True)
    spec, (sums, counts, metrics) = _groups(
        dict(dskd=dict(weight=0.5, temperature=2.0), ce=dict(weight=1.0)),
        inputs,
        {"dskd": params},
    )
    assert spec.groups() == ("tokens", "dskd/t2s_ce", "dskd/t2s_kd", "dskd/s2t_kd")
    sg = jax.lax.stop_gradient
    terms = dskd.cma_terms(
        params,
        inputs.student_hidden,
        inputs.teacher_token_hidden,
        tuple(sg(e) for e in inputs.student_embeddings),
        inputs.teacher_token_embeddings,
        inputs.student_head,
        inputs.teacher_token_head,
        inputs.student_hidden @ inputs.student_head,
        inputs.teacher_token_hidden @ inputs.teacher_token_head,
        inputs.targets,
        inputs.mask,
        jnp.asarray(_teacher_mask(batch)),
        temperature=2.0,
    )
    _, want = dskd.dskd_objective(terms)
    for part in ("t2s_ce", "t2s_kd", "s2t_kd"):
        np.testing.assert_allclose(float(sums[f"dskd/{part}"]), 0.5 * float(want[part][0]), 1e-5)
        np.testing.assert_allclose(float(counts[f"dskd/{part}"]), float(want[part][1]))
    np.testing.assert_allclose(metrics["dskd/t2s_accuracy"], want["t2s_accuracy"], rtol=1e-6)
    np.testing.assert_allclose(float(counts["tokens"]), batch["loss_mask"].sum())


def test_mixed_groups_are_exact_under_micro_batching_and_equal_the_sum_of_means():
    """ALM (per chunk) + ULD (per pair) + CE (per token): the step's gradient is that of
    sum_g S_g / N_g over the whole batch, for 1 and 4 micro-batches."""
    student, teacher = _model(V, 1, 2), _teacher()
    batch = _bridge_batch(seed=1, b=8)
    losses = dict(alm=dict(temperature=10.0), uld=dict(weight=0.7), ce=dict(weight=0.3))
    spec = objective.LossSpec.from_config(losses, dict(head_chunk_tokens=8))
    assert spec.groups() == ("tokens", "alm", "uld")
    tx = optax.sgd(1.0)
    graphdef, params = teachers.split_model(student)
    state = state_lib.create({"student": params, "loss": {}}, tx, {}, seed=0)

    def mean_loss(p):
        inputs = _inputs(nnx.merge(graphdef, nnx.State(p)), teacher, batch)
        sums, counts, _ = objective.loss_groups(spec, inputs, {}, {}, 0)
        return sum(sums[g] / counts[g] for g in sums)

    want_loss, want_grad = jax.value_and_grad(mean_loss)(params)
    want_params = jax.tree.map(lambda p, g: p - g, params, want_grad)
    for a in (1, 4):
        fn = step_lib.make_distill_step(
            student_graphdef=graphdef, teacher=teacher, spec=spec, tx=tx, micro_batches=a
        )
        new, metrics = jax.jit(fn)(state, teacher.params(), batch)
        np.testing.assert_allclose(float(metrics["loss"]), float(want_loss), rtol=1e-5)
        for x, y in zip(jax.tree.leaves(new.params["student"]), jax.tree.leaves(want_params)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_a_same_tokenization_term_with_a_bridge_fails_before_loading(tmp_path):
    c = tiny(ALM_CONFIG, steps=2)
    c.losses = dict(alm=dict(), forward_kl=dict())
    with pytest.raises(ValueError, match="'forward_kl'.*bridge term \\(alm, uld, mined or dskd"):
        experiment.train(c, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "losses",
    [
        dict(uld=dict(weight=1.5), ce=dict(weight=1.0)),
        dict(mined=dict(temperature=2.0), ce=dict(weight=0.0)),
        dict(dskd=dict(), ce=dict(weight=0.5)),
        dict(alm=dict(temperature=100.0), uld=dict(), ce=dict(weight=1.0)),
    ],
    ids=["uld+ce", "mined", "dskd+ce", "alm+uld+ce"],
)
def test_bridge_terms_train_from_the_config(tmp_path, losses):
    c = tiny(ALM_CONFIG, steps=3)
    c.losses = losses
    c.eval.at_start = False
    c.train.checkpoint_every_steps = 1
    experiment.train(c, str(tmp_path))
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(np.isfinite(r["train/loss"]) for r in train)
    for label in losses:
        keys = [k for k in train[0] if k.startswith(f"train/loss/{label}")]
        assert keys and all(np.isfinite(train[0][k]) for k in keys), (label, sorted(train[0]))
    first, last = checkpoint_params(tmp_path, 1), checkpoint_params(tmp_path, 3)
    assert any(not np.array_equal(a, b) for a, b in zip(first, last))
