"""Depth pruning: keep a subset of a model's blocks (Minitron-style layer dropping).

``drop_layers(model, keep)`` builds the smaller model with the kept blocks' weights copied
unchanged (embeddings, final norm and head too), so the result is the teacher minus some blocks:
the usual initialisation of a depth-pruned student before distillation (Muralidharan et al.,
2024, "Compact Language Models via Pruning and Knowledge Distillation", arXiv:2407.14679).
Per-layer fields of the config (layer_types, moe_layers) are sliced with the blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from distill_jax.models.transformer import Transformer


def keep_layers_spec(spec, num_layers: int) -> tuple[int, ...]:
    """Block indices to keep from a config value: "every_other" (0, 2, 4, ...), "first_half",
    an int n (n evenly spaced blocks including the first and the last), or a list of indices."""
    if spec == "every_other":
        return tuple(range(0, num_layers, 2))
    if spec == "first_half":
        return tuple(range((num_layers + 1) // 2))
    if isinstance(spec, int):
        if not 1 <= spec <= num_layers:
            raise ValueError(f"keep {spec} layers: must be in [1, {num_layers}].")
        if spec == 1:
            return (0,)
        return tuple(sorted({round(i * (num_layers - 1) / (spec - 1)) for i in range(spec)}))
    keep = tuple(int(i) for i in spec)
    if not keep or sorted(set(keep)) != list(keep) or keep[0] < 0 or keep[-1] >= num_layers:
        raise ValueError(
            f"keep_layers={list(spec)} must be increasing distinct block indices in "
            f"[0, {num_layers})."
        )
    return keep


def drop_layers(model: Transformer, keep: Sequence[int] | str | int) -> Transformer:
    """A new model with only the blocks ``keep`` (``keep_layers_spec``); ``model`` is unchanged."""
    from distill_jax.transforms.params import to_model, to_params

    return to_model(*prune_blocks(*to_params(model), keep))


def rank_blocks(stats, keep: int) -> tuple[int, ...]:
    """The ``keep`` blocks of highest block importance BI_l = 1 - mean cos(h_in, h_out)
    (``stats.block_importance``; Men et al., 2024, "ShortGPT", arXiv:2403.03853; Minitron's
    depth score), in model order: the blocks that change the residual stream least are dropped."""
    from distill_jax.transforms import stats as stats_lib

    bi = stats_lib.block_importance(stats)
    if not 1 <= keep <= len(bi):
        raise ValueError(f"keep {keep} blocks: must be in [1, {len(bi)}].")
    order = np.lexsort((np.arange(len(bi)), -bi))
    return tuple(sorted(int(i) for i in order[:keep]))


def prune_blocks(params: dict, config, keep) -> tuple[dict, object]:
    """``drop_layers`` on ``(params, config)``: the blocks ``keep`` (``keep_layers_spec``)."""
    keep = keep_layers_spec(keep, config.num_layers)
    new_config = config.replace(
        num_layers=len(keep),
        layer_types=tuple(config.layer_types[i] for i in keep) if config.layer_types else (),
        moe_layers=tuple(config.moe_layers[i] for i in keep) if config.moe_layers else (),
        experts_per_layer=(
            tuple(config.experts_per_layer[i] for i in keep) if config.experts_per_layer else ()
        ),
    )
    return dict(params, layers={j: params["layers"][i] for j, i in enumerate(keep)}), new_config
