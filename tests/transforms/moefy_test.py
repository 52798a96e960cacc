"""Dense -> MoE: upcycling and MoEfication reproduce the dense FFN where they must."""

from __future__ import annotations

import hf_reference
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_models
from flax import nnx

import distill_jax as dj
from distill_jax.transforms import moefy as moefy_lib

TINY = tiny_models.TINY


def _dense(family="llama"):
    return tiny_models.build(family, TINY)


def _ids():
    return tiny_models.token_ids(3, 8)


def _logits(model, ids):
    return np.asarray(model(jnp.asarray(ids)), np.float64)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_upcycled_model_equals_the_dense_one_for_a_random_router(family):
    dense = _dense(family)
    params, config = dj.transforms.upcycle(
        *dj.transforms.to_params(dense), num_experts=4, top_k=2, router_std=1.0
    )
    moe = dj.transforms.to_model(params, config)
    assert config.family == moefy_lib.MOE_FAMILY[family] and config.num_experts == 4
    ids = _ids()
    np.testing.assert_allclose(_logits(moe, ids), _logits(dense, ids), atol=2e-5)
    out = moe.forward(jnp.asarray(ids))
    assert np.std(np.asarray(out.router_logits[0])) > 0.1  # the router is not trivial


def test_moefied_groups_sum_to_the_dense_ffn():
    dense = _dense()
    params, config = dj.transforms.to_params(dense)
    # k = E with a zero router: every group runs with gate 1/E, scaled back by k = E.
    full, c_full = dj.transforms.moefication(
        params, config, num_experts=4, top_k=4, router_scale=0.0
    )
    ids = _ids()
    np.testing.assert_allclose(
        _logits(dj.transforms.to_model(full, c_full), ids), _logits(dense, ids), atol=2e-5
    )
    # Each expert is the FFN restricted to 12 of the 48 neurons, and the groups partition them.
    gate = np.asarray(params["layers"][0]["mlp"]["gate_proj"])
    experts = np.asarray(full["layers"][0]["mlp"]["gate_proj"])  # [4, D, 12]
    cols = [
        int(np.flatnonzero((gate == experts[e][:, [j]]).all(0))[0])
        for e in range(4)
        for j in range(12)
    ]
    assert sorted(cols) == list(range(48))
    # A sparse MoEfied model runs, routes by the cluster centroids and stays near the dense one.
    sparse, c2 = dj.transforms.moefication(params, config, num_experts=4, top_k=2)
    got = _logits(dj.transforms.to_model(sparse, c2), ids)
    assert c2.moe_intermediate_size == 12 and np.isfinite(got).all()
    with pytest.raises(ValueError, match="does not split into 5 equal experts"):
        dj.transforms.moefication(params, config, num_experts=5, top_k=2)


def test_balanced_kmeans_makes_equal_clusters_and_finds_planted_ones():
    rng = np.random.RandomState(0)
    centres = rng.randn(4, 6) * 10
    x = np.concatenate([c + rng.randn(8, 6) * 0.1 for c in centres])
    labels = moefy_lib.balanced_kmeans(x, 4, seed=1)
    assert np.bincount(labels).tolist() == [8, 8, 8, 8]
    for c in range(4):  # each planted cluster is one label
        assert len(set(labels[c * 8 : (c + 1) * 8])) == 1


def test_moefied_smollm2_shape_exports_to_transformers(tmp_path):
    dense = dj.models.Transformer(
        dj.models.make_config("llama", **TINY, tie_word_embeddings=True), rngs=nnx.Rngs(1)
    )
    moe = dj.transforms.to_model(
        *dj.transforms.moefication(*dj.transforms.to_params(dense), num_experts=4, top_k=2)
    )
    dj.models.save_pretrained(moe, tmp_path)
    ids = _ids()
    ref = hf_reference.run_reference(hf_reference.load_reference(tmp_path), ids).logits
    np.testing.assert_allclose(ref, _logits(moe, ids), atol=1e-4)
