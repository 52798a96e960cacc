"""Gated feed-forward block: down(act(x W_gate) * (x W_up)) (Shazeer, 2020, arXiv:2002.05202)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from distill_jax.models.layers import activation, param
from distill_jax.sharding import shard


class MLP(nnx.Module):
    """SwiGLU / GeGLU: gate, up [D, F]; down [F, D]."""

    def __init__(self, hidden_size, intermediate_size, *, act, dtype, param_dtype, rngs):
        d, f = hidden_size, intermediate_size
        self.act, self.dtype = act, dtype
        self.gate_proj = param(rngs, (d, f), ("embed", "mlp"), param_dtype)
        self.up_proj = param(rngs, (d, f), ("embed", "mlp"), param_dtype)
        self.down_proj = param(rngs, (f, d), ("mlp", "embed"), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, T, D] -> [B, T, D]."""
        return self.down(self.hidden(x))

    def hidden(self, x: jax.Array) -> jax.Array:
        """The down projection's input act(x W_gate) * (x W_up): [B, T, D] -> [B, T, F]."""
        gate = jnp.einsum("btd,df->btf", x, self.gate_proj[...].astype(self.dtype))
        up = jnp.einsum("btd,df->btf", x, self.up_proj[...].astype(self.dtype))
        return shard(activation(self.act)(gate) * up, ("batch", "length", "mlp"))

    def down(self, h: jax.Array) -> jax.Array:
        """[B, T, F] -> [B, T, D]."""
        return jnp.einsum("btf,fd->btd", h, self.down_proj[...].astype(self.dtype))
