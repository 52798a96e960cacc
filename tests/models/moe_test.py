"""The grouped (ragged_dot) MoE against the dense MoE and a float64 NumPy loop over tokens and
their top-k experts: outputs, router statistics and gradients; bfloat16; per-layer expert counts;
sharded layouts on 8 CPU devices (expert parallelism with all-to-all, the psum path, FSDP,
tensor-parallel experts) against the unsharded dense MoE; capacity-limited dispatch against a NumPy
reference that drops the same assignments; a whole Transformer; a TPU compile of the
expert-parallel layer on this CPU machine.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import distill_jax as dj
from distill_jax import sharding
from distill_jax.models import moe as moe_lib

B, T, D, F = 8, 6, 16, 12
CONFIGS = {
    # Mixtral: renormalised top-2 of 8.
    "mixtral": dict(family="mixtral", num_experts=8, num_experts_per_tok=2),
    # Qwen2-MoE: unnormalised top-3 of 8 plus a sigmoid-gated shared expert.
    "qwen2_moe": dict(
        family="qwen2_moe",
        num_experts=8,
        num_experts_per_tok=3,
        norm_topk_prob=False,
        shared_expert_intermediate_size=20,
    ),
    # Qwen3-MoE: renormalised top-4 of 16 (GeGLU here, to cover the activation argument).
    "qwen3_moe": dict(
        family="qwen3_moe", num_experts=16, num_experts_per_tok=4, hidden_act="gelu_tanh"
    ),
}
EP_RULES = (
    ("batch", ("data", "fsdp", "expert")),
    ("experts", "expert"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
)
# name: (mesh axes, rules, the layout mode the MoE must pick for a batch of B).
LAYOUTS = {
    "expert_parallel": (
        (("data", 2), ("fsdp", 1), ("tensor", 1), ("expert", 4)),
        EP_RULES,
        "all_to_all",
    ),
    "expert_parallel_tensor": (
        (("data", 1), ("fsdp", 2), ("tensor", 2), ("expert", 2)),
        EP_RULES,
        "all_to_all",
    ),
    # Experts over two mesh axes (one expert per device), in another order than the batch's.
    "expert_parallel_two_axes": (
        (("data", 2), ("fsdp", 1), ("tensor", 1), ("expert", 4)),
        (("batch", ("data", "fsdp", "expert")), ("experts", ("expert", "data"))),
        "all_to_all",
    ),
    "experts_not_in_batch": (
        (("data", 2), ("fsdp", 1), ("tensor", 1), ("expert", 4)),
        sharding.DEFAULT_RULES,
        "psum",
    ),
    "fsdp": ((("data", 2), ("fsdp", 4), ("tensor", 1), ("expert", 1)), EP_RULES, "local"),
}


def _config(name: str, **changes) -> dj.models.ModelConfig:
    kw = dict(CONFIGS[name])
    family = kw.pop("family")
    sizes = dict(vocab_size=32, hidden_size=D, intermediate_size=24, moe_intermediate_size=F)
    heads = dict(num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8)
    return dj.models.make_config(family, **{**sizes, **heads, **kw, **changes})


def _moe(config, impl: str, *, num_experts=None, seed=0, **kw) -> moe_lib.MoE:
    """A MoE whose weights are N(0, 1/fan_in), so outputs are O(1) and routing is spread."""
    model = moe_lib.MoE(
        config.replace(moe_impl=impl), rngs=nnx.Rngs(0), num_experts=num_experts, **kw
    )
    keys = iter(jax.random.split(jax.random.key(seed), 16))

    def scaled(var):
        v = var.get_value()
        fan_in = v.shape[-2]
        w = jax.random.normal(next(keys), v.shape, jnp.float32) / math.sqrt(fan_in)
        return var.replace(w.astype(v.dtype))

    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(scaled, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    return model


def _inputs(seed=1, b=B, dtype=jnp.float32):
    x = jax.random.normal(jax.random.key(seed), (b, T, D), jnp.float32).astype(dtype)
    valid = np.ones((b, T), bool)
    valid[1, 4:] = False  # padding tokens: routed and computed like any other, not counted
    valid[b - 1, 1:] = False
    return x, jnp.asarray(valid)


def _params(model) -> dict[str, np.ndarray]:
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {"/".join(map(str, k)): np.asarray(v.get_value(), np.float64) for k, v in flat}


def _numpy_moe(model, x, *, drop=None) -> tuple[np.ndarray, np.ndarray]:
    """Slow float64 reference: loop over tokens and their top-k experts.

    drop: optional set of (token, slot) assignments to leave out (capacity-limited dispatch).
    Returns (y [N, D], tokens_per_expert over all tokens [E]).
    """
    p = _params(model)
    act = {
        "silu": lambda z: z / (1 + np.exp(-z)),
        "gelu_tanh": lambda z: 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3))),
    }[model.act]
    xs = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    e = p["router"].shape[1]
    y, counts = np.zeros_like(xs), np.zeros(e)
    for n, xn in enumerate(xs):
        logits = xn @ p["router"]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = np.argsort(-probs, kind="stable")[: model.k]
        w = probs[top] / (probs[top].sum() if model.normalize else 1.0)
        for slot, (j, wj) in enumerate(zip(top, w)):
            counts[j] += 1
            if drop is not None and (n, slot) in drop:
                continue
            h = act(xn @ p["gate_proj"][j]) * (xn @ p["up_proj"][j])
            y[n] += wj * (h @ p["down_proj"][j])
        if model.shared_expert is not None:
            s = p["shared_expert/gate_proj"], p["shared_expert/up_proj"]
            h = act(xn @ s[0]) * (xn @ s[1])
            gate = 1 / (1 + np.exp(-(xn @ p["shared_expert_gate"])))
            y[n] += gate[0] * (h @ p["shared_expert/down_proj"])
    return y, counts


@jax.jit
def _apply(model, x, valid):
    return model(x, valid)


def _loss(state, graphdef, x, valid, cotangent):
    """<y, cotangent> + the load-balancing loss: a scalar that reaches every parameter."""
    y, stats = nnx.merge(graphdef, state)(x, valid)
    stats.pop("router_logits")
    return jnp.sum(y.astype(jnp.float32) * cotangent) + moe_lib.load_balancing_loss([stats])


_grad = jax.jit(jax.grad(_loss, argnums=(0, 2)), static_argnums=1)


def _grads(model, x, valid, cotangent):
    graphdef, state = nnx.split(model)
    g_state, g_x = _grad(state, graphdef, x, valid, cotangent)
    flat = nnx.to_flat_state(g_state)
    return {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in flat}, np.asarray(g_x)


def _assert_same_stats(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


# ----------------------------------------------------------------------------- one device


@pytest.mark.parametrize("name", list(CONFIGS))
def test_grouped_matches_dense_and_numpy(name):
    config = _config(name)
    grouped, dense = _moe(config, "grouped"), _moe(config, "dense")
    assert moe_lib.resolve_impl("auto") == "dense"  # CPU: ragged_dot would be a masked dense
    assert moe_lib.resolve_impl("grouped") == "grouped"
    x, valid = _inputs()
    y, stats = _apply(grouped, x, valid)
    y_dense, stats_dense = _apply(dense, x, valid)
    ref, counts = _numpy_moe(grouped, x)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, D), ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(y, y_dense, atol=1e-5, rtol=0)
    _assert_same_stats(stats, stats_dense)
    np.testing.assert_array_equal(stats["router_logits"].shape, (B, T, config.num_experts))
    all_valid = jnp.ones_like(valid)
    np.testing.assert_array_equal(_apply(grouped, x, all_valid)[1]["tokens_per_expert"], counts)
    assert np.abs(ref).max() > 0.1  # the comparison is not between near-zero numbers


@pytest.mark.parametrize("name", list(CONFIGS))
def test_grouped_gradients_match_dense(name):
    config = _config(name)
    x, valid = _inputs()
    cotangent = jax.random.normal(jax.random.key(7), x.shape)
    g, gx = _grads(_moe(config, "grouped"), x, valid, cotangent)
    g_dense, gx_dense = _grads(_moe(config, "dense"), x, valid, cotangent)
    assert g.keys() == g_dense.keys() and "router" in g and "down_proj" in g
    np.testing.assert_allclose(gx, gx_dense, atol=1e-5, rtol=1e-5)
    for key in g:
        assert np.abs(g_dense[key]).max() > 0, key
        np.testing.assert_allclose(g[key], g_dense[key], atol=1e-5, rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_bfloat16_compute_with_float32_params(name):
    """bf16 matmuls (params stay float32 and are cast): both paths within 3% of the largest
    |y| of the float64 reference (bf16 has 8 mantissa bits; the two round differently)."""
    config = _config(name, dtype="bfloat16")
    grouped, dense = _moe(config, "grouped"), _moe(config, "dense")
    assert grouped.gate_proj.get_value().dtype == jnp.float32
    x, valid = _inputs(dtype=jnp.bfloat16)
    y, stats = _apply(grouped, x, valid)
    y_dense, stats_dense = _apply(dense, x, valid)
    assert y.dtype == y_dense.dtype == jnp.bfloat16
    _assert_same_stats(stats, stats_dense)
    ref, _ = _numpy_moe(grouped, x)
    tol = 0.03 * np.abs(ref).max()
    for out in (y, y_dense):
        np.testing.assert_allclose(np.asarray(out, np.float32).reshape(-1, D), ref, atol=tol)


def test_per_layer_expert_count():
    """A layer built with fewer experts than the config's (non-uniform pruning)."""
    config = _config("qwen3_moe")
    grouped = _moe(config, "grouped", num_experts=6)
    dense = _moe(config, "dense", num_experts=6)
    assert grouped.gate_proj.get_value().shape == (6, D, F)
    x, valid = _inputs()
    y, stats = _apply(grouped, x, valid)
    assert stats["tokens_per_expert"].shape == (6,)
    np.testing.assert_allclose(y, _apply(dense, x, valid)[0], atol=1e-5, rtol=0)
    ref, _ = _numpy_moe(grouped, x)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, D), ref, atol=1e-5, rtol=0)


