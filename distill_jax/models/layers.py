"""Small building blocks shared by every layer: parameter creation, RMSNorm, activations."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def param(
    rngs: nnx.Rngs | None,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype: str,
    init: str = "normal",
) -> nnx.Param:
    """An nnx.Param carrying logical axis names (``out_sharding``) for ``distill_jax.sharding``.

    Sharding is applied later by ``sharding.shard_model``; eager sharding is off so that a model
    can be built on one device, abstractly (``nnx.eval_shape``) or before a mesh exists.
    """
    if init == "normal":
        value = 0.02 * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(tuple(shape), jnp.float32)
    elif init == "ones":
        value = jnp.ones(tuple(shape), jnp.float32)
    else:
        raise ValueError(f"Unknown init {init!r}.")
    return nnx.Param(value.astype(dtype), out_sharding=tuple(axes), eager_sharding=False)


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * (offset + w), in float32 (Zhang & Sennrich, 2019).

    Gemma stores w around 0 and uses offset 1; Llama/Qwen store w around 1 and use offset 0.
    """

    def __init__(self, dim: int, *, eps: float, offset: float, axes=("embed",), dtype="float32"):
        self.eps = eps
        self.offset = offset
        self.scale = param(None, (dim,), axes, dtype, init="zeros" if offset else "ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * (self.offset + self.scale[...].astype(jnp.float32))).astype(x.dtype)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """silu (SwiGLU: Llama, Qwen, Mixtral) or tanh-approximated gelu (GeGLU: Gemma)."""
    return {
        "silu": jax.nn.silu,
        "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    }[name]
