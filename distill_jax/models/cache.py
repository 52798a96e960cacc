"""KV cache for incremental decoding: fixed shapes, one write index shared by the batch.

Prompts of different lengths are left-padded (segment id 0) so that every row writes its next token
at the same slot; each slot remembers its position and segment id, which is all the attention mask
needs (causality by position, packing by segment, sliding windows by position difference).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

# Position given to empty slots: larger than any query position, so the causal test hides them.
EMPTY_POSITION = 2**30


@struct.dataclass
class KVCache:
    """keys/values: one [B, S, K, H] array per layer; positions, segment_ids: [B, S]; index: []."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    positions: jax.Array
    segment_ids: jax.Array
    index: jax.Array

    @property
    def max_length(self) -> int:
        return self.positions.shape[1]


def check_length(config, length: int) -> None:
    """Raise before compilation when ``length`` tokens do not fit the model's positions."""
    if length > config.max_position_embeddings:
        raise ValueError(
            f"Sequence length {length} exceeds the model's max_position_embeddings="
            f"{config.max_position_embeddings}; use a shorter input (prompt plus new tokens)."
        )


def init_cache(config, batch_size: int, max_length: int, dtype=None, *, check=True) -> KVCache:
    """An empty cache for ``config`` holding ``max_length`` tokens per row.

    ``check=False`` allows more slots than positions (speculative decoding writes rejected draft
    tokens to slots it then empties, so slots run ahead of positions).

    Raises:
        ValueError: max_length exceeds the model's max_position_embeddings (with ``check``).
    """
    if check:
        check_length(config, max_length)
    dtype = dtype or config.dtype
    shape = (batch_size, max_length, config.num_kv_heads, config.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    return KVCache(
        keys=zeros,
        values=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
        positions=jnp.full((batch_size, max_length), EMPTY_POSITION, jnp.int32),
        segment_ids=jnp.zeros((batch_size, max_length), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


def write(cache_array: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """Write new [B, T, ...] into cache_array [B, S, ...] at slots index .. index+T-1."""
    start = (0, index) + (0,) * (cache_array.ndim - 2)
    return jax.lax.dynamic_update_slice(cache_array, new.astype(cache_array.dtype), start)


def clear_slots(cache: KVCache, clear: jax.Array) -> KVCache:
    """Empty the slots where ``clear`` [B, S] is True: attention no longer sees them."""
    return cache.replace(
        positions=jnp.where(clear, EMPTY_POSITION, cache.positions),
        segment_ids=jnp.where(clear, 0, cache.segment_ids),
    )
