"""``Transformer.forward(output_attention_qkv=True)`` returns the q, k, v the attention uses:
probabilities rebuilt from them with ``losses.features.attention_probs`` equal transformers'
``output_attentions=True`` maps (eager attention) for tiny random Llama, Qwen3, Qwen2 (sliding
window) and Gemma3 (sliding/full layers, query scale) models built locally, with no downloads.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hf_reference  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

import distill_jax as dj  # noqa: E402
from distill_jax.losses import features  # noqa: E402

B, T = 2, 10


@jax.jit
def _probs(graphdef, state, ids):
    model = nnx.merge(graphdef, state)
    out = model.forward(ids, output_attention_qkv=True)
    plain = model.forward(ids)
    return out, plain, features.attention_probs_from_model(model, out.attention_qkv)


@pytest.mark.parametrize("name", ["llama", "qwen3", "qwen2", "gemma3"])
def test_probabilities_from_returned_qkv_equal_transformers_attentions(name, tmp_path):
    reference = hf_reference.build_reference(name, tmp_path)
    model = dj.models.from_pretrained(tmp_path)
    c = model.config
    ids = np.random.default_rng(0).integers(0, c.vocab_size, (B, T)).astype(np.int32)
    out, plain, probs = _probs(*nnx.split(model), ids)

    assert plain.attention_qkv is None  # off by default
    np.testing.assert_array_equal(out.logits, plain.logits)  # the flag changes nothing else
    assert len(out.attention_qkv) == c.num_layers
    qkv = out.attention_qkv[0]
    assert qkv["q"].shape == (B, T, c.num_heads, c.head_dim)
    assert qkv["k"].shape == qkv["v"].shape == (B, T, c.num_kv_heads, c.head_dim)

    ref = hf_reference.run_reference(reference, ids, output_attentions=True).attentions
    assert len(ref) == len(probs) == c.num_layers
    for layer, (ours, theirs) in enumerate(zip(probs, ref)):
        assert ours.shape == (B, c.num_heads, T, T)
        np.testing.assert_allclose(
            np.asarray(ours), theirs.numpy(), atol=1e-5, rtol=0, err_msg=f"layer {layer}"
        )
