"""Index plans and progressive schedules: staged == composed, Adam moments stay aligned."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tiny_models
from flax import nnx

import distill_jax as dj
from distill_jax.train import state as state_lib
from distill_jax.transforms import schedule

TINY = tiny_models.dense_arch(num_layers=3)


def _model(family="llama", **extra):
    return tiny_models.build(family, TINY, **extra)


def _ids(seed=0):
    return tiny_models.token_ids(4, 8, seed)


def _trained_state(model, steps=3):
    """A TrainState after a few AdamW steps on a toy loss, so the moments are non-trivial."""
    params, _ = dj.transforms.to_params(model)
    tx = optax.adamw(1e-2)
    state = state_lib.create({"student": params, "loss": {}}, tx, {}, seed=0)
    graphdef = nnx.split(model, nnx.Param)[0]
    ids = jnp.asarray(_ids())

    def loss(p):
        return jnp.mean(nnx.merge(graphdef, nnx.State(p["student"]))(ids) ** 2)

    for _ in range(steps):
        g = jax.grad(loss)(state.params)
        updates, opt = tx.update(g, state.opt_state, state.params)
        state = state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt)
    return state


def test_adam_moments_are_sliced_with_the_parameters():
    model = _model()
    state = _trained_state(model)
    stats = dj.transforms.calibrate(model, [_ids()])
    plan = schedule.make_plan(dict(kind="ffn", intermediate_size=24), stats, model.config)
    new, config = schedule.transform_state(state, model.config, plan)
    assert config.intermediate_size == 24
    adam = new.opt_state[0]
    old_adam = state.opt_state[0]
    for layer, keep in plan["keep"].items():
        for moment, old in ((adam.mu, old_adam.mu), (adam.nu, old_adam.nu)):
            got = moment["student"]["layers"][layer]["mlp"]
            want = old["student"]["layers"][layer]["mlp"]
            np.testing.assert_array_equal(got["up_proj"], np.asarray(want["up_proj"])[:, keep])
            np.testing.assert_array_equal(got["down_proj"], np.asarray(want["down_proj"])[keep])
            np.testing.assert_array_equal(
                got["gate_proj"].shape,
                new.params["student"]["layers"][layer]["mlp"]["gate_proj"].shape,
            )
    # Untouched parameters and their moments are the same arrays' values.
    np.testing.assert_array_equal(adam.mu["student"]["embed"], old_adam.mu["student"]["embed"])
    assert int(adam.count) == int(old_adam.count) == 3
    # The optimizer runs on the sliced state.
    tx = optax.adamw(1e-2)
    tx.update(jax.tree.map(jnp.ones_like, new.params), new.opt_state, new.params)


def test_staged_plans_equal_the_composed_one_shot_transform():
    model = _model()
    stats = dj.transforms.calibrate(model, [_ids()])
    params, config = dj.transforms.to_params(model)
    ffn = schedule.make_plan(dict(kind="ffn", intermediate_size=32), stats, config)
    p1, c1 = schedule.apply_plan(params, config, ffn)
    blocks = {"kind": "blocks", "keep": [0, 2]}
    p2, c2 = schedule.apply_plan(p1, c1, blocks)
    heads = {"kind": "heads", "heads": {0: [1, 3], 1: [0, 2]}, "kv_heads": {0: [0, 1], 1: [0, 1]}}
    p3, c3 = schedule.apply_plan(p2, c2, heads)
    # One shot: each layer's kept FFN neurons and heads indexed in the original model.
    one = dict(params, layers={})
    for new, old in enumerate([0, 2]):
        layer = params["layers"][old]
        keep, hk = ffn["keep"][old], heads["heads"][new]
        one["layers"][new] = dict(
            layer,
            mlp={
                "gate_proj": np.asarray(layer["mlp"]["gate_proj"])[:, keep],
                "up_proj": np.asarray(layer["mlp"]["up_proj"])[:, keep],
                "down_proj": np.asarray(layer["mlp"]["down_proj"])[keep],
            },
            attn=dict(
                layer["attn"],
                q_proj=np.asarray(layer["attn"]["q_proj"])[:, hk],
                o_proj=np.asarray(layer["attn"]["o_proj"])[hk],
            ),
        )
    assert (c3.num_layers, c3.intermediate_size, c3.num_heads) == (2, 32, 2)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, p3), one)
    ids = _ids(1)
    a = dj.transforms.to_model(p3, c3)(jnp.asarray(ids))
    b = dj.transforms.to_model(jax.tree.map(jnp.asarray, one), c3)(jnp.asarray(ids))
    np.testing.assert_array_equal(a, b)


def test_replay_gives_the_shapes_of_the_pruned_state():
    model = _model("mixtral", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8)
    state = _trained_state(model, steps=1)
    stats = dj.transforms.calibrate(model, [_ids()])
    plans = [schedule.make_plan(dict(kind="experts", keep=3), stats, model.config)]
    new, config = schedule.transform_state(state, model.config, plans[0])
    shapes, replayed = schedule.replay(state, model.config, plans)
    assert replayed == config and config.num_experts == 3
    assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(jnp.shape, new)


def test_bad_schedules_fail_before_anything_runs():
    with pytest.raises(ValueError, match="kind='width'"):
        schedule.check_schedule([dict(step=2, kind="width")], 10)
    with pytest.raises(ValueError, match="increasing steps"):
        schedule.check_schedule([dict(step=4, kind="ffn"), dict(step=3, kind="blocks")], 10)
    with pytest.raises(ValueError, match="increasing steps"):
        schedule.check_schedule([dict(step=10, kind="ffn")], 10)
