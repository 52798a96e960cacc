"""Calibration statistics against NumPy recomputations, merging, sharding and shape errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models
from flax import nnx

import distill_jax as dj
from distill_jax import sharding
from distill_jax.transforms import stats as stats_lib

TINY = tiny_models.TINY
MOE = dict(tiny_models.MOE, num_experts=4)


def _model(family="llama", seed=0, **extra):
    return tiny_models.build(family, TINY, seed, **extra)


def _batches(n=2, b=3, t=10, seed=0, pad=True):
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        seg = np.ones((b, t), np.int32)
        if pad:
            seg[0, -3:] = 0  # right padding: excluded everywhere
        out.append(dict(input_ids=rng.randint(0, 96, (b, t)), segment_ids=seg))
    return out


def _numpy_moe_sums(model, batch, layer):
    """Recompute one MoE layer's statistics from the model's own submodules, in NumPy."""
    ids = jnp.asarray(batch["input_ids"])
    seg = jnp.asarray(batch["segment_ids"])
    out = model.forward(ids, segment_ids=seg, output_hidden_states=True, compute_logits=False)
    block = model.layers[layer]
    x = out.hidden_states[layer]
    x = (
        x
        + block.attn(
            block.attn_norm(x), jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape), seg
        )[0]
    )
    m_in = block.mlp_norm(x)
    logits = np.asarray(block.mlp.router_logits(m_in), np.float64).reshape(-1, 4)
    f = np.asarray(block.mlp.expert_outputs(m_in), np.float64).reshape(-1, 4, TINY["hidden_size"])
    valid = np.asarray(batch["segment_ids"]).reshape(-1) != 0
    logits, f = logits[valid], f[valid]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.argsort(-p, axis=-1, kind="stable")[:, :2]
    sel = np.zeros_like(p)
    np.put_along_axis(sel, top, 1.0, axis=-1)
    g = p * sel / (p * sel).sum(-1, keepdims=True)
    norm = np.linalg.norm(f, axis=-1)
    return dict(
        num_tokens=valid.sum(),
        tokens_per_expert=sel.sum(0),
        gate_mass=g.sum(0),
        ean=(sel * norm).sum(0),
        reap_sum=(sel * g * norm).sum(0),
        max_activation=np.where(sel > 0, np.abs(f).max(-1), 0).max(0),
        router_gram=logits.T @ logits,
        output_sum=f.sum(0),
    )


def test_moe_sums_match_numpy():
    model = _model("mixtral", **MOE)
    batch = _batches(n=1)[0]
    got = dj.transforms.calibrate(model, [batch])
    for layer in range(2):
        want = _numpy_moe_sums(model, batch, layer)
        for key, value in want.items():
            np.testing.assert_allclose(got["layers"][layer][key], value, rtol=2e-4, atol=2e-4)
    freq = dj.transforms.expert_scores(got, "frequency")
    np.testing.assert_allclose(np.stack(freq).sum(1), 2.0, rtol=1e-6)  # sum_j freq_j = k


def test_uniform_router_gives_frequency_k_over_e_and_reap_is_gate_times_norm():
    model = _model("mixtral", **MOE)
    for block in model.layers:
        block.mlp.router[...] = jnp.zeros_like(block.mlp.router[...])
        # Identical experts: every expert's output on a token is the same vector.
        for name in ("gate_proj", "up_proj", "down_proj"):
            w = getattr(block.mlp, name)
            w[...] = jnp.broadcast_to(w[...][:1], w[...].shape)
    stats = dj.transforms.calibrate(model, _batches())
    # top_k of equal probabilities picks the first k experts; the gates are 1/2 each.
    for layer in stats["layers"]:
        n = layer["num_tokens"]
        np.testing.assert_allclose(layer["tokens_per_expert"], [n, n, 0, 0])
        np.testing.assert_allclose(layer["gate_mass"], [n / 2, n / 2, 0, 0], rtol=1e-6)
    reap = np.stack(dj.transforms.expert_scores(stats, "reap"))
    mean_norm = np.stack(dj.transforms.expert_scores(stats, "output_norm"))
    np.testing.assert_allclose(reap[:, :2], 0.5 * mean_norm[:, :2], rtol=1e-5)


def test_two_halves_merged_equal_one_pass():
    model = _model("mixtral", **MOE)
    batches = _batches(n=4)
    whole = dj.transforms.calibrate(model, batches)
    halves = dj.transforms.merge_stats(
        dj.transforms.calibrate(model, batches[:2]), dj.transforms.calibrate(model, batches[2:])
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), whole, halves)


def test_dense_importances_match_numpy():
    model = _model("llama", intermediate_size=48)
    batch = _batches(n=1)[0]
    stats = dj.transforms.calibrate(model, [batch])
    ids, seg = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["segment_ids"])
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    out = model.forward(ids, segment_ids=seg, output_hidden_states=True, compute_logits=False)
    w = np.asarray(seg, np.float64)
    embed = 0.0
    for layer, block in enumerate(model.layers):
        x = out.hidden_states[layer]
        a_in = block.attn_norm(x)
        heads = np.asarray(block.attn.attend(a_in, pos, seg)[0], np.float64)  # [B, T, N, H]
        x1 = x + block.attn.project_out(jnp.asarray(heads, jnp.float32))
        m_in = block.mlp_norm(x1)
        hid = np.asarray(block.mlp.hidden(m_in), np.float64)
        embed = embed + np.abs(np.asarray(a_in)) + np.abs(np.asarray(m_in))

        def minitron(x):  # sqrt(sum_b (mean over valid tokens |x|)^2)
            mean = (np.abs(x) * w[..., None]).sum(1) / w.sum(1)[:, None]
            return np.sqrt((mean**2).sum(0))

        np.testing.assert_allclose(
            dj.transforms.head_importance(stats)[layer],
            minitron(np.linalg.norm(heads, axis=-1)),
            rtol=1e-4,
        )
        np.testing.assert_allclose(
            dj.transforms.ffn_importance(stats)[layer], minitron(hid), rtol=1e-4, atol=1e-6
        )
        h_in, h_out = (
            np.asarray(x, np.float64),
            np.asarray(out.hidden_states[layer + 1], np.float64),
        )
        cos = (
            (h_in * h_out).sum(-1) / np.linalg.norm(h_in, axis=-1) / np.linalg.norm(h_out, axis=-1)
        )
        np.testing.assert_allclose(
            dj.transforms.block_importance(stats)[layer], 1 - (cos * w).sum() / w.sum(), rtol=1e-4
        )
    mean = (embed * w[..., None]).sum(1) / w.sum(1)[:, None]
    np.testing.assert_allclose(
        dj.transforms.embed_importance(stats), np.sqrt((mean**2).sum(0)), rtol=1e-4
    )


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2_moe"])
def test_statistics_pass_is_the_models_forward(family):
    extra = dict(MOE, shared_expert_intermediate_size=24) if family == "qwen2_moe" else {}
    if family == "gemma3":
        extra = dict(layer_types=("sliding", "full"), sliding_window=4)
    model = _model(family, **extra)
    batch = _batches(n=1)[0]
    want = model.forward(
        jnp.asarray(batch["input_ids"]),
        segment_ids=jnp.asarray(batch["segment_ids"]),
        compute_logits=False,
    ).hidden
    got = stats_lib.calibration_hidden(model, batch["input_ids"], segment_ids=batch["segment_ids"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sharded_calibration_equals_unsharded():
    model = _model("mixtral", **MOE)
    batches = _batches(n=2, b=4, pad=True)
    want = dj.transforms.calibrate(model, batches)
    mesh = sharding.make_mesh((("data", 2), ("fsdp", 1), ("tensor", 2), ("expert", 2)))
    got = dj.transforms.calibrate(model, batches, mesh=mesh)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), got, want)


def test_statistics_of_another_shape_are_refused():
    stats = dj.transforms.calibrate(_model("llama"), _batches(n=1))
    params, config = dj.transforms.to_params(_model("llama", intermediate_size=64))
    with pytest.raises(ValueError, match="another shape.*intermediate_size.*48, 64"):
        dj.transforms.prune_ffn(params, config, stats, 32)
    with pytest.raises(ValueError, match="no batches"):
        dj.transforms.calibrate(_model("llama"), [])


@pytest.mark.parametrize(
    "family, extra",
    [
        ("mixtral", MOE),
        ("gemma3", dict(layer_types=("sliding", "full") * 2, sliding_window=4, num_layers=4)),
    ],
)
def test_statistics_of_the_scanned_layout_equal_the_loop(family, extra):
    """The statistics read the model's own forward, so a stacked (lax.scan) model gives the
    same sums as the per-layer one: an independent check of the intermediates' plumbing."""
    looped = _model(family, **extra)
    scanned = dj.models.transformer.to_scanned(looped)
    assert scanned.scanned
    batches = _batches(n=1)
    want = dj.transforms.calibrate(looped, batches)
    got = dj.transforms.calibrate(scanned, batches)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def test_block_intermediates_equal_a_numpy_forward_of_the_block():
    """Every named intermediate of a Llama block against a float64 NumPy forward."""
    model = _model("llama", num_layers=1)
    c = model.config
    ids = np.random.RandomState(1).randint(0, 96, (2, 6))
    names = tuple(dj.models.transformer.BLOCK_INTERMEDIATES)
    got = jax.tree.map(
        lambda a: np.asarray(a, np.float64),
        model.forward(jnp.asarray(ids), intermediates=names).intermediates[0],
    )
    assert sorted(got) == sorted(set(names) - {"router_logits", "expert_outputs"})
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(model)))
    blk, eps = p["layers"][0], c.rms_norm_eps
    x = p["embed"][ids]  # [B, T, D]
    a_in = _rms(x, blk["attn_norm"]["scale"], eps)
    att = blk["attn"]
    q, k, v = (np.einsum("btd,dnh->btnh", a_in, att[f"{n}_proj"]) for n in "qkv")
    h = c.head_dim
    inv = 1.0 / c.rope_theta ** (np.arange(0, h, 2) / h)
    ang = np.arange(6)[:, None] * inv[None]  # [T, H / 2]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(z):
        rot = np.concatenate([-z[..., h // 2 :], z[..., : h // 2]], -1)
        return z * cos[None, :, None] + rot * sin[None, :, None]

    q, k = rope(q), rope(k)
    rep = c.num_heads // c.num_kv_heads
    kk, vv = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, kk) * h**-0.5
    s = np.where(np.tril(np.ones((6, 6), bool)), s, -np.inf)
    prob = np.exp(s - s.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    heads = np.einsum("bnts,bsnh->btnh", prob, vv)
    x1 = x + np.einsum("btnh,nhd->btd", heads, att["o_proj"])
    m_in = _rms(x1, blk["mlp_norm"]["scale"], eps)
    mlp = blk["mlp"]
    gate = m_in @ mlp["gate_proj"]
    hid = gate / (1 + np.exp(-gate)) * (m_in @ mlp["up_proj"])
    want = dict(
        input=x,
        attn_input=a_in,
        qkv=dict(q=q, k=k, v=v),
        heads=heads,
        mlp_input=m_in,
        mlp_hidden=hid,
        output=x1 + hid @ mlp["down_proj"],
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)
