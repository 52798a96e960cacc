"""DSKD against a float64 NumPy oracle written with per-row loops, and its properties: attention
rows sum to 1 over valid keys (METHODS.md 6.7), identity projections of the same model give zero
KD terms, gradients reach the projections but not the frozen heads, and a real tokenizer pair
(a SentencePiece teacher, a byte-level student) learns under a few Adam steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import distill_jax as dj
from distill_jax.bridges import dskd
from distill_jax.data import load_tokenizer
from distill_jax.losses import cross_entropy

ARCH = dict(hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, head_dim=8)
TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "And God said, Let there be light: and there was light.",
    "And God saw the light, that it was good.",
]


def _model(vocab, seed, layers=1):
    config = dj.models.make_config("llama", vocab_size=vocab, num_layers=layers, **ARCH)
    return dj.models.Transformer(config, rngs=nnx.Rngs(seed))


def _log_softmax64(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _kl64(logp, logq):
    p = np.exp(logp)
    return float(np.sum(np.where(p > 0, p * (logp - logq), 0.0)))


def _std64(x, mask):
    vals = np.concatenate([x[r][mask[r]].ravel() for r in range(x.shape[0])])
    return vals.std()


def _ref_cma(p, hs, ht, es, et, ws, wt, zs, zt, y, smask, tmask):
    """Per row, per position: attention over valid positions of the other side, the two
    projected heads, and the three terms; float64 throughout."""
    hs, ht, ws, wt, zs, zt = (np.asarray(a, np.float64) for a in (hs, ht, ws, wt, zs, zt))
    pq, pt2s, ps2t = (np.asarray(p[k]["kernel"], np.float64) for k in ("query", "t2s", "s2t"))
    es_in, es_out = (np.asarray(e, np.float64) for e in es)
    et_in, et_out = (np.asarray(e, np.float64) for e in et)
    sig_e = _std64(np.concatenate([et_in, et_out], -1), tmask)
    sig_h = _std64(ht, tmask)
    b, s, u = zs.shape[0], zs.shape[1], zt.shape[1]
    out = {k: np.zeros((b, s)) for k in ("t2s_ce", "t2s_kd", "acc")}
    out["s2t_kd"] = np.zeros((b, u))
    for r in range(b):
        q = np.concatenate([es_in[r], es_out[r]], -1) @ pq  # [S, 2Dt]
        k = np.concatenate([et_in[r], et_out[r]], -1) / sig_e  # [U, 2Dt]
        e = q.shape[-1]
        v = (ht[r] / sig_h + et_out[r] / sig_e) @ pt2s  # [U, Ds]
        hs2t = hs[r] @ ps2t  # [S, Dt]
        tv, sv = np.flatnonzero(tmask[r]), np.flatnonzero(smask[r])
        for i in sv:
            a = np.exp(_log_softmax64(q[i] @ k[tv].T / np.sqrt(e)))
            z_t2s = (a @ v[tv]) @ ws
            lp = _log_softmax64(z_t2s)
            out["t2s_ce"][r, i] = -lp[y[r, i]]
            hit = int(np.argmax(z_t2s) == y[r, i])
            out["acc"][r, i] = hit
            out["t2s_kd"][r, i] = hit * _kl64(lp, _log_softmax64(zs[r, i]))
        for j in tv:
            a = np.exp(_log_softmax64(k[j] @ q[sv].T / np.sqrt(e)))
            z_s2t = (a @ hs2t[sv]) @ wt
            out["s2t_kd"][r, j] = _kl64(_log_softmax64(zt[r, j]), _log_softmax64(z_s2t))
    return out


def _cma_case(seed, b=2, s=6, u=7, ds=4, dt=6, v=11, w=13):
    rng = np.random.default_rng(seed)
    f = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    params = dskd.init_dskd(jax.random.key(seed), ds, dt, cross_tokenizer=True)
    case = dict(
        student_hidden=f(b, s, ds),
        teacher_hidden=f(b, u, dt) * 3.0,
        student_embeddings=(f(b, s, ds), f(b, s, ds)),
        teacher_embeddings=(f(b, u, dt) * 0.1, f(b, u, dt) * 0.1),
        student_head=f(ds, v),
        teacher_head=f(dt, w),
        student_logits=f(b, s, v),
        teacher_logits=f(b, u, w) * 2.0,
        student_targets=rng.integers(0, v, (b, s)),
        student_mask=rng.random((b, s)) < 0.8,
        teacher_mask=rng.random((b, u)) < 0.8,
    )
    case["student_mask"][:, 0] = case["teacher_mask"][:, 0] = True
    return params, case


def _ref(params, c):
    return _ref_cma(
        params, c["student_hidden"], c["teacher_hidden"], c["student_embeddings"],
        c["teacher_embeddings"], c["student_head"], c["teacher_head"], c["student_logits"],
        c["teacher_logits"], c["student_targets"], c["student_mask"], c["teacher_mask"],
    )  # fmt: skip


def test_attention_rows_sum_to_one_over_valid_keys():
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(3, 5, 8)), rng.normal(size=(3, 9, 8))
    key_mask = rng.random((3, 9)) < 0.6
    key_mask[2] = False  # a row without any valid key
    a = np.asarray(dskd.cma_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(key_mask)))
    np.testing.assert_allclose(a[:2].sum(-1), 1.0, rtol=1e-6)
    assert np.all(a[~np.broadcast_to(key_mask[:, None, :], a.shape)] == 0.0)
    assert np.all(a[2] == 0.0)
    grad = jax.grad(lambda q: dskd.cma_attention(q, jnp.asarray(k), jnp.asarray(key_mask)).sum())
    assert np.all(np.isfinite(grad(jnp.asarray(q))))


@pytest.mark.parametrize("seed", [0, 1])
def test_cma_terms_match_numpy(seed):
    params, c = _cma_case(seed)
    # Make the projected teacher right at some positions, so the accuracy-masked KD term counts.
    c["student_targets"][:, ::2] = _argmax_t2s(params, c)[:, ::2]
    ref = _ref(params, c)
    terms = dskd.cma_terms(params, **{k: jax.tree.map(jnp.asarray, v) for k, v in c.items()})
    assert ref["acc"][c["student_mask"]].sum() >= 2
    np.testing.assert_allclose(terms.t2s_ce, ref["t2s_ce"], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(terms.t2s_kd, ref["t2s_kd"], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(terms.s2t_kd, ref["s2t_kd"], rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(terms.t2s_accuracy, ref["acc"])
    kd, metrics = dskd.dskd_objective(terms)
    m = c["student_mask"]
    kd_mask = m & (ref["acc"] > 0)
    want = (
        ref["t2s_ce"][m].mean()
        + ref["t2s_kd"][kd_mask].sum() / kd_mask.sum()
        + ref["s2t_kd"][c["teacher_mask"]].mean()
    )
    np.testing.assert_allclose(float(kd), want, rtol=2e-5)
    assert float(metrics["t2s_kd"][1]) == kd_mask.sum()


def _argmax_t2s(params, c):
    """argmax of the projected teacher at each student position, from the NumPy side's formula
    (only used to choose targets; the values are then checked against ``_ref_cma``)."""
    a = lambda x: np.asarray(x, np.float64)  # noqa: E731
    (t_in, t_out), tmask = (a(e) for e in c["teacher_embeddings"]), c["teacher_mask"]
    sig_e = _std64(np.concatenate([t_in, t_out], -1), tmask)
    sig_h = _std64(a(c["teacher_hidden"]), tmask)
    q = np.concatenate([a(e) for e in c["student_embeddings"]], -1) @ a(params["query"]["kernel"])
    k = np.concatenate([t_in, t_out], -1) / sig_e
    scores = np.where(tmask[:, None, :], q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1]), -np.inf)
    att = np.exp(scores - scores.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    v = (a(c["teacher_hidden"]) / sig_h + t_out / sig_e) @ a(params["t2s"]["kernel"])
    return np.argmax((att @ v) @ a(c["student_head"]), -1)


def _same_vocab_case(seed, b=2, t=5, d=6, v=17):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    y = jnp.asarray(rng.integers(0, v, (b, t)))
    mask = jnp.asarray(rng.random((b, t)) < 0.8)
    return h, head, y, mask


def test_same_model_with_identity_projections_gives_zero_kd_terms():
    h, head, y, mask = _same_vocab_case(0)
    params = dskd.init_dskd(jax.random.key(0), 6, 6, cross_tokenizer=False, init="identity")
    logits = h @ head
    for divergence in ("forward_kl", "reverse_kl", "jsd", "akl"):
        terms = dskd.same_vocab_terms(
            params, h, h, head, head, logits, logits, y, mask, divergence=divergence
        )
        np.testing.assert_allclose(terms.t2s_kd, 0.0, atol=1e-6)
        np.testing.assert_allclose(terms.s2t_kd, 0.0, atol=1e-6)
        np.testing.assert_allclose(terms.t2s_ce, cross_entropy(logits, y, mask), rtol=1e-6)


def test_same_vocab_terms_match_numpy():
    h_s, head_s, y, mask = _same_vocab_case(1, d=4)
    rng = np.random.default_rng(2)
    h_t = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)
    head_t = jnp.asarray(rng.normal(size=(6, 17)), jnp.float32)
    params = dskd.init_dskd(jax.random.key(3), 4, 6, cross_tokenizer=False)
    zs, zt = h_s @ head_s, h_t @ head_t
    terms = dskd.same_vocab_terms(
        params, h_s, h_t, head_s, head_t, zs, zt, y, mask, divergence="reverse_kl", temperature=2.0
    )
    a64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
    z_t2s = a64(h_t) @ a64(params["t2s"]["kernel"]) @ a64(head_s)
    z_s2t = a64(h_s) @ a64(params["s2t"]["kernel"]) @ a64(head_t)
    for r in range(2):
        for i in range(5):
            if not mask[r, i]:
                assert terms.t2s_kd[r, i] == terms.s2t_kd[r, i] == terms.t2s_ce[r, i] == 0
                continue
            ce = -_log_softmax64(z_t2s[r, i])[int(y[r, i])]
            rkl = _kl64(_log_softmax64(a64(zs[r, i]) / 2), _log_softmax64(z_t2s[r, i] / 2))
            fkl = _kl64(_log_softmax64(a64(zt[r, i]) / 2), _log_softmax64(z_s2t[r, i] / 2))
            np.testing.assert_allclose(terms.t2s_ce[r, i], ce, rtol=1e-5)
            np.testing.assert_allclose(terms.t2s_kd[r, i], rkl, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(terms.s2t_kd[r, i], fkl, rtol=1e-5, atol=1e-7)


def test_gradients_reach_the_projections_not_the_frozen_heads_or_the_teacher():
    params, c = _cma_case(4)
    args = {k: jax.tree.map(jnp.asarray, v) for k, v in c.items()}
    names = ("student_head", "teacher_head", "teacher_hidden", "teacher_logits", "student_hidden")

    def loss(params, diff):
        terms = dskd.cma_terms(params, **dict(args, **diff))
        return dskd.dskd_objective(terms)[0]

    g_params, g = jax.grad(loss, argnums=(0, 1))(params, {k: args[k] for k in names})
    for name in ("query", "t2s", "s2t"):
        assert float(jnp.abs(g_params[name]["kernel"]).max()) > 0, name
    for name in ("student_head", "teacher_head", "teacher_hidden", "teacher_logits"):
        assert float(jnp.abs(g[name]).max()) == 0.0, name
    assert float(jnp.abs(g["student_hidden"]).max()) > 0  # the s2t path trains the student


def test_bad_shapes_name_the_argument():
    params, c = _cma_case(5)
    c["teacher_mask"] = c["teacher_mask"][:, :-1]
    with pytest.raises(ValueError, match="teacher_mask"):
        dskd.cma_terms(params, **c)
    h, head, y, mask = _same_vocab_case(0)
    p = dskd.init_dskd(jax.random.key(0), 6, 6, cross_tokenizer=False)
    with pytest.raises(ValueError, match="cma_terms"):
        dskd.same_vocab_terms(p, h, h, head, head, h @ head, (h @ head)[..., :5], y, mask)


def _side(model, tok, texts, length):
    ids = np.zeros((len(texts), length + 1), np.int32)
    mask = np.zeros((len(texts), length), bool)
    for r, text in enumerate(texts):
        enc = tok.encode(text)[: length + 1]
        ids[r, : len(enc)] = enc
        mask[r, : len(enc) - 1] = True
    x, y = jnp.asarray(ids[:, :-1]), jnp.asarray(ids[:, 1:])
    return x, y, jnp.asarray(mask)


def test_cross_tokenizer_dskd_learns_on_a_real_pair(kjv_sentencepiece):
    teacher_tok, student_tok = kjv_sentencepiece, load_tokenizer("byte")
    teacher = _model(teacher_tok.vocab_size, 1, layers=2)
    student = _model(student_tok.vocab_size, 2)
    tx_, ty, tmask = _side(teacher, teacher_tok, TEXTS, 40)
    sx, sy, smask = _side(student, student_tok, TEXTS, 96)
    t_out = teacher.forward(tx_, compute_logits=False).hidden
    t_logits = teacher.logits_from_hidden(t_out)
    t_emb = (teacher.embed[...][tx_], teacher.embed[...][ty])
    d = student.config.hidden_size
    graphdef, s_params = nnx.split(student)
    params = {"dskd": dskd.init_dskd(jax.random.key(0), d, d, cross_tokenizer=True), "s": s_params}
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    def loss(params):
        model = nnx.merge(graphdef, params["s"])
        h = model.forward(sx, compute_logits=False).hidden
        emb = model.embed[...]
        terms = dskd.cma_terms(
            params["dskd"], h, t_out, (emb[sx], emb[sy]), t_emb, model.head_weights(),
            teacher.head_weights(), model.logits_from_hidden(h), t_logits, sy, smask, tmask,
        )  # fmt: skip
        kd, metrics = dskd.dskd_objective(terms)
        ce = dj.losses.masked_sum_and_count(
            cross_entropy(model.logits_from_hidden(h), sy, smask), smask
        )
        return 0.5 * ce[0] / ce[1] + 0.5 * kd, metrics

    @jax.jit
    def step(params, opt):
        (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, value, metrics

    history = []
    for _ in range(20):
        params, opt, value, metrics = step(params, opt)
        history.append((float(value), {k: float(s / n) for k, (s, n) in metrics.items()}))
    first, last = history[0], history[-1]
    assert all(np.isfinite(v) for v, _ in history)
    assert last[0] < 0.7 * first[0], [v for v, _ in history]
    assert last[1]["s2t_kd"] < first[1]["s2t_kd"]
    assert last[1]["t2s_ce"] < first[1]["t2s_ce"]