def test_grouped_ffn_rows_outside_every_group_are_zero():
    """Assignments whose expert is the sentinel G (not held here) give zero rows."""
    g, r = 3, 10
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (4, D))
    w_gate, w_up = (jax.random.normal(k, (g, D, F)) for k in keys[1:3])
    w_down = jax.random.normal(keys[3], (g, F, D))
    rows = jnp.arange(r) % 4
    groups = jnp.array([2, 3, 0, 3, 1, 1, 3, 0, 2, 2])
    out = jax.jit(moe_lib.grouped_ffn, static_argnums=4)(
        x, rows, groups, (w_gate, w_up, w_down), "silu"
    )
    x, w_gate, w_up, w_down = (np.asarray(a, np.float64) for a in (x, w_gate, w_up, w_down))
    for i, (row, j) in enumerate(zip(np.asarray(rows), np.asarray(groups))):
        if j == g:
            np.testing.assert_array_equal(out[i], 0)
        else:
            z = x[row] @ w_gate[j]
            h = z / (1 + np.exp(-z)) * (x[row] @ w_up[j])
            np.testing.assert_allclose(out[i], h @ w_down[j], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- mesh


def _on_mesh(model, mesh, rules, x, valid):
    """The model, x and valid placed on ``mesh`` by ``rules``."""
    model = sharding.shard_model(model, mesh, rules)
    x = jax.device_put(x, sharding.named_sharding(mesh, ("batch", "length", "embed"), rules))
    valid = jax.device_put(valid, sharding.batch_sharding(mesh, rules))
    return model, x, valid


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sharded_grouped_matches_unsharded_dense(layout):
    axes, rules, mode = LAYOUTS[layout]
    config = _config("qwen2_moe")
    x, valid = _inputs()
    cotangent = jax.random.normal(jax.random.key(7), x.shape)
    y_ref, stats_ref = _apply(_moe(config, "dense"), x, valid)
    g_ref, gx_ref = _grads(_moe(config, "dense"), x, valid, cotangent)
    mesh = sharding.make_mesh(axes)
    assert moe_lib.sharded_layout(mesh, rules, B, config.num_experts, F).mode == mode
    with sharding.use_mesh(mesh, rules):
        model, xs, vs = _on_mesh(_moe(config, "grouped"), mesh, rules, x, valid)
        y, stats = _apply(model, xs, vs)
        g, gx = _grads(model, xs, vs, cotangent)
    np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=0)
    for key in stats_ref:
        np.testing.assert_allclose(stats[key], stats_ref[key], atol=1e-5, rtol=1e-6)
    np.testing.assert_allclose(gx, gx_ref, atol=1e-5, rtol=1e-5)
    for key in g_ref:
        np.testing.assert_allclose(g[key], g_ref[key], atol=1e-5, rtol=1e-5, err_msg=key)


