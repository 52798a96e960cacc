"""Feature losses against float64 NumPy formulas written here, hand-computed values (layer maps)
and properties: zero at equality, orthogonal invariance of value relations, masked / future /
padded entries not contributing, finite values and gradients at all-zero features.

The agreement of ``attention_probs`` with transformers' attentions is in
tests/models/attention_qkv_test.py (it needs the reference-model helpers there).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.losses import features as ft

# ------------------------------------------------------------------- float64 NumPy references


def np_softmax(z, axis=-1):
    z = np.asarray(z, np.float64)
    z = z - z.max(axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis, keepdims=True)


def np_row_kl(p, q):
    """sum_j p_j log(p_j / q_j) over the last axis, 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p > 0, p * np.log(p / q), 0.0).sum(-1)


def np_visible(positions, segments, window=None):
    b, t = positions.shape
    out = np.zeros((b, t, t), bool)
    for i in range(b):
        for a in range(t):
            for c in range(t):
                d = positions[i, a] - positions[i, c]
                ok = segments[i, a] == segments[i, c] and d >= 0
                out[i, a, c] = ok and (window is None or d < window)
    return out


def np_masked_softmax(logits, visible):
    """Row softmax over visible entries only, loops for clarity; logits [B, R, T, S]."""
    out = np.zeros(logits.shape)
    b, r, t, _ = logits.shape
    for i in range(b):
        for h in range(r):
            for a in range(t):
                cols = visible[i, a]
                z = logits[i, h, a, cols]
                e = np.exp(z - z.max())
                out[i, h, a, cols] = e / e.sum()
    return out


def np_relation(x, y, r, visible):
    """MiniLMv2 relation: concatenate heads, split into r heads, scaled dot product, softmax."""
    b, t, n, h = x.shape
    d = n * h // r
    xr = np.asarray(x, np.float64).reshape(b, t, r, d)
    yr = np.asarray(y, np.float64).reshape(b, t, r, d)
    logits = np.einsum("btrd,bsrd->brts", xr, yr) / np.sqrt(d)
    return np_masked_softmax(logits, visible)


def np_relation_kl(sx, sy, tx, ty, r, visible, mask):
    ps, pt = np_relation(sx, sy, r, visible), np_relation(tx, ty, r, visible)
    return np.where(mask, np_row_kl(pt, ps).mean(1), 0.0)


def np_repeat_heads(k, n):
    return np.repeat(np.asarray(k, np.float64), n // k.shape[2], axis=2)


def np_attention_probs(q, k, positions, segments, scale, softcap=None, window=None):
    k = np_repeat_heads(k, q.shape[2])
    scores = np.einsum("btnh,bsnh->bnts", np.asarray(q, np.float64), k) * scale
    if softcap:
        scores = np.tanh(scores / softcap) * softcap
    return np_masked_softmax(scores, np_visible(positions, segments, window))


def _arange_positions(b, t):
    return np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()


def _rand(seed, *shape, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


B, T = 2, 6

# ------------------------------------------------------------------------------ projector


def test_init_projector_kinds():
    key = jax.random.key(0)
    eye = ft.init_projector(key, 3, 5, "identity")["kernel"]
    np.testing.assert_array_equal(eye, np.eye(3, 5))
    assert not np.any(ft.init_projector(key, 3, 5, "zeros")["kernel"])
    x = ft.init_projector(key, 64, 32, "xavier")["kernel"]
    assert x.shape == (64, 32) and np.abs(x).max() <= np.sqrt(6 / 96) + 1e-7
    kaiming = ft.init_projector(key, 256, 128, "kaiming")["kernel"]
    np.testing.assert_allclose(np.std(kaiming), np.sqrt(2 / 256), rtol=0.1)
    with pytest.raises(ValueError, match="init="):
        ft.init_projector(key, 3, 5, "orthogonal")
    h = _rand(1, B, T, 3)
    np.testing.assert_allclose(ft.apply_projector({"kernel": jnp.asarray(eye)}, h)[..., :3], h)


# ---------------------------------------------------------------------------- hidden states


def np_hidden_mse(s, t, w, mask, normalize=None):
    s = np.asarray(s, np.float64) @ np.asarray(w, np.float64)
    t = np.asarray(t, np.float64)
    err = (s - t) ** 2
    valid = mask.astype(bool)
    if normalize == "global":
        err = err / (t[valid] ** 2).mean()
    elif normalize == "channel":
        err = err / (t[valid] ** 2).mean(0)
    return np.where(valid, err.mean(-1), 0.0)


def np_hidden_cosine(s, t, w, mask):
    s = np.asarray(s, np.float64) @ np.asarray(w, np.float64)
    t = np.asarray(t, np.float64)
    cos = (s * t).sum(-1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))
    return np.where(mask, 1 - cos, 0.0)


MASK = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)


