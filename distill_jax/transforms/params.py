"""Between a model and the ``(params, config)`` pair every transform takes and returns.

``params`` is the model's parameters as a nested pure dict (``nnx.to_pure_dict``): plain arrays
keyed ``params["layers"][i]["mlp"]["gate_proj"]``, so transforms are ordinary pytree functions.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from distill_jax.models.config import ModelConfig
from distill_jax.models.transformer import Transformer, to_looped


def to_params(model: Transformer) -> tuple[dict, ModelConfig]:
    """(nested dict of parameter arrays, config) of ``model``; the model is unchanged.

    Always the per-layer layout (``params["layers"][i]``): a model with stacked blocks
    (``scan_layers``) is unstacked and its config says ``scan_layers=False``.
    """
    model = to_looped(model)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param)), model.config


def to_model(params: dict, config: ModelConfig) -> Transformer:
    """A Transformer of ``config`` holding ``params`` (shapes checked by name)."""
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    target = nnx.state(model, nnx.Param)
    want = {"/".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(target)}
    got = {"/".join(map(str, p)): np.shape(v) for p, v in _flat(params)}
    if want.keys() != got.keys():
        raise ValueError(
            f"params do not fit the config: missing {sorted(want.keys() - got.keys())[:5]}, "
            f"unexpected {sorted(got.keys() - want.keys())[:5]}."
        )
    bad = [f"{k}: {got[k]} vs {want[k]}" for k in want if tuple(got[k]) != tuple(want[k])]
    if bad:
        raise ValueError(f"params do not fit the config's shapes ({bad[:3]}).")
    nnx.replace_by_pure_dict(target, jax.tree.map(jax.numpy.asarray, params))
    nnx.update(model, target)
    return model


def _flat(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def moe_layers(config: ModelConfig) -> tuple[int, ...]:
    """Indices of the MoE blocks."""
    return tuple(i for i in range(config.num_layers) if config.is_moe(i))