def _compiled_text(model, x, valid, mesh, rules) -> str:
    with sharding.use_mesh(mesh, rules):
        return jax.jit(lambda m, x, v: m(x, v)[0]).lower(model, x, valid).compile().as_text()


def test_expert_parallel_hlo_has_all_to_all():
    config = _config("mixtral")
    x, valid = _inputs()
    texts = {}
    for layout in ("expert_parallel", "experts_not_in_batch"):
        axes, rules, _ = LAYOUTS[layout]
        mesh = sharding.make_mesh(axes)
        with sharding.use_mesh(mesh, rules):
            args = _on_mesh(_moe(config, "grouped"), mesh, rules, x, valid)
        texts[layout] = _compiled_text(*args, mesh, rules)
    assert "all-to-all" in texts["expert_parallel"]
    assert "all-to-all" not in texts["experts_not_in_batch"]


def test_small_batch_falls_back_to_the_psum_path():
    """A batch the expert axis does not divide (a decode step) is replicated over it."""
    axes, rules, _ = LAYOUTS["expert_parallel"]
    mesh = sharding.make_mesh(axes)
    layout = moe_lib.sharded_layout(mesh, rules, 2, 8, F)
    assert (layout.batch, layout.experts, layout.mode) == (("data", "fsdp"), ("expert",), "psum")
    config = _config("mixtral")
    x, valid = _inputs(b=2)
    y_ref, _ = _apply(_moe(config, "dense"), x, valid)
    with sharding.use_mesh(mesh, rules):
        y, _ = _apply(sharding.shard_model(_moe(config, "grouped"), mesh, rules), x, valid)
    np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=0)


