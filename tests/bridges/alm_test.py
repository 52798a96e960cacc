"""ALM against METHODS.md reference values, a NumPy float64 oracle, and its defining properties:
zero (with zero gradient) for the same model through the same tokenizer, positive and falling
under optimisation for a mismatched pair (a SentencePiece teacher, a byte-level student)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import distill_jax as dj
from distill_jax.bridges import alm
from distill_jax.data import load_tokenizer
from distill_jax.train import objective

ARCH = dict(hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, head_dim=8)
TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "And God said, Let there be light: and there was light.",
    "And God saw the light, that it was good.",
]


def _np_log1mexp(x):
    return np.log(-np.expm1(x))


def _np_binary(lt, ls, tau, kind):
    lt, ls = np.float64(lt) / tau, np.float64(ls) / tau
    u, v = np.exp(lt), np.exp(ls)
    if kind == "binary_ce":
        return -(u * np.log(v) + (1 - u) * np.log(1 - v))
    if kind == "binary_kl":
        return u * np.log(u / v) + (1 - u) * np.log((1 - u) / (1 - v))
    if kind == "reverse_binary_kl":
        return v * np.log(v / u) + (1 - v) * np.log((1 - v) / (1 - u))
    return abs(lt - ls)


def test_reference_values_from_methods():
    # METHODS.md 6.4: LP_T = -2, LP_S = -3, tau_b = 100.
    lt, ls = jnp.float32(-2.0), jnp.float32(-3.0)
    ce = alm.binary_distance(lt, ls, temperature=100.0, kind="binary_ce")
    kl = alm.binary_distance(lt, ls, temperature=100.0, kind="binary_kl")
    np.testing.assert_allclose(ce, 0.0991367, rtol=1e-5)
    np.testing.assert_allclose(kl, 0.0018718, rtol=1e-4)
    np.testing.assert_allclose(ce - kl, 0.0972649, rtol=1e-5)  # the teacher's binary entropy


@pytest.mark.parametrize("kind", ["binary_ce", "binary_kl", "reverse_binary_kl", "abs"])
@pytest.mark.parametrize("tau", [1.0, 100.0])
def test_distances_match_numpy_and_are_stationary_at_equality(kind, tau):
    rng = np.random.default_rng(0)
    lt, ls = -rng.uniform(0.01, 30, 50), -rng.uniform(0.01, 30, 50)
    got = jax.jit(lambda a, b: alm.binary_distance(a, b, temperature=tau, kind=kind))(lt, ls)
    want = [_np_binary(a, b, tau, kind) for a, b in zip(lt, ls)]
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
    if kind != "abs":
        grad = jax.vmap(
            jax.grad(lambda s, t: alm.binary_distance(t, s, temperature=tau, kind=kind))
        )
        np.testing.assert_allclose(grad(jnp.asarray(lt), jnp.asarray(lt)), 0.0, atol=1e-6)
        # Finite differences away from equality.
        f = lambda s: float(alm.binary_distance(jnp.float32(-5.0), s, temperature=tau, kind=kind))  # noqa: E731
        eps = 1e-2
        fd = (f(jnp.float32(-3.0 + eps)) - f(jnp.float32(-3.0 - eps))) / (2 * eps)
        g = jax.grad(lambda s: alm.binary_distance(-5.0, s, temperature=tau, kind=kind))(-3.0)
        np.testing.assert_allclose(g, fd, rtol=2e-2, atol=1e-6)


def test_extreme_chunk_likelihoods_stay_finite():
    lp = jnp.array([[0.0, -1e-9, -1e4, -3.0]])
    chunk = jnp.array([[0, 1, 2, 3]])
    lps = alm.chunk_logprobs(lp, jnp.concatenate([jnp.array([[-1]]), chunk[:, :-1]], 1), 4)
    assert jnp.max(lps) <= np.float32(alm.MAX_CHUNK_LOGPROB)
    for kind in ("binary_ce", "binary_kl", "reverse_binary_kl"):
        value, grad = jax.value_and_grad(
            lambda s, kind=kind: jnp.sum(
                alm.binary_distance(lps[::-1], s, temperature=1.0, kind=kind)
            )
        )(lps)
        assert np.isfinite(value) and np.all(np.isfinite(grad))


def _np_chunk_logprobs(lp, chunk, c, lpb=None):
    b, length = lp.shape
    out = np.zeros((b, c))
    for i in range(b):
        for s in range(length - 1):
            if chunk[i, s + 1] >= 0:
                out[i, chunk[i, s + 1]] += lp[i, s]
        if lpb is not None:
            for k in range(c):
                where = np.flatnonzero(chunk[i] == k)
                if len(where):
                    out[i, k] += lpb[i, where[-1]]
    return np.minimum(out, -1e-6)


def test_chunk_logprobs_match_numpy():
    rng = np.random.default_rng(1)
    b, length, c = 3, 20, 9
    chunk = np.sort(rng.integers(0, c - 1, (b, length)), axis=1)
    chunk[rng.random((b, length)) < 0.15] = -1  # masked specials and padding
    lp, lpb = -rng.uniform(0, 5, (b, length)), -rng.uniform(0, 3, (b, length))
    f = jax.jit(alm.chunk_logprobs, static_argnums=2)
    np.testing.assert_allclose(f(lp, chunk, c), _np_chunk_logprobs(lp, chunk, c), rtol=1e-5)
    np.testing.assert_allclose(
        f(lp, chunk, c, lpb), _np_chunk_logprobs(lp, chunk, c, lpb), rtol=1e-5
    )


def test_chunked_token_logprobs_equal_dense_and_numpy():
    rng = np.random.default_rng(2)
    b, t, d, v = 2, 13, 8, 37
    h, w = rng.normal(size=(b, t, d)), rng.normal(size=(d, v))
    y = rng.integers(0, v, (b, t))
    bmask = rng.random(v) < 0.3
    z = np.einsum("btd,dv->btv", h, w)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    want_lp = np.take_along_axis(logp, y[..., None], -1)[..., 0]
    want_lpb = np.log(np.exp(logp)[..., bmask].sum(-1))
    for chunk in (1, 4, 13, 64):
        lp, lpb = alm.token_and_boundary_logprobs(
            jnp.asarray(h, jnp.float32), jnp.asarray(w, jnp.float32), y, bmask, chunk_size=chunk
        )
        np.testing.assert_allclose(lp, want_lp, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(lpb, want_lpb, rtol=1e-4, atol=1e-5)

    def total(hh, fn):
        a, bb = fn(hh)
        return jnp.sum(a * 0.7 + bb * 0.3)

    fused = lambda hh: alm.token_and_boundary_logprobs(hh, jnp.asarray(w), y, bmask, chunk_size=4)  # noqa: E731
    dense = lambda hh: alm.logits_token_and_boundary_logprobs(hh @ jnp.asarray(w), y, bmask)  # noqa: E731
    hj = jnp.asarray(h, jnp.float32)
    np.testing.assert_allclose(
        jax.grad(total)(hj, fused), jax.grad(total)(hj, dense), rtol=1e-4, atol=1e-5
    )


def test_merge_by_boundary_prob():
    chunk = jnp.array([[-1, 0, 0, 1, 2, 2, 3, 4, -1]])
    prob = jnp.array([[0.5, 0.05, 0.2, 0.01, 0.9]])
    merged = alm.merge_chunks_by_boundary_prob(chunk, prob, threshold=0.1)
    # chunk 1 (p = 0.05) joins 2; chunk 3 (p = 0.01) joins 4.
    np.testing.assert_array_equal(merged, [[-1, 0, 0, 1, 1, 1, 2, 2, -1]])
    np.testing.assert_array_equal(
        alm.merge_chunks_by_boundary_prob(chunk, prob, threshold=0.0), chunk
    )


# ------------------------------------------------------------------ end to end, tiny models


def _model(vocab, seed, layers=1):
    config = dj.models.make_config("llama", vocab_size=vocab, num_layers=layers, **ARCH)
    return dj.models.Transformer(config, rngs=nnx.Rngs(seed))


def _side_lp(model, ids, segment, bmask):
    out = model.forward(jnp.asarray(ids), segment_ids=jnp.asarray(segment), compute_logits=False)
    targets = jnp.concatenate([jnp.asarray(ids)[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
    return alm.token_and_boundary_logprobs(
        out.hidden, model.head_weights(), targets, bmask, chunk_size=16
    )


def _alm(teacher, student, batch, t_bmask, s_bmask, c):
    t_lp, t_lpb = _side_lp(teacher, batch["teacher_ids"], batch["teacher_segment"], t_bmask)
    s_lp, s_lpb = _side_lp(student, batch["student_ids"], batch["student_segment"], s_bmask)
    total, count, metrics = dj.bridges.alm_loss(
        t_lp,
        s_lp,
        jnp.asarray(batch["teacher_chunk"]),
        jnp.asarray(batch["student_chunk"]),
        c,
        teacher_lp_boundary=t_lpb,
        student_lp_boundary=s_lpb,
    )
    return total / count, metrics


def test_same_model_same_tokenizer_gives_zero_loss_and_gradient():
    byte = load_tokenizer("byte")
    collate = dj.bridges.ChunkCollator(byte, byte, teacher_len=96, student_len=96)
    batch = collate(TEXTS)
    c = int(batch["num_chunks"].max())
    bmask = jnp.asarray(dj.bridges.boundary_vocab_mask(byte))
    model = _model(byte.vocab_size, 0)
    teacher = _model(byte.vocab_size, 0)  # the same weights, a separate object
    graphdef, params = nnx.split(model)

    def loss(p):
        return _alm(teacher, nnx.merge(graphdef, p), batch, bmask, bmask, c)[0]

    value, grads = jax.value_and_grad(loss)(params)
    # Zero up to float32 rounding: the two forwards are compiled separately (one under grad).
    assert abs(float(value)) < 1e-8
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) < 1e-6


def test_alm_term_merges_chunks_by_the_teachers_boundary_probability(kjv_sentencepiece):
    """objective's alm term with merge_threshold equals alm_loss on chunks merged in NumPy: a
    chunk joins the next while the teacher's p(word boundary | text through it) <= threshold."""
    teacher_tok, student_tok = kjv_sentencepiece, load_tokenizer("byte")
    batch = dj.bridges.ChunkCollator(teacher_tok, student_tok, teacher_len=64, student_len=96)(
        TEXTS
    )
    t_bmask = jnp.asarray(dj.bridges.boundary_vocab_mask(teacher_tok))
    s_bmask = jnp.asarray(dj.bridges.boundary_vocab_mask(student_tok))
    teacher, student = _model(teacher_tok.vocab_size, 1), _model(student_tok.vocab_size, 2)
    t_lp, t_lpb = _side_lp(teacher, batch["teacher_ids"], batch["teacher_segment"], t_bmask)
    s_lp, s_lpb = _side_lp(student, batch["student_ids"], batch["student_segment"], s_bmask)
    ids = jnp.asarray(batch["student_ids"])
    inputs = objective.LossInputs(
        student_hidden=student.forward(ids, compute_logits=False).hidden,
        student_head=student.head_weights(),
        targets=jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1),
        mask=jnp.asarray(batch["student_segment"] > 0),
        teacher_token_logprobs=t_lp,
        teacher_boundary_logprobs=t_lpb,
        teacher_chunk=jnp.asarray(batch["teacher_chunk"]),
        student_chunk=jnp.asarray(batch["student_chunk"]),
        student_boundary_mask=s_bmask,
    )
    c = batch["student_chunk"].shape[1]
    t_chunk, s_chunk = batch["teacher_chunk"], batch["student_chunk"]
    lpb = np.asarray(t_lpb)
    middle = float(np.median(np.exp(lpb[t_chunk >= 0])))  # merges about half of the chunks
    for threshold in (0.0, middle, 1.1):
        # NumPy: the teacher's boundary log-prob at each chunk's last token, then relabel.
        t_new, s_new = t_chunk.copy(), s_chunk.copy()
        for r in range(len(TEXTS)):
            ids_r = t_chunk[r]
            n = ids_r.max() + 1
            last = [np.flatnonzero(ids_r == k).max() for k in range(n)]
            closes = np.exp(lpb[r, last]) > threshold
            new = np.cumsum(np.r_[True, closes[:-1]]) - 1
            t_new[r] = np.where(ids_r < 0, -1, new[np.maximum(ids_r, 0)])
            s_new[r] = np.where(s_chunk[r] < 0, -1, new[np.maximum(s_chunk[r], 0)])
        want = alm.alm_loss(
            t_lp, s_lp, jnp.asarray(t_new), jnp.asarray(s_new), c,
            teacher_lp_boundary=t_lpb, student_lp_boundary=s_lpb,
        )  # fmt: skip
        spec = objective.LossSpec.from_config(dict(alm=dict(merge_threshold=threshold)))
        total, count, _ = objective.loss_fn(spec, inputs, {}, {}, 0)
        np.testing.assert_allclose(float(count), float(want[1]))
        np.testing.assert_allclose(float(total), float(want[0]), rtol=1e-5)
        if threshold == 1.1:  # everything merged: one chunk per row, and it is chunk 0 (unscored)
            assert float(count) == 0
        elif threshold == middle:
            assert 0 < float(count) < float((batch["num_chunks"] - 1).sum())
    # alm as a metric (weight 0) beside a weighted CE: the total and count are CE's, per token.
    spec = objective.LossSpec.from_config(dict(alm=dict(weight=0.0), ce=dict(weight=1.0)))
    total, count, metrics = objective.loss_fn(spec, inputs, {}, {}, 0)
    logits = inputs.student_hidden @ inputs.student_head
    ce = dj.losses.masked_sum_and_count(
        dj.losses.cross_entropy(logits, inputs.targets, inputs.mask), inputs.mask
    )
    np.testing.assert_allclose([float(total), float(count)], [float(ce[0]), float(ce[1])], 1e-5)
    want = alm.alm_loss(
        t_lp, s_lp, jnp.asarray(t_chunk), jnp.asarray(s_chunk), c,
        teacher_lp_boundary=t_lpb, student_lp_boundary=s_lpb,
    )  # fmt: skip
    np.testing.assert_allclose(float(metrics["loss/alm"][0]), float(want[0]), rtol=1e-5)
    # ALM mixed with CE: two normaliser groups, each its own sum and count (CE per token, ALM
    # per chunk); loss_fn refuses the mix and names loss_groups.
    spec = objective.LossSpec.from_config(dict(alm=dict(weight=0.5), ce=dict(weight=1.0)))
    assert spec.groups() == ("tokens", "alm")
    sums, counts, _ = objective.loss_groups(spec, inputs, {}, {}, 0)
    np.testing.assert_allclose(
        [float(sums["tokens"]), float(counts["tokens"])], [float(ce[0]), float(ce[1])], 1e-5
    )
    np.testing.assert_allclose(float(sums["alm"]), 0.5 * float(want[0]), rtol=1e-5)
    np.testing.assert_allclose(float(counts["alm"]), float(want[1]))
    with pytest.raises(ValueError, match="use loss_groups"):
        objective.loss_fn(spec, inputs, {}, {}, 0)


