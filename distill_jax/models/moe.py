"""Sparse mixture-of-experts FFN with top-k softmax routing.

Mixtral (Jiang et al., 2024, arXiv:2401.04088): softmax over E router logits, keep the top-k,
renormalise.
Qwen2-MoE / Qwen3-MoE: same, renormalising only when ``norm_topk_prob``; Qwen2-MoE adds a shared
expert whose output is scaled by sigmoid(x w_gate). The load-balancing loss is Switch Transformer's
(Fedus et al., 2021, eqs. 4-6) computed over all MoE layers at once, as transformers does.

Dispatch is dense: every expert runs on every token and the combine weights are zero off the top-k.
That is exact, has static shapes and shards over the ``expert`` mesh axis (each device runs its own
experts, the combine is a reduction); it costs E/k times the FLOPs of a dropless grouped matmul.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from distill_jax.models.layers import activation, param
from distill_jax.models.mlp import MLP
from distill_jax.sharding import shard


def route(router_logits: jax.Array, k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """Top-k softmax routing.

    Args:
        router_logits: [B, T, E] float32.
        k: experts per token.
        normalize: divide the kept probabilities by their sum.

    Returns:
        (combine [B, T, E] float32 with k non-zeros per token, top_idx [B, T, k] int32).
    """
    probs = jax.nn.softmax(router_logits, axis=-1)
    top_p, top_idx = jax.lax.top_k(probs, k)
    if normalize:
        top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
    onehot = jax.nn.one_hot(top_idx, router_logits.shape[-1], dtype=jnp.float32)  # [B, T, k, E]
    return jnp.einsum("btke,btk->bte", onehot, top_p), top_idx


def router_stats(router_logits, top_idx, combine, valid) -> dict[str, jax.Array]:
    """Per-layer sums over valid tokens (divide at logging time; sums stay exact across shards).

    Returns:
        tokens_per_expert [E] (top-k assignments), gate_mass [E] (sum of combine weights),
        router_prob_sum [E] (sum of full softmax probabilities), num_tokens [] (valid tokens).
    """
    e = router_logits.shape[-1]
    w = valid.astype(jnp.float32)
    onehot = jax.nn.one_hot(top_idx, e, dtype=jnp.float32).sum(-2)  # [B, T, E]
    probs = jax.nn.softmax(router_logits, axis=-1)
    return {
        "tokens_per_expert": jnp.einsum("bte,bt->e", onehot, w),
        "gate_mass": jnp.einsum("bte,bt->e", combine, w),
        "router_prob_sum": jnp.einsum("bte,bt->e", probs, w),
        "num_tokens": jnp.sum(w),
    }


def load_balancing_loss(stats: list[dict[str, jax.Array]]) -> jax.Array:
    """E * sum_e f_e * P_e over all MoE layers' tokens (Switch Transformer; transformers' form).

    f_e = top-k assignments to e / rows and P_e = mean router probability of e, both taken over
    the concatenation of every MoE layer's valid tokens; so sum_e f_e = k. Layers with different
    numbers of experts (after non-uniform pruning) cannot be concatenated: then the loss is the
    mean over layers of each layer's E_l * sum_e f_e P_e.
    """
    sizes = {s["tokens_per_expert"].shape[0] for s in stats}
    if len(sizes) > 1:
        return sum(load_balancing_loss([s]) for s in stats) / len(stats)
    num_experts = sizes.pop()
    rows = sum(s["num_tokens"] for s in stats)
    f = sum(s["tokens_per_expert"] for s in stats) / rows
    p = sum(s["router_prob_sum"] for s in stats) / rows
    return num_experts * jnp.sum(f * p)


class MoE(nnx.Module):
    """router [D, E]; experts gate, up [E, D, F], down [E, F, D]; optional shared expert."""

    def __init__(self, config, *, rngs: nnx.Rngs, num_experts: int | None = None):
        c = config
        e = num_experts or c.num_experts
        d, f, pd = c.hidden_size, c.moe_intermediate_size, c.param_dtype
        self.k, self.normalize, self.act, self.dtype = (
            c.num_experts_per_tok,
            c.norm_topk_prob,
            c.hidden_act,
            c.dtype,
        )
        self.router = param(rngs, (d, e), ("embed", None), pd)
        self.gate_proj = param(rngs, (e, d, f), ("experts", "embed", "mlp"), pd)
        self.up_proj = param(rngs, (e, d, f), ("experts", "embed", "mlp"), pd)
        self.down_proj = param(rngs, (e, f, d), ("experts", "mlp", "embed"), pd)
        if c.shared_expert_intermediate_size:
            self.shared_expert = MLP(
                d,
                c.shared_expert_intermediate_size,
                act=c.hidden_act,
                dtype=c.dtype,
                param_dtype=pd,
                rngs=rngs,
            )
            self.shared_expert_gate = param(rngs, (d, 1), ("embed", None), pd)
        else:
            self.shared_expert = self.shared_expert_gate = None

    def router_logits(self, x: jax.Array) -> jax.Array:
        """[B, T, D] -> [B, T, E] float32."""
        return jnp.einsum(
            "btd,de->bte",
            x,
            self.router[...].astype(self.dtype),
            preferred_element_type=jnp.float32,
        )

    def expert_outputs(self, x: jax.Array) -> jax.Array:
        """Every expert's output on every token, ungated: [B, T, D] -> [B, T, E, D]."""
        gate = jnp.einsum("btd,edf->btef", x, self.gate_proj[...].astype(self.dtype))
        up = jnp.einsum("btd,edf->btef", x, self.up_proj[...].astype(self.dtype))
        h = shard(activation(self.act)(gate) * up, ("batch", "length", "experts", "mlp"))
        return jnp.einsum("btef,efd->bted", h, self.down_proj[...].astype(self.dtype))

    def shared_output(self, x: jax.Array) -> jax.Array:
        """The gated shared expert's output [B, T, D] (zeros without one)."""
        if self.shared_expert is None:
            return jnp.zeros_like(x)
        g = jnp.einsum("btd,do->bto", x, self.shared_expert_gate[...].astype(self.dtype))
        return jax.nn.sigmoid(g) * self.shared_expert(x)

    def __call__(self, x: jax.Array, valid: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x [B, T, D], valid [B, T] bool -> ([B, T, D], router statistics of this layer)."""
        logits = self.router_logits(x)
        combine, top_idx = route(logits, self.k, self.normalize)
        gate = jnp.einsum("btd,edf->btef", x, self.gate_proj[...].astype(self.dtype))
        up = jnp.einsum("btd,edf->btef", x, self.up_proj[...].astype(self.dtype))
        h = activation(self.act)(gate) * up * combine.astype(self.dtype)[..., None]
        h = shard(h, ("batch", "length", "experts", "mlp"))  # [B, T, E, F]
        y = jnp.einsum("btef,efd->btd", h, self.down_proj[...].astype(self.dtype))
        if self.shared_expert is not None:
            y = y + self.shared_output(x)
        stats = router_stats(logits, top_idx, combine, valid)
        stats["router_logits"] = logits
        return y, stats