@pytest.mark.parametrize("normalize", [None, "global", "channel"])
def test_hidden_mse_matches_numpy(normalize):
    s, t = _rand(0, B, T, 4), _rand(1, B, T, 6, scale=3.0)
    proj = ft.init_projector(jax.random.key(2), 4, 6, "xavier")
    f = jax.jit(lambda s, t, m, p: ft.hidden_mse(s, t, m, projector=p, normalize=normalize))
    got = f(s, t, MASK, proj)
    assert got.shape == (B, T) and got.dtype == jnp.float32
    want = np_hidden_mse(s, t, proj["kernel"], MASK, normalize)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_hidden_cosine_matches_numpy():
    s, t = _rand(0, B, T, 4), _rand(1, B, T, 6)
    proj = ft.init_projector(jax.random.key(2), 4, 6, "kaiming")
    got = jax.jit(lambda s, t, m, p: ft.hidden_cosine(s, t, m, projector=p))(s, t, MASK, proj)
    np.testing.assert_allclose(got, np_hidden_cosine(s, t, proj["kernel"], MASK), atol=1e-6)


@pytest.mark.parametrize("loss", [ft.hidden_mse, ft.hidden_cosine])
def test_identical_features_with_identity_projector_give_zero(loss):
    h = _rand(0, B, T, 5)
    proj = ft.init_projector(jax.random.key(0), 5, 5, "identity")
    np.testing.assert_allclose(jax.jit(loss)(h, h, None, projector=proj), 0.0, atol=1e-6)
    np.testing.assert_allclose(jax.jit(loss)(h, h), 0.0, atol=1e-6)  # no projector


@pytest.mark.parametrize(
    "loss,normalize", [("mse", None), ("mse", "global"), ("mse", "channel"), ("cosine", None)]
)
def test_padded_tokens_do_not_change_the_loss(loss, normalize):
    kw = {} if normalize is None else {"normalize": normalize}
    fn = jax.jit(lambda s, t: getattr(ft, f"hidden_{loss}")(s, t, MASK, **kw))
    s, t = _rand(0, B, T, 4), _rand(1, B, T, 4)
    s2, t2 = s.copy(), t.copy()
    s2[~MASK], t2[~MASK] = 100.0, -50.0
    np.testing.assert_allclose(fn(s2, t2), fn(s, t), rtol=1e-6)
    assert np.all(np.asarray(fn(s2, t2))[~MASK] == 0)


@pytest.mark.parametrize(
    "loss,kw",
    [
        (ft.hidden_mse, {}),
        (ft.hidden_mse, {"normalize": "global"}),
        (ft.hidden_mse, {"normalize": "channel"}),
        (ft.hidden_cosine, {}),
    ],
)
def test_all_zero_features_give_finite_loss_and_gradient(loss, kw):
    z = jnp.zeros((B, T, 4))
    proj = ft.init_projector(jax.random.key(0), 4, 4, "xavier")
    f = lambda s, p: jnp.sum(loss(s, z, MASK, projector=p, **kw))
    value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(z, proj)
    assert np.isfinite(value)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    # A zero student against a non-zero teacher: cosine loss 1, gradient finite.
    t = _rand(3, B, T, 4)
    g = jax.grad(lambda s: jnp.sum(ft.hidden_cosine(s, t)))(z)
    assert np.all(np.isfinite(g))


def test_width_mismatch_without_projector_raises():
    with pytest.raises(ValueError, match="projector"):
        ft.hidden_mse(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2, 4)))


# ------------------------------------------------------------------------------- layer maps


@pytest.mark.parametrize(
    "ls,lt,expected",
    [  # hand-computed from l_t = floor((l_s + 1) L_t / L_s + 1/2) - 1
        (4, 4, ((0, 0), (1, 1), (2, 2), (3, 3))),
        (2, 4, ((0, 1), (1, 3))),
        (4, 6, ((0, 1), (1, 2), (2, 4), (3, 5))),  # 1.5 -> 2, 4.5 -> 5 (halves up)
        (3, 2, ((0, 0), (1, 0), (2, 1))),
        (4, 1, ((0, 0), (1, 0), (2, 0), (3, 0))),  # 0.25 -> 0, clamped at 0
        (3, 28, ((0, 8), (1, 18), (2, 27))),
    ],
)
def test_uniform_layer_map(ls, lt, expected):
    assert ft.layer_map(ls, lt) == expected


def test_layer_map_kinds_and_errors():
    assert ft.layer_map(3, 3, "all") == ((0, 0), (1, 1), (2, 2))
    assert ft.layer_map(3, 7, "last") == ((2, 6),)
    assert ft.layer_map(3, 7, pairs=[(0, 1), (2, 6)]) == ((0, 1), (2, 6))
    with pytest.raises(ValueError, match="equal depths"):
        ft.layer_map(3, 4, "all")
    with pytest.raises(ValueError, match="outside"):
        ft.layer_map(3, 4, pairs=[(3, 0)])
    with pytest.raises(ValueError, match="kind="):
        ft.layer_map(3, 4, "middle")


def test_layerwise_hidden_loss_averages_mapped_pairs():
    hs = tuple(_rand(i, B, T, 4) for i in range(3))  # embeddings + 2 blocks
    ht = tuple(_rand(10 + i, B, T, 6) for i in range(5))  # embeddings + 4 blocks
    pairs = ft.layer_map(2, 4)
    projs = [ft.init_projector(jax.random.key(i), 4, 6) for i in range(len(pairs))]
    got = jax.jit(
        lambda hs, ht, p: ft.layerwise_hidden_loss(
            ft.hidden_mse, hs, ht, MASK, pairs, projectors=p, normalize="global"
        )
    )(hs, ht, projs)
    want = np.mean(
        [
            np_hidden_mse(hs[a + 1], ht[b + 1], p["kernel"], MASK, "global")
            for (a, b), p in zip(pairs, projs)
        ],
        axis=0,
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    shared = ft.layerwise_hidden_loss(ft.hidden_cosine, hs, ht, None, pairs, projectors=projs[0])
    want = np.mean(
        [np_hidden_cosine(hs[a + 1], ht[b + 1], projs[0]["kernel"], True) for a, b in pairs], 0
    )
    np.testing.assert_allclose(shared, want, atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        ft.layerwise_hidden_loss(ft.hidden_mse, hs, ht, None, [(2, 0)])


# ----------------------------------------------------------------- attention probabilities


@pytest.mark.parametrize("softcap,window", [(None, None), (2.0, None), (None, 3)])
def test_attention_probs_match_numpy(softcap, window):
    q, k = _rand(0, B, T, 4, 8), _rand(1, B, T, 2, 8)  # GQA: 4 query heads, 2 kv heads
    positions = np.array([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]], np.int32)
    segments = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]], np.int32)
    f = jax.jit(
        lambda q, k, p, s: ft.attention_probs(
            q, k, p, s, scale=0.3, softcap=softcap, sliding_window=window
        )
    )
    got = f(q, k, positions, segments)
    assert got.shape == (B, 4, T, T) and got.dtype == jnp.float32
    want = np_attention_probs(q, k, positions, segments, 0.3, softcap, window)
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got).sum(-1), 1.0, atol=1e-6)


# ---------------------------------------------------------------------- MiniLM relations


def test_attention_relation_kl_matches_numpy_across_shapes():
    """Student: 4 query heads of 4 with 2 kv heads (width 16); teacher: 2 heads of 16 (width
    32); R = 2 relation heads."""
    sq, sk = _rand(0, B, T, 4, 4), _rand(1, B, T, 2, 4)
    tq, tk = _rand(2, B, T, 2, 16), _rand(3, B, T, 2, 16)
    positions = np.array([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]], np.int32)
    segments = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]], np.int32)
    mask = segments > 0
    f = jax.jit(
        lambda a, b, c, d: ft.attention_relation_kl(
            a, b, c, d, mask, num_relation_heads=2, positions=positions, segment_ids=segments
        )
    )
    got = f(sq, sk, tq, tk)
    visible = np_visible(positions, segments)
    want = np_relation_kl(sq, np_repeat_heads(sk, 4), tq, np_repeat_heads(tk, 2), 2, visible, mask)
    assert got.shape == (B, T)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(got) >= -1e-7)


def test_attention_relation_equals_model_attention_when_heads_match():
    """R = N and no softcap: the relation distributions are the attention probabilities."""
    q, k = _rand(0, B, T, 4, 8), _rand(1, B, T, 2, 8)
    visible = ft._visible(B, T, None, None, None)
    logp = ft._relation_log_probs(q, ft._expand_kv_heads(k, 4), 4, visible)
    np.testing.assert_allclose(np.exp(logp), ft.attention_probs(q, k), atol=1e-6)
    np.testing.assert_allclose(ft.attention_relation_kl(q, k, q, k), 0.0, atol=1e-6)


def test_value_relation_kl_matches_numpy_for_different_widths():
    sv, tv = _rand(0, B, T, 2, 4), _rand(1, B, T, 4, 8)  # widths 8 and 32
    segments = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], np.int32)
    f = jax.jit(
        lambda s, t: ft.value_relation_kl(s, t, MASK, num_relation_heads=4, segment_ids=segments)
    )
    got = f(sv, tv)
    visible = np_visible(_arange_positions(B, T), segments)
    np.testing.assert_allclose(
        got, np_relation_kl(sv, sv, tv, tv, 4, visible, MASK), rtol=1e-5, atol=1e-6
    )
    assert np.all(np.isfinite(got)) and np.all(np.asarray(got) >= -1e-7)
    grads = jax.grad(lambda s: jnp.sum(f(s, tv)))(sv)
    assert np.all(np.isfinite(grads)) and np.any(grads != 0)


def _block_orthogonal(seed, r, d):
    """Block-diagonal orthogonal [r d, r d]: an orthogonal map inside each relation head."""
    rng = np.random.default_rng(seed)
    out = np.zeros((r * d, r * d))
    for i in range(r):
        q, _ = np.linalg.qr(rng.standard_normal((d, d)))
        out[i * d : (i + 1) * d, i * d : (i + 1) * d] = q
    return out


@pytest.mark.parametrize("relation_heads", [1, 2, 4])
def test_value_relation_invariant_to_orthogonal_maps(relation_heads):
    tv = _rand(0, B, T, 4, 8)  # width 32
    o = _block_orthogonal(1, relation_heads, 32 // relation_heads)
    sv = (tv.reshape(B, T, 32).astype(np.float64) @ o).reshape(B, T, 2, 16).astype(np.float32)
    got = jax.jit(lambda s, t: ft.value_relation_kl(s, t, num_relation_heads=relation_heads))(
        sv, tv
    )
    np.testing.assert_allclose(got, 0.0, atol=1e-5)
    # A generic (not block-orthogonal) mixing of the heads is not free.
    if relation_heads > 1:
        full = _block_orthogonal(2, 1, 32)
        sv2 = (tv.reshape(B, T, 32) @ full).reshape(B, T, 2, 16).astype(np.float32)
        assert np.max(ft.value_relation_kl(sv2, tv, num_relation_heads=relation_heads)) > 1e-3


def test_relations_ignore_future_padding_and_masked_rows():
    sq, sk, sv = _rand(0, B, T, 2, 4), _rand(1, B, T, 2, 4), _rand(2, B, T, 2, 4)
    tq, tk, tv = _rand(3, B, T, 2, 4), _rand(4, B, T, 2, 4), _rand(5, B, T, 2, 4)
    segments = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], np.int32)
    mask = segments > 0

    def both(sq, sk, sv):
        kw = dict(segment_ids=segments)
        return (
            ft.attention_relation_kl(sq, sk, tq, tk, mask, **kw),
            ft.value_relation_kl(sv, tv, mask, **kw),
        )

    base = jax.jit(both)(sq, sk, sv)
    # Change everything at the last position: rows before it (and row 0's padding) see no change.
    sq2, sk2, sv2 = sq.copy(), sk.copy(), sv.copy()
    for x in (sq2, sk2, sv2):
        x[:, -1] += 10.0
    # and the padding of row 0 altogether.
    for x in (sq2, sk2, sv2):
        x[0, 4:] = -7.0
    changed = jax.jit(both)(sq2, sk2, sv2)
    for a, b in zip(base, changed):
        np.testing.assert_allclose(np.asarray(b)[:, :-1], np.asarray(a)[:, :-1], rtol=1e-6)
        assert np.all(np.asarray(b)[~mask] == 0)
    # The first position sees only itself: its relation rows are one-hot, the KL is 0.
    for a in base:
        np.testing.assert_allclose(np.asarray(a)[:, 0], 0.0, atol=1e-7)


def test_relation_head_count_mismatch_needs_num_relation_heads():
    with pytest.raises(ValueError, match="num_relation_heads"):
        ft.value_relation_kl(jnp.zeros((1, 3, 2, 4)), jnp.zeros((1, 3, 4, 4)))
    with pytest.raises(ValueError, match="divisible"):
        ft.value_relation_kl(jnp.ones((1, 3, 2, 4)), jnp.ones((1, 3, 4, 4)), num_relation_heads=3)


# ------------------------------------------------------------------- attention transfer


def np_attention_transfer(s, t, visible, mask):
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    ns, nt = s.shape[1], t.shape[1]
    if ns != nt and nt % ns == 0:  # average groups of consecutive teacher heads
        t = np.stack([t[:, i * (nt // ns) : (i + 1) * (nt // ns)].mean(1) for i in range(ns)], 1)
    elif ns != nt and ns % nt == 0:
        s = np.stack([s[:, i * (ns // nt) : (i + 1) * (ns // nt)].mean(1) for i in range(nt)], 1)
    elif ns != nt:  # no common grouping: one averaged map each
        s, t = s.mean(1, keepdims=True), t.mean(1, keepdims=True)
    vis = visible[:, None]
    err = (np.where(vis, s, 0) - np.where(vis, t, 0)) ** 2
    return np.where(mask, err.sum(-1).mean(1) / s.shape[-1], 0.0)


def _random_maps(seed, n, segments):
    """Probability maps from random q, k under the visibility of ``segments``."""
    q, k = _rand(seed, B, T, n, 4), _rand(seed + 1, B, T, n, 4)
    return np.asarray(ft.attention_probs(q, k, segment_ids=segments))


SEGMENTS = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], np.int32)


@pytest.mark.parametrize("ns,nt", [(4, 4), (2, 4), (4, 2), (3, 2)])
def test_attention_transfer_matches_numpy(ns, nt):
    s, t = _random_maps(0, ns, SEGMENTS), _random_maps(5, nt, SEGMENTS)
    f = jax.jit(lambda s, t: ft.attention_transfer_mse(s, t, MASK, segment_ids=SEGMENTS))
    got = f(s, t)
    want = np_attention_transfer(s, t, np_visible(_arange_positions(B, T), SEGMENTS), MASK)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
    assert np.all(np.asarray(got)[:, 1:][MASK[:, 1:]] > 0)  # position 0 sees only itself


def test_attention_transfer_zero_at_equality_and_ignores_hidden_entries():
    s = _random_maps(0, 4, SEGMENTS)
    f = jax.jit(lambda s, t: ft.attention_transfer_mse(s, t, MASK, segment_ids=SEGMENTS))
    np.testing.assert_allclose(f(s, s), 0.0, atol=1e-8)
    # Garbage in the entries no query can see (future keys, other segments) changes nothing.
    visible = np_visible(_arange_positions(B, T), SEGMENTS)[:, None]
    noisy = np.where(visible, s, 0.37).astype(np.float32)
    np.testing.assert_allclose(f(noisy, s), 0.0, atol=1e-8)
    t = _random_maps(9, 4, SEGMENTS)
    np.testing.assert_allclose(f(noisy, t), f(s, t), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(f(s, t))[~MASK], 0.0)
    # l1_normalize: scaled maps are the same maps.
    g = lambda s, t: ft.attention_transfer_mse(s, t, MASK, segment_ids=SEGMENTS, l1_normalize=True)
    np.testing.assert_allclose(g(3.0 * s, s), 0.0, atol=1e-8)


# ------------------------------------------------------------------ output relations


def np_output_relation_kl(s, t, mask, sim_tau=0.1):
    def rows(z):
        p = np_softmax(z)
        u = p / np.linalg.norm(p, axis=-1, keepdims=True)
        sim = np.einsum("btv,bsv->bts", u, u) / sim_tau
        cols = mask[:, None, :] | np.eye(z.shape[1], dtype=bool)[None]
        return np_masked_softmax(sim[:, None], cols)[:, 0]

    return np.where(mask, np_row_kl(rows(t), rows(s)), 0.0)


def test_output_relation_kl_matches_numpy_and_is_zero_at_equality():
    s, t = _rand(0, B, T, 7, scale=2.0), _rand(1, B, T, 9, scale=2.0)  # vocabularies differ
    f = jax.jit(lambda s, t: ft.output_relation_kl(s, t, MASK))
    got = f(s, t)
    np.testing.assert_allclose(got, np_output_relation_kl(s, t, MASK), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(got)[~MASK] == 0) and np.all(np.asarray(got)[MASK] > 0)
    np.testing.assert_allclose(f(s, s), 0.0, atol=1e-6)
    np.testing.assert_allclose(f(s, s + 3.0), 0.0, atol=1e-6)
    # Positions outside the response neither contribute rows nor columns.
    s2 = s.copy()
    s2[~MASK] = 50.0 * _rand(3, int((~MASK).sum()), 7)
    np.testing.assert_allclose(f(s2, t), got, rtol=1e-5)
    assert np.all(np.isfinite(jax.grad(lambda s: jnp.sum(f(s, t)))(s)))


# ----------------------------------------------------------------- UniSD contrastive hinge


def test_contrastive_hinge_values_zero_case_and_gradient():
    lp_s = np.array([[-2.5, -1.0, -0.2]], np.float32)
    pos = np.array([[-1.0, -1.0, -0.5]], np.float32)
    neg = np.array([[-3.0, -2.0, -0.4]], np.float32)
    mask = np.array([[True, True, False]])
    f = jax.jit(lambda s, p, n: ft.contrastive_hinge(s, p, n, mask, margin=0.1))
    got = f(lp_s, pos, neg)
    want = np.maximum(0.1 + np.abs(lp_s - pos) - np.abs(lp_s - neg), 0) * mask
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(got, [[1.1, 0.0, 0.0]], atol=1e-6)  # lp_S = lp_T+: zero
    grad = jax.grad(lambda s: jnp.sum(f(s, pos, neg)))(lp_s)
    assert grad[0, 0] < 0  # descent raises lp_S from -2.5 toward lp_T+ = -1
    np.testing.assert_allclose(grad[0, 0], -2.0)