def test_chunk_hidden_loss_matches_numpy_and_the_alm_term_adds_it(kjv_sentencepiece):
    teacher_tok, student_tok = kjv_sentencepiece, load_tokenizer("byte")
    batch = dj.bridges.ChunkCollator(teacher_tok, student_tok, teacher_len=64, student_len=96)(
        TEXTS
    )
    t_chunk, s_chunk = batch["teacher_chunk"], batch["student_chunk"]
    c = s_chunk.shape[1]
    rng = np.random.default_rng(0)
    hs = rng.normal(size=(4, 96, 6)).astype(np.float32)
    ht = rng.normal(size=(4, 64, 8)).astype(np.float32) * 3
    proj = {"kernel": jnp.asarray(rng.normal(size=(6, 8)), jnp.float32)}
    # NumPy: hidden states at each chunk's last token; chunks present on both sides, not chunk 0.
    ends_s, ends_t = [], []
    for r in range(4):
        for k in range(1, c):
            ps, pt = np.flatnonzero(s_chunk[r] == k), np.flatnonzero(t_chunk[r] == k)
            if len(ps) and len(pt):
                ends_s.append(hs[r, ps.max()].astype(np.float64) @ np.asarray(proj["kernel"]))
                ends_t.append(ht[r, pt.max()].astype(np.float64))
    es, et = np.array(ends_s), np.array(ends_t)
    want_mse = np.sum(np.mean((es - et) ** 2, -1) / np.mean(et**2))
    cos = np.sum(es * et, -1) / np.linalg.norm(es, axis=-1) / np.linalg.norm(et, axis=-1)
    args = (jnp.asarray(hs), jnp.asarray(ht), jnp.asarray(s_chunk), jnp.asarray(t_chunk), c)
    got, count = alm.chunk_hidden_loss(*args, projector=proj, kind="mse")
    assert float(count) == len(es) > 50
    np.testing.assert_allclose(float(got), want_mse, rtol=1e-5)
    got, _ = alm.chunk_hidden_loss(*args, projector=proj, kind="cosine")
    np.testing.assert_allclose(float(got), np.sum(1 - cos), rtol=1e-4)

    # The same model and tokenizer on both sides: the term is 0 (identity, no projector).
    byte = load_tokenizer("byte")
    same = dj.bridges.ChunkCollator(byte, byte, teacher_len=96, student_len=96)(TEXTS)
    h = jnp.asarray(hs)
    zero, n = alm.chunk_hidden_loss(
        h, h, jnp.asarray(same["student_chunk"]), jnp.asarray(same["teacher_chunk"]), 96
    )
    assert float(n) > 50 and float(zero) == 0.0

    # Through the objective: alm + hidden_weight x the chunk-end term, over the same chunk count,
    # with the projector init_params makes for different widths.
    t_bmask = jnp.asarray(dj.bridges.boundary_vocab_mask(teacher_tok))
    s_bmask = jnp.asarray(dj.bridges.boundary_vocab_mask(student_tok))
    teacher, student = _model(teacher_tok.vocab_size, 1), _model(student_tok.vocab_size, 2)
    t_lp, t_lpb = _side_lp(teacher, batch["teacher_ids"], batch["teacher_segment"], t_bmask)
    ids = jnp.asarray(batch["student_ids"])
    s_hidden = student.forward(ids, compute_logits=False).hidden
    inputs = objective.LossInputs(
        student_hidden=s_hidden,
        student_head=student.head_weights(),
        targets=jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1),
        mask=jnp.asarray(batch["student_segment"] > 0),
        teacher_token_logprobs=t_lp,
        teacher_boundary_logprobs=t_lpb,
        teacher_chunk=jnp.asarray(t_chunk),
        student_chunk=jnp.asarray(s_chunk),
        student_boundary_mask=s_bmask,
        teacher_token_hidden=jnp.asarray(ht),
    )
    spec = objective.LossSpec.from_config(dict(alm=dict(hidden_weight=0.5)))
    params = objective.init_params(spec, jax.random.key(0), 32, 8)
    assert params["alm"]["kernel"].shape == (32, 8)
    total, count, metrics = objective.loss_fn(spec, inputs, params, {}, 0)
    plain = objective.loss_fn(objective.LossSpec.from_config(dict(alm={})), inputs, {}, {}, 0)
    hidden = alm.chunk_hidden_loss(
        s_hidden, jnp.asarray(ht), jnp.asarray(s_chunk), jnp.asarray(t_chunk), c,
        projector=params["alm"],
    )  # fmt: skip
    np.testing.assert_allclose(float(total), float(plain[0] + 0.5 * hidden[0]), rtol=1e-5)
    assert float(count) == float(plain[1]) == float(hidden[1])
    np.testing.assert_allclose(float(metrics["alm/chunk_hidden"][0]), float(hidden[0]), 1e-6)


def test_mismatched_pair_loss_is_positive_and_falls(kjv_sentencepiece):
    teacher_tok, student_tok = kjv_sentencepiece, load_tokenizer("byte")
    collate = dj.bridges.ChunkCollator(teacher_tok, student_tok, teacher_len=64, student_len=96)
    batch = collate(TEXTS)
    assert (batch["teacher_chunk"] >= 0).sum() < (batch["student_chunk"] >= 0).sum()
    c = int(batch["num_chunks"].max())
    t_bmask = jnp.asarray(dj.bridges.boundary_vocab_mask(teacher_tok))
    s_bmask = jnp.asarray(dj.bridges.boundary_vocab_mask(student_tok))
    teacher = _model(teacher_tok.vocab_size, 1, layers=2)
    student = _model(student_tok.vocab_size, 2)
    graphdef, params = nnx.split(student)
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt):
        def loss(p):
            return _alm(teacher, nnx.merge(graphdef, p), batch, t_bmask, s_bmask, c)[0]

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, value

    losses = []
    for _ in range(15):
        params, opt, value = step(params, opt)
        losses.append(float(value))
    assert losses[0] > 0 and all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses
