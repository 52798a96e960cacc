"""Grouped-query self-attention with RoPE, optional q/k norm, biases, softcapping, sliding windows.

One implementation covers Llama (Touvron et al., 2023), Qwen2 (qkv bias), Qwen3 and Gemma3 (RMSNorm
on q and k over the head dim), Gemma3's local/global layers, and packed sequences. The attention
itself runs by ``ModelConfig.attention_impl`` (``attention_kernels.resolve_impl``): without a KV
cache by the splash (TPU) or cuDNN (GPU) kernel or the reference; with a cache by the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distill_jax.models import attention_kernels, rope
from distill_jax.models import cache as cache_lib
from distill_jax.models.layers import RMSNorm, param
from distill_jax.sharding import shard


def attention_mask(
    q_positions: jax.Array,
    q_segments: jax.Array,
    k_positions: jax.Array,
    k_segments: jax.Array,
    sliding_window: int | None = None,
) -> jax.Array:
    """Which keys each query sees: same segment, not in the future, inside the window.

    Args:
        q_positions, q_segments: [B, T] int.
        k_positions, k_segments: [B, S] int.
        sliding_window: if set, keys with q_pos - k_pos >= sliding_window are hidden (HF semantics).

    Returns:
        [B, T, S] bool. Padding (segment 0) attends to padding only, so no row is empty.
    """
    same = q_segments[:, :, None] == k_segments[:, None, :]
    delta = q_positions[:, :, None] - k_positions[:, None, :]  # [B, T, S]
    visible = same & (delta >= 0)
    if sliding_window:
        visible &= delta < sliding_window
    return visible


class Attention(nnx.Module):
    """q = x Wq [B,T,N,H], k, v = x Wk, x Wv [B,T,K,H]; softmax(q k^T * scale + mask) v Wo."""

    def __init__(self, config, layer: int, *, rngs: nnx.Rngs):
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.scale = c.attention_scale
        self.softcap = c.attn_logit_softcapping
        self.sliding_window = c.sliding_window if c.is_sliding(layer) else None
        self.attention_impl = c.attention_impl
        local = c.is_sliding(layer) and c.local_rope_theta is not None
        inv_freq = (
            rope.inverse_frequencies(c.head_dim, c.local_rope_theta)
            if local
            else rope.inverse_frequencies(
                c.head_dim,
                c.rope_theta,
                c.rope_type,
                c.rope_factor,
                c.rope_low_freq_factor,
                c.rope_high_freq_factor,
                c.rope_original_max_position,
            )
        )
        self.inv_freq = tuple(float(f) for f in inv_freq)  # static: a constant of the layer
        d, n, k, h, pd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.param_dtype
        self.dtype = c.dtype
        self.q_proj = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), pd)
        self.k_proj = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
        self.v_proj = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
        self.o_proj = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), pd)
        if c.attention_bias:
            self.q_bias = param(rngs, (n, h), ("heads", "head_dim"), pd, init="zeros")
            self.k_bias = param(rngs, (k, h), ("kv_heads", "head_dim"), pd, init="zeros")
            self.v_bias = param(rngs, (k, h), ("kv_heads", "head_dim"), pd, init="zeros")
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        if c.qk_norm:
            kw = dict(eps=c.rms_norm_eps, offset=c.norm_offset, axes=("head_dim",), dtype=pd)
            self.q_norm, self.k_norm = RMSNorm(h, **kw), RMSNorm(h, **kw)
        else:
            self.q_norm = self.k_norm = None

    def _project(self, x, kernel, bias, axes):
        y = jnp.einsum("btd,dnh->btnh", x, kernel[...].astype(self.dtype))
        if bias is not None:
            y = y + bias[...].astype(self.dtype)
        return shard(y, ("batch", "length") + axes)

    def __call__(self, x, positions, segment_ids, cache=None, layer=None, output_qkv=False):
        """Args: x [B,T,D]; positions, segment_ids [B,T]; cache: KVCache or None; layer: its slot;
        output_qkv: also return this call's q, k, v (after q/k norm and RoPE, before the cache).

        Returns: ([B,T,D], updated cache or None, {"q": [B,T,N,H], "k", "v": [B,T,K,H]} or None).
        """
        out, cache, qkv = self.attend(x, positions, segment_ids, cache, layer, output_qkv)
        return self.project_out(out), cache, qkv

    def project_out(self, out: jax.Array) -> jax.Array:
        """Per-head outputs [B,T,N,H] -> [B,T,D] by o_proj."""
        y = jnp.einsum("btnh,nhd->btd", out, self.o_proj[...].astype(self.dtype))
        return shard(y, ("batch", "length", "embed"))

    def attend(self, x, positions, segment_ids, cache=None, layer=None, output_qkv=False):
        """``__call__`` before o_proj: (per-head outputs [B,T,N,H], cache, qkv).

        Without a cache, a kernel (splash, cuDNN) may run instead of the reference; kernels use
        index-based causality, so they need positions that rise by one per token within each
        segment (``attention_kernels`` docstring).
        """
        q = self._project(x, self.q_proj, self.q_bias, ("heads", "head_dim"))  # [B, T, N, H]
        k = self._project(x, self.k_proj, self.k_bias, ("kv_heads", "head_dim"))  # [B, T, K, H]
        v = self._project(x, self.v_proj, self.v_bias, ("kv_heads", "head_dim"))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope.rope_tables(positions, np.asarray(self.inv_freq, np.float32))
        q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
        qkv = dict(q=q, k=k, v=v) if output_qkv else None

        impl = attention_kernels.resolve_impl(
            self.attention_impl, softcap=self.softcap, dtype=self.dtype
        )
        if cache is None and impl != "reference":
            out = attention_kernels.self_attention(
                impl,
                q,
                k,
                v,
                segment_ids,
                scale=self.scale,
                sliding_window=self.sliding_window,
                softcap=self.softcap,
            ).astype(self.dtype)
            return shard(out, ("batch", "length", "heads", "head_dim")), cache, qkv

        k_pos, k_seg = positions, segment_ids
        if cache is not None:
            keys = cache_lib.write(cache.keys[layer], k, cache.index)
            values = cache_lib.write(cache.values[layer], v, cache.index)
            cache = cache.replace(
                keys=cache.keys[:layer] + (keys,) + cache.keys[layer + 1 :],
                values=cache.values[:layer] + (values,) + cache.values[layer + 1 :],
            )
            k, v = keys.astype(self.dtype), values.astype(self.dtype)
            k_pos = cache_lib.write(cache.positions, positions, cache.index)
            k_seg = cache_lib.write(cache.segment_ids, segment_ids, cache.index)
        mask = attention_mask(positions, segment_ids, k_pos, k_seg, self.sliding_window)
        out = attention_kernels.reference_attention(
            q, k, v, mask, scale=self.scale, softcap=self.softcap, dtype=self.dtype
        )
        return shard(out, ("batch", "length", "heads", "head_dim")), cache, qkv