def test_partial_expert_parallelism_is_rejected():
    mesh = sharding.make_mesh((("data", 2), ("fsdp", 1), ("tensor", 2), ("expert", 2)))
    rules = (("batch", ("data", "expert")), ("experts", ("expert", "tensor")))
    with pytest.raises(ValueError, match="every expert axis to split the batch"):
        moe_lib.sharded_layout(mesh, rules, B, 8, F)
    mesh = sharding.make_mesh(LAYOUTS["expert_parallel"][0])
    with pytest.raises(ValueError, match="6 experts cannot be split"):
        moe_lib.sharded_layout(mesh, EP_RULES, B, 6, F)


def _expected_drops(top_idx, valid, *, shards, experts_per_shard, capacity):
    """(token, slot) assignments the capacity-limited dispatch drops, by its stated rule: per
    source shard and destination, valid tokens' assignments first, in (token, slot) order."""
    n_all, k = top_idx.shape
    n = n_all // shards
    drop = set()
    for s in range(shards):
        for dest in range(shards):
            mine = [
                (tok, slot)
                for tok in range(s * n, (s + 1) * n)
                for slot in range(k)
                if top_idx[tok, slot] // experts_per_shard == dest
            ]
            mine.sort(key=lambda a: not valid[a[0]])  # stable: valid first
            drop.update(mine[capacity:])
    return drop


