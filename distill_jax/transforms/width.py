r"""Width pruning by activation importance (Minitron, METHODS.md 7.8).

Muralidharan et al., 2024, "Compact Language Models via Pruning and Knowledge Distillation"
(arXiv:2407.14679); NVIDIA Model-Optimizer ``mcore_minitron.py``. Importance of a channel is
sqrt(sum over calibration examples of (mean over tokens of |activation|)^2) (``stats``):

* ``prune_heads``: attention heads (L2 over head_dim of each head's output before o_proj),
  ranked within each GQA group so every kept KV head keeps the same number of query heads;
  whole KV groups (by summed head importance) when ``num_kv_heads`` is lowered too.
* ``prune_ffn``: FFN neurons (the down projection's input), per layer, the same width for all.
* ``prune_embed``: embedding channels (pre-attention and pre-MLP norm outputs summed over
  layers), sliced out of every parameter with an ``embed`` axis. Unlike the other two this is
  not exact for zero-importance channels: RMSNorm's mean over channels changes (and Gemma's
  sqrt(hidden_size) embedding scale follows the new width).

Each returns new ``(params, config)``; ``tensor_parallel`` checks that the new sizes still
divide the mesh's tensor axis before anything is sliced.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from distill_jax import sharding
from distill_jax.models.config import ModelConfig
from distill_jax.models.transformer import Transformer
from distill_jax.transforms import stats as stats_lib


def param_axes(config: ModelConfig) -> dict[str, tuple]:
    """{"layers/0/attn/q_proj": ("embed", "heads", "head_dim"), ...} of a model of ``config``."""
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    return sharding.param_logical_axes(model)


def _divides(name: str, value: int, tensor_parallel: int) -> None:
    if value < 1:
        raise ValueError(f"{name}={value} must be >= 1.")
    if value % tensor_parallel:
        raise ValueError(
            f"{name}={value} is not divisible by the tensor axis ({tensor_parallel}); pick a "
            f"multiple of {tensor_parallel} so the pruned model still shards."
        )


def _top(scores: np.ndarray, n: int) -> np.ndarray:
    """Sorted indices of the n highest scores (ties: lower index first)."""
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores, np.float64)))
    return np.sort(order[:n])


def _slice(params: dict, axes: Mapping[str, tuple], prefix: str, name: str, idx) -> dict:
    """Take ``idx`` along every axis called ``name`` of the parameters under ``prefix``
    ("" = all); returns a new tree sharing the untouched arrays."""

    def walk(tree, path):
        out = {}
        for k, v in tree.items():
            p = f"{path}/{k}" if path else str(k)
            if isinstance(v, dict):
                out[k] = walk(v, p)
                continue
            if p.startswith(prefix):
                for dim, axis in enumerate(axes.get(p) or ()):
                    if axis == name:
                        v = jnp.take(jnp.asarray(v), jnp.asarray(idx), axis=dim)
            out[k] = v
        return out

    return walk(params, "")


def head_plan(
    stats: Mapping,
    config: ModelConfig,
    num_heads: int,
    *,
    num_kv_heads: int | None = None,
    tensor_parallel: int = 1,
) -> dict:
    """{"kind": "heads", "heads": {layer: kept query heads}, "kv_heads": {layer: kept KV heads}}.

    Within each kept KV group the group's num_heads / num_kv_heads most important query heads
    stay, in their original order; KV groups are ranked by the sum of their heads' importance.
    """
    stats_lib.check_stats(stats, config)
    k_old, g_old = config.num_kv_heads, config.num_heads // config.num_kv_heads
    k_new = k_old if num_kv_heads is None else int(num_kv_heads)
    _divides("num_heads", num_heads, tensor_parallel)
    _divides("num_kv_heads", k_new, tensor_parallel)
    if k_new > k_old or num_heads % k_new or num_heads // k_new > g_old:
        raise ValueError(
            f"num_heads={num_heads}, num_kv_heads={k_new}: need num_kv_heads <= {k_old} and "
            f"num_heads a multiple of num_kv_heads with at most {g_old} heads per KV group."
        )
    g_new = num_heads // k_new
    imp = stats_lib.head_importance(stats)  # [L, N]
    heads, kvs = {}, {}
    for layer in range(config.num_layers):
        groups = imp[layer].reshape(k_old, g_old)
        kv = _top(groups.sum(1), k_new)
        kvs[layer] = [int(i) for i in kv]
        heads[layer] = [int(i * g_old + h) for i in kv for h in _top(groups[i], g_new)]
    return {"kind": "heads", "heads": heads, "kv_heads": kvs}


def ffn_plan(
    stats: Mapping, config: ModelConfig, intermediate_size: int, *, tensor_parallel: int = 1
) -> dict:
    """{"kind": "ffn", "keep": {layer: the intermediate_size most important neurons}}."""
    stats_lib.check_stats(stats, config)
    _divides("intermediate_size", intermediate_size, tensor_parallel)
    if intermediate_size > config.intermediate_size:
        raise ValueError(
            f"intermediate_size={intermediate_size} exceeds the model's {config.intermediate_size}."
        )
    imp = stats_lib.ffn_importance(stats)  # [L, F]
    return {
        "kind": "ffn",
        "keep": {i: [int(j) for j in _top(imp[i], intermediate_size)] for i in range(len(imp))},
    }


def embed_plan(
    stats: Mapping, config: ModelConfig, hidden_size: int, *, tensor_parallel: int = 1
) -> dict:
    """{"kind": "embed", "keep": the hidden_size most important embedding channels}."""
    stats_lib.check_stats(stats, config)
    _divides("hidden_size", hidden_size, tensor_parallel)
    if hidden_size > config.hidden_size:
        raise ValueError(f"hidden_size={hidden_size} exceeds the model's {config.hidden_size}.")
    keep = _top(stats_lib.embed_importance(stats), hidden_size)
    return {"kind": "embed", "keep": [int(j) for j in keep]}


def apply_width(params: dict, config: ModelConfig, plan: Mapping) -> tuple[dict, ModelConfig]:
    """Slice ``params`` (or any tree shaped like them, e.g. Adam moments) by a width plan."""
    axes = param_axes(config)
    kind = plan["kind"]
    if kind == "heads":
        out = params
        for layer, heads in plan["heads"].items():
            prefix = f"layers/{layer}/attn/"
            out = _slice(out, axes, prefix, "heads", heads)
            out = _slice(out, axes, prefix, "kv_heads", plan["kv_heads"][layer])
        some = next(iter(plan["heads"].values()))
        k = len(next(iter(plan["kv_heads"].values())))
        return out, config.replace(num_heads=len(some), num_kv_heads=k)
    if kind == "ffn":
        out = params
        for layer, keep in plan["keep"].items():
            out = _slice(out, axes, f"layers/{layer}/mlp/", "mlp", keep)
        size = len(next(iter(plan["keep"].values())))
        return out, config.replace(intermediate_size=size)
    if kind == "embed":
        out = _slice(params, axes, "", "embed", plan["keep"])
        return out, config.replace(hidden_size=len(plan["keep"]))
    raise ValueError(f"Not a width plan: kind={kind!r}.")


def prune_heads(params, config, stats, num_heads, *, num_kv_heads=None, tensor_parallel=1):
    """``head_plan`` then ``apply_width``: keep ``num_heads`` (and ``num_kv_heads``) per layer."""
    plan = head_plan(
        stats, config, num_heads, num_kv_heads=num_kv_heads, tensor_parallel=tensor_parallel
    )
    return apply_width(params, config, plan)


def prune_ffn(params, config, stats, intermediate_size, *, tensor_parallel=1):
    """``ffn_plan`` then ``apply_width``: the most important FFN neurons of every block."""
    plan = ffn_plan(stats, config, intermediate_size, tensor_parallel=tensor_parallel)
    return apply_width(params, config, plan)


def prune_embed(params, config, stats, hidden_size, *, tensor_parallel=1):
    """``embed_plan`` then ``apply_width``: the most important embedding channels everywhere."""
    plan = embed_plan(stats, config, hidden_size, tensor_parallel=tensor_parallel)
    return apply_width(params, config, plan)
