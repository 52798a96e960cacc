"""Sharded forward == unsharded forward on 8 CPU devices; mesh and rules errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import distill_jax as dj
from distill_jax import sharding

TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
)
CASES = {
    # family, extra config, mesh
    "dense_fsdp_tensor": (
        "qwen3",
        {},
        (("data", 2), ("fsdp", 2), ("tensor", 2), ("expert", 1)),
    ),
    "gemma3_tensor": (
        "gemma3",
        dict(layer_types=("sliding", "full"), sliding_window=4, query_pre_attn_scalar=8),
        (("data", 1), ("fsdp", 4), ("tensor", 2), ("expert", 1)),
    ),
    "moe_expert4": (
        "qwen2_moe",
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
        ),
        (("data", 2), ("fsdp", 1), ("tensor", 1), ("expert", 4)),
    ),
    "mixtral_expert2_tensor2": (
        "mixtral",
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
        (("data", 2), ("fsdp", 1), ("tensor", 2), ("expert", 2)),
    ),
}


def _forward(graphdef, state, ids, segments):
    out = nnx.merge(graphdef, state).forward(ids, segment_ids=segments)
    return out.logits, out.aux_loss, out.router_stats


@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_forward_equals_unsharded(case):
    family, extra, mesh_axes = CASES[case]
    config = dj.models.make_config(family, **TINY, **extra)
    model = dj.models.Transformer(config, rngs=nnx.Rngs(0))
    rng = np.random.RandomState(0)
    ids = jnp.asarray(rng.randint(0, 96, (4, 12)))
    segments = jnp.asarray(np.repeat([[1] * 5 + [2] * 5 + [0] * 2], 4, axis=0))
    graphdef, state = nnx.split(model)
    want = jax.jit(_forward)(graphdef, state, ids, segments)

    mesh = sharding.make_mesh(mesh_axes)
    shardings = sharding.state_shardings(state, mesh, sharding.DEFAULT_RULES)
    sharded_state = jax.device_put(state, shardings)
    batch = sharding.batch_sharding(mesh, shape=ids.shape)
    with sharding.use_mesh(mesh):
        got = jax.jit(_forward)(
            graphdef, sharded_state, jax.device_put(ids, batch), jax.device_put(segments, batch)
        )
    # Parameters really are split over the mesh, not replicated.
    layer0 = nnx.to_flat_state(sharded_state)
    specs = {"/".join(map(str, p)): v.get_value().sharding.spec for p, v in layer0}
    if config.num_experts:
        assert specs["layers/0/mlp/gate_proj"][0] == "expert"
    else:
        assert specs["layers/0/mlp/gate_proj"] == P("fsdp", "tensor") or mesh.shape["fsdp"] == 1
    assert specs["layers/0/attn/q_proj"][1] == "tensor"
    assert got[0].sharding.spec[0] is not None  # logits stay split over the batch
    np.testing.assert_allclose(got[0], want[0], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(got[1], want[1], atol=1e-6, rtol=1e-6)
    for g, w in zip(got[2], want[2]):
        for key in w:
            np.testing.assert_allclose(g[key], w[key], atol=1e-4)


def test_shard_model_places_parameters_in_place():
    config = dj.models.make_config("llama", **TINY)
    model = dj.models.Transformer(config, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 96, (2, 8)))
    want = model(ids)
    mesh = sharding.make_mesh((("data", 1), ("fsdp", 4), ("tensor", 2), ("expert", 1)))
    sharding.shard_model(model, mesh)
    assert model.embed.get_value().sharding.spec == P("tensor", "fsdp")
    with sharding.use_mesh(mesh):
        got = nnx.jit(lambda m, x: m(x))(model, ids)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_logical_to_spec_uses_each_mesh_axis_once():
    rules = sharding.DEFAULT_RULES
    assert sharding.logical_to_spec(("batch", "length", "embed"), rules) == P(
        ("data", "fsdp"), None, None
    )
    assert sharding.logical_to_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("experts", "embed", "mlp"), rules) == P(
        "expert", "fsdp", "tensor"
    )


def test_mesh_errors_name_the_problem():
    with pytest.raises(ValueError, match="multiply to the device count"):
        sharding.make_mesh((("data", 3), ("fsdp", 2)))
    with pytest.raises(ValueError, match="distinct names"):
        sharding.make_mesh((("data", 2), ("model", 4)))
    assert sharding.make_mesh((("data", 2), ("fsdp", -1))).shape["fsdp"] == 4


def test_indivisible_parameter_is_refused_with_its_name():
    config = dj.models.make_config("llama", **{**TINY, "vocab_size": 97})
    model = dj.models.Transformer(config, rngs=nnx.Rngs(0))
    mesh = sharding.make_mesh((("data", 1), ("fsdp", 1), ("tensor", 8), ("expert", 1)))
    with pytest.raises(ValueError, match=r"^embed: dimension 0 \('vocab', size 97\).*tensor"):
        sharding.shard_model(model, mesh)


def test_indivisible_batch_is_refused():
    mesh = sharding.make_mesh((("data", 4), ("fsdp", 2)))
    with pytest.raises(ValueError, match="batch: dimension 0"):
        sharding.batch_sharding(mesh, shape=(6, 16))
