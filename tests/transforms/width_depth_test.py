"""Width and depth pruning: each equals zeroing the removed parts in the original model."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models

import distill_jax as dj

TINY = tiny_models.dense_arch(num_layers=3, num_heads=6, num_kv_heads=3)


def _model(family="llama", seed=0, **extra):
    return tiny_models.build(family, TINY, seed, **extra)


def _ids(n=4, t=9, seed=0):
    return tiny_models.token_ids(n, t, seed)


def _logits(model, ids):
    return np.asarray(model(jnp.asarray(ids)), np.float64)


def _zeroed(model, layer_fn):
    """A copy of ``model`` with ``layer_fn(params_of_layer, layer)`` applied to every block."""
    params, config = dj.transforms.to_params(model)
    layers = {i: layer_fn(dict(p), i) for i, p in params["layers"].items()}
    return dj.transforms.to_model(dict(params, layers=layers), config)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(6, 3), (3, 3), (4, 2), (2, 1)])
def test_pruning_heads_equals_zeroing_their_output_projection(family, num_heads, num_kv_heads):
    model = _model(family)
    ids = _ids()
    stats = dj.transforms.calibrate(model, [ids])
    imp = dj.transforms.head_importance(stats)  # [L, 6]: 3 KV groups of 2 heads
    params, config = dj.transforms.prune_heads(
        *dj.transforms.to_params(model), stats, num_heads, num_kv_heads=num_kv_heads
    )
    assert (config.num_heads, config.num_kv_heads) == (num_heads, num_kv_heads)
    kept = {}
    for layer in range(3):  # NumPy ranking: groups by summed importance, heads within groups
        groups = imp[layer].reshape(3, 2)
        kv = sorted(np.argsort(-groups.sum(1), kind="stable")[:num_kv_heads])
        per = num_heads // num_kv_heads
        kept[layer] = [
            g * 2 + int(h) for g in kv for h in sorted(np.argsort(-groups[g], kind="stable")[:per])
        ]

    def zero(p, layer):
        attn = dict(p["attn"])
        o = np.asarray(attn["o_proj"]).copy()
        o[[n for n in range(6) if n not in kept[layer]]] = 0
        attn["o_proj"] = jnp.asarray(o)
        return dict(p, attn=attn)

    want = _logits(_zeroed(model, zero), ids)
    np.testing.assert_allclose(
        _logits(dj.transforms.to_model(params, config), ids), want, atol=2e-5
    )


def test_pruning_ffn_neurons_equals_zeroing_them_and_dead_neurons_cost_nothing():
    model = _model()
    # Neurons 5 and 7 of every block are dead: zero up-projection columns, activation 0.
    params, config = dj.transforms.to_params(model)
    for p in params["layers"].values():
        p["mlp"]["up_proj"] = p["mlp"]["up_proj"].at[:, [5, 7]].set(0.0)
    model = dj.transforms.to_model(params, config)
    ids = _ids()
    stats = dj.transforms.calibrate(model, [ids])
    imp = dj.transforms.ffn_importance(stats)
    np.testing.assert_array_equal(imp[:, [5, 7]], 0.0)
    dead_only, c46 = dj.transforms.prune_ffn(params, config, stats, 46)
    np.testing.assert_allclose(
        _logits(dj.transforms.to_model(dead_only, c46), ids), _logits(model, ids), atol=1e-5
    )
    pruned, c24 = dj.transforms.prune_ffn(params, config, stats, 24)
    keep = {i: sorted(np.argsort(-imp[i], kind="stable")[:24]) for i in range(3)}

    def zero(p, layer):
        mlp = dict(p["mlp"])
        mask = np.zeros(48, bool)
        mask[keep[layer]] = True
        mlp["down_proj"] = jnp.where(mask[:, None], mlp["down_proj"], 0.0)
        return dict(p, mlp=mlp)

    np.testing.assert_allclose(
        _logits(dj.transforms.to_model(pruned, c24), ids),
        _logits(_zeroed(model, zero), ids),
        atol=2e-5,
    )


def test_pruning_embedding_channels_slices_every_embed_axis():
    model = _model("gemma3", layer_types=("sliding", "full", "sliding"), sliding_window=4)
    ids = _ids()
    stats = dj.transforms.calibrate(model, [ids])
    params, config = dj.transforms.to_params(model)
    same, c32 = dj.transforms.prune_embed(params, config, stats, 32)
    np.testing.assert_array_equal(
        _logits(dj.transforms.to_model(same, c32), ids), _logits(model, ids)
    )
    small, c24 = dj.transforms.prune_embed(params, config, stats, 24)
    keep = np.sort(np.argsort(-dj.transforms.embed_importance(stats), kind="stable")[:24])
    assert c24.hidden_size == 24
    np.testing.assert_array_equal(small["embed"], np.asarray(params["embed"])[:, keep])
    layer = small["layers"][1]
    np.testing.assert_array_equal(
        layer["attn"]["q_proj"], np.asarray(params["layers"][1]["attn"]["q_proj"])[keep]
    )
    np.testing.assert_array_equal(
        layer["attn"]["o_proj"], np.asarray(params["layers"][1]["attn"]["o_proj"])[..., keep]
    )
    np.testing.assert_array_equal(
        layer["mlp"]["down_proj"], np.asarray(params["layers"][1]["mlp"]["down_proj"])[:, keep]
    )
    np.testing.assert_array_equal(
        layer["post_mlp_norm"]["scale"],
        np.asarray(params["layers"][1]["post_mlp_norm"]["scale"])[keep],
    )
    np.testing.assert_array_equal(
        layer["attn"]["q_norm"]["scale"], params["layers"][1]["attn"]["q_norm"]["scale"]
    )
    assert dj.transforms.to_model(small, c24)(jnp.asarray(ids)).shape == (4, 9, 96)


def test_block_importance_drops_a_do_nothing_block_first():
    model = _model(num_layers=4)

    def silence(p, layer):  # block 2 adds nothing to the residual stream
        if layer != 2:
            return p
        attn, mlp = dict(p["attn"]), dict(p["mlp"])
        attn["o_proj"] = jnp.zeros_like(attn["o_proj"])
        mlp["down_proj"] = jnp.zeros_like(mlp["down_proj"])
        return dict(p, attn=attn, mlp=mlp)

    model = _zeroed(model, silence)
    ids = _ids()
    stats = dj.transforms.calibrate(model, [ids])
    bi = dj.transforms.block_importance(stats)
    assert bi[2] == pytest.approx(0.0, abs=1e-6) and np.all(np.delete(bi, 2) > 1e-4)
    keep = dj.transforms.rank_blocks(stats, 3)
    assert keep == (0, 1, 3)
    params, config = dj.transforms.prune_blocks(*dj.transforms.to_params(model), keep)
    np.testing.assert_allclose(
        _logits(dj.transforms.to_model(params, config), ids), _logits(model, ids), atol=1e-5
    )
    same = dj.transforms.drop_layers(model, keep)
    np.testing.assert_allclose(_logits(same, ids), _logits(model, ids), atol=1e-5)


def test_bad_widths_fail_before_slicing():
    model = _model()
    stats = dj.transforms.calibrate(model, [_ids()])
    params, config = dj.transforms.to_params(model)
    with pytest.raises(
        ValueError, match="intermediate_size=36 is not divisible by the tensor axis"
    ):
        dj.transforms.prune_ffn(params, config, stats, 36, tensor_parallel=8)
    with pytest.raises(ValueError, match="num_heads=3 is not divisible by the tensor axis"):
        dj.transforms.prune_heads(params, config, stats, 3, tensor_parallel=2)
    with pytest.raises(ValueError, match="at most 2 heads per KV group"):
        dj.transforms.prune_heads(params, config, stats, 6, num_kv_heads=1)
    with pytest.raises(ValueError, match="hidden_size=30 is not divisible"):
        dj.transforms.prune_embed(params, config, stats, 30, tensor_parallel=4)
    moe = dj.models.Transformer(
        dj.models.make_config(
            "mixtral",
            **{**TINY, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8},
        )
    )
    moe_stats = dj.transforms.calibrate(moe, [_ids()])
    with pytest.raises(ValueError, match="dense FFN blocks"):
        dj.transforms.prune_ffn(*dj.transforms.to_params(moe), moe_stats, 24)
