"""Structural transforms as pure functions (params, config, stats) -> (params, config).

``to_params(model)`` gives ``(params, config)``, ``to_model(params, config)`` the model back;
``calibrate(model, batches)`` collects the statistics every ranking reads (``stats``).
"""

from distill_jax.transforms.depth import drop_layers, keep_layers_spec, prune_blocks, rank_blocks
from distill_jax.transforms.experts import (
    align_expert,
    average_linkage,
    merge_experts,
    naee_plan,
    naee_plan_from_stats,
    plan_merge,
    prune_experts,
    rank_experts,
)
from distill_jax.transforms.moefy import moefication, upcycle
from distill_jax.transforms.params import to_model, to_params
from distill_jax.transforms.stats import (
    block_importance,
    calibrate,
    collecting_moe_inputs,
    embed_importance,
    expert_scores,
    ffn_importance,
    head_importance,
    merge_stats,
)
from distill_jax.transforms.width import prune_embed, prune_ffn, prune_heads