def test_capacity_factor_drops_and_reports_like_numpy():
    axes, rules, _ = LAYOUTS["expert_parallel"]
    mesh = sharding.make_mesh(axes)
    config = _config("mixtral")
    x, valid = _inputs()
    ref_model = _moe(config, "grouped")
    logits = np.asarray(ref_model.router_logits(x)).reshape(B * T, -1)
    top_idx = np.argsort(-logits, axis=-1, kind="stable")[:, : config.num_experts_per_tok]
    # 4 expert shards x 2 data shards: 8 shards of 6 tokens; 2 experts per shard.
    capacity = math.ceil(0.5 * T * 2 / 4)
    drop = _expected_drops(
        top_idx, valid.reshape(-1), shards=8, experts_per_shard=2, capacity=capacity
    )
    dropped_valid = sum(bool(valid.reshape(-1)[tok]) for tok, _ in drop)
    assert 0 < dropped_valid < len(drop)  # drops happen, and padding tokens' go first
    ref, _ = _numpy_moe(ref_model, x, drop=drop)
    with sharding.use_mesh(mesh, rules):
        model = _moe(config, "grouped", capacity_factor=0.5)
        y, stats = _apply(*_on_mesh(model, mesh, rules, x, valid))
        lossless = _moe(config, "grouped", capacity_factor=float(4 * 2))
        y_full, stats_full = _apply(*_on_mesh(lossless, mesh, rules, x, valid))
    np.testing.assert_allclose(np.asarray(y).reshape(-1, D), ref, atol=1e-5, rtol=0)
    assert int(stats["dropped_assignments"]) == dropped_valid
    assert int(stats_full["dropped_assignments"]) == 0
    y_dense, _ = _apply(_moe(config, "dense"), x, valid)
    np.testing.assert_allclose(y_full, y_dense, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- transformer


def test_transformer_logits_grouped_equal_dense():
    config = dj.models.make_config(
        "qwen3_moe",
        vocab_size=64,
        hidden_size=D,
        intermediate_size=24,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=F,
    )
    ids = jax.random.randint(jax.random.key(3), (2, T), 0, 64)

    @jax.jit
    def forward(model, ids):
        out = model.forward(ids)
        return out.logits, out.aux_loss, out.router_logits

    outs = {}
    for impl in ("grouped", "dense"):
        model = dj.models.Transformer(config.replace(moe_impl=impl), rngs=nnx.Rngs(0))
        outs[impl] = forward(model, ids)
    (logits, aux, router), (logits_d, aux_d, router_d) = outs["grouped"], outs["dense"]
    assert np.abs(logits).max() > 0.01
    np.testing.assert_allclose(logits, logits_d, atol=1e-5, rtol=0)
    np.testing.assert_allclose(aux, aux_d, rtol=1e-6)
    for a, b in zip(router, router_d):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- TPU compile


def test_expert_parallel_compiles_for_tpu():
    """Ahead-of-time compile for a v5p 2x2x1 slice with libtpu (no TPU needed): the program has
    the all-to-all and TPU's native ragged dot."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # Another process (a parallel test) may hold libtpu's lockfile; compiling needs no TPU.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(
            platform="tpu", topology_name="v5p:2x2x1", chip_config_name="default", num_slices=1
        )
    except Exception as e:  # noqa: BLE001  (libtpu missing or unusable here)
        pytest.skip(f"no TPU topology: {e}")
    mesh = sharding.make_mesh(
        (("data", 1), ("fsdp", 1), ("tensor", 1), ("expert", 4)), devices=topo.devices
    )
    config = _config("mixtral", hidden_size=128, moe_intermediate_size=128, dtype="bfloat16")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: moe_lib.MoE(config, rngs=nnx.Rngs(0))))
    shardings = sharding.state_shardings(state, mesh, EP_RULES)
    state = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), state, shardings
    )
    x = jax.ShapeDtypeStruct(
        (8, 16, 128),
        jnp.bfloat16,
        sharding=sharding.named_sharding(mesh, ("batch", "length", "embed"), EP_RULES),
    )
    valid = jax.ShapeDtypeStruct(
        (8, 16), jnp.bool_, sharding=sharding.batch_sharding(mesh, EP_RULES)
    )

    def loss(state, x, valid):
        y, _ = nnx.merge(graphdef, state)(x, valid)
        return jnp.sum(y.astype(jnp.float32))

    with sharding.use_mesh(mesh, EP_RULES):
        text = jax.jit(jax.grad(loss)).lower(state, x, valid).compile().as_text()
    assert "all-to-all" in text
    assert "ragged" in text
