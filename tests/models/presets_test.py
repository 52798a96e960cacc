"""The public architectures in ``models.presets`` have the parameter counts their model cards
publish (counted on abstract models: ``nnx.eval_shape``, no arrays)."""

from __future__ import annotations

import pytest
from flax import nnx

import distill_jax as dj
from distill_jax.models import presets


def _count(name: str) -> int:
    config = dj.models.make_config(**presets.architecture(name))
    return dj.models.num_params(nnx.eval_shape(lambda: dj.models.Transformer(config)))


@pytest.mark.parametrize(
    "name, published, rtol",
    [
        ("llama-3.2-1b", 1_235_814_400, 0.0),  # the safetensors' total, tied embeddings
        ("llama-3.1-8b", 8_030_261_248, 0.0),
        ("qwen3-30b-a3b", 30.5e9, 0.005),  # model card: "30.5B in total, 3.3B activated"
    ],
)
def test_parameter_counts_match_the_model_cards(name, published, rtol):
    assert abs(_count(name) - published) <= rtol * published


def test_fewer_layers_keep_gemma3s_local_global_pattern_and_unknown_names_fail():
    arch = presets.architecture("gemma-3-12b", num_layers=12)
    assert arch["layer_types"] == (("sliding",) * 5 + ("full",)) * 2
    with pytest.raises(ValueError, match="known: .*llama-3.1-8b"):
        presets.architecture("llama-4")
